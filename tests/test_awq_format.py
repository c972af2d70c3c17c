"""The AWQ GEMM checkpoint format: a checkpoint GPTQModel's AWQ wrote (tests/fixtures, made by
tools/make_import_fixtures.py) loads on qcore's modules with the writer's own results, and qcore's
AWQ export round-trips exactly and reproduces the writer's tensors bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qcore
from qcore.formats import ExportError, awq
from qcore.quant.linear import QuantLinear
from qcore.testing import assert_same_tensors, max_relative_error, tiny_calibration
from qcore.tiny import tiny_inputs, tiny_model

FIXTURE = Path(__file__).with_name("fixtures") / "gptqmodel-awq-tiny-llama-w4g32"
REFERENCE = FIXTURE.with_name(FIXTURE.name + ".reference.safetensors")
WRITER_RTOL = 1e-2
"""Largest difference to the writer's own float16 results, relative to their largest magnitude."""


def test_awq_checkpoint_matches_the_writers_results() -> None:
    ref = load_file(str(REFERENCE))
    model = qcore.load(FIXTURE)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 14 and all(m.bits == 4 and m.group_size == 32 for m in packed.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert max_relative_error(packed[name].dequantize_weight(), ref[f"{name}.weight"]) < WRITER_RTOL
    with torch.no_grad():
        assert max_relative_error(model(ref["probe"]).logits, ref["logits"]) < WRITER_RTOL
    assert model.qcore_record["chain"][0]["imported"] == "awq"


def test_the_interleaved_column_order_is_what_makes_it_match() -> None:
    """Unpacked in plain column order, the same words miss the writer's weights."""
    ref = load_file(str(REFERENCE))
    state = load_file(str(FIXTURE / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    parts = {s: state[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales")}
    right = awq.layer_weight(parts, 32).dequantize()
    from qcore.formats.gptq import unpack_cols

    codes, zeros = unpack_cols(parts["qweight"], 4), unpack_cols(parts["qzeros"], 4)
    plain = (parts["scales"].float().repeat_interleave(32, 0) * (codes - zeros.repeat_interleave(32, 0))).T
    assert max_relative_error(right, ref[f"{name}.weight"]) < WRITER_RTOL < max_relative_error(plain, ref[f"{name}.weight"])


def test_export_of_the_imported_checkpoint_is_the_writers_file(tmp_path: Path) -> None:
    out = qcore.export(qcore.load(FIXTURE), tmp_path / "re", format="awq")
    assert_same_tensors(FIXTURE, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["bits"], qc["group_size"]) == ("awq", "gemm", 4, 32)


@pytest.mark.parametrize("method,options", [
    ("rtn", {"bits": 4, "group_size": 32}), ("rtn", {"bits": 4, "group_size": 32, "sym": True}),
    ("awq", {"bits": 4, "group_size": 32}),
])
def test_export_round_trip_is_exact(tmp_path: Path, method: str, options: dict) -> None:
    if method not in qcore.list_methods():
        pytest.skip(f"{method} is not installed")
    model = tiny_model("llama").eval()
    qcore.quantize(model, method, calibration=tiny_calibration(), **options)
    ids = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(qcore.load(qcore.export(model, tmp_path / "awq", format="awq"))(ids).logits,
                           model(ids).logits)


def test_what_awq_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    qcore.quantize(model, "rtn", bits=8, group_size=32)
    with pytest.raises(ExportError, match="4-bit weights only"):
        qcore.export(model, tmp_path / "x", format="awq")
    if "gptq" in qcore.list_methods():
        act = tiny_model("llama").eval()
        qcore.quantize(act, "gptq", calibration=tiny_calibration(), bits=4, group_size=32, static_groups=False)
        with pytest.raises(ExportError, match="AWQ has no g_idx"):
            qcore.export(act, tmp_path / "y", format="awq")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
