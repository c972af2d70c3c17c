"""The GPTQ checkpoint format: a checkpoint GPTQModel wrote (tests/fixtures, made by
tools/make_import_fixtures.py) loads on qcore's modules with the writer's own results, and
qcore's GPTQ export round-trips exactly and reproduces the writer's tensors bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qcore
from qcore.formats import ExportError
from qcore.formats import gptq
from qcore.plugin.errors import CheckpointError
from qcore.quant.linear import QuantLinear
from qcore.quant.primitives import QuantizedWeight
from qcore.testing import assert_same_tensors, max_relative_error, tiny_calibration
from qcore.tiny import tiny_inputs, tiny_model

FIXTURE = Path(__file__).with_name("fixtures") / "gptqmodel-tiny-llama-w4g32"
REFERENCE = FIXTURE.with_name(FIXTURE.name + ".reference.safetensors")
WRITER_RTOL = 1e-2
"""Largest difference to the writer's own float16 results, relative to their largest magnitude
(the writer computes scale * code - scale * zero in float16; qcore dequantizes exactly)."""


def test_gptqmodel_checkpoint_matches_the_writers_results() -> None:
    ref = load_file(str(REFERENCE))
    model = qcore.load(FIXTURE)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 14 and all(m.bits == 4 and m.group_size == 32 for m in packed.values())
    assert any(m.g_idx is not None for m in packed.values())  # act-order groups carried over
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert max_relative_error(packed[name].dequantize_weight(), ref[f"{name}.weight"]) < WRITER_RTOL
    with torch.no_grad():
        assert max_relative_error(model(ref["probe"]).logits, ref["logits"]) < WRITER_RTOL
        assert max_relative_error(qcore.load(FIXTURE, dtype=torch.float32)(ref["probe"]).logits, ref["logits"]) < WRITER_RTOL
    assert model.qcore_record["chain"][0]["imported"] == "gptq"


def test_the_v1_zero_convention_is_what_makes_it_match() -> None:
    """Read with the other zero-point convention, the same file misses the writer's weights."""
    ref = load_file(str(REFERENCE))
    state = load_file(str(FIXTURE / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    parts = {s: state[f"{name}.{s}"] for s in gptq.SUFFIXES}
    right = gptq.layer_weight(parts, 4, 32, False, v1=True).dequantize()
    wrong = gptq.layer_weight(parts, 4, 32, False, v1=False).dequantize()
    assert max_relative_error(right, ref[f"{name}.weight"]) < WRITER_RTOL < max_relative_error(wrong, ref[f"{name}.weight"])


def test_export_of_the_imported_checkpoint_is_the_writers_file(tmp_path: Path) -> None:
    """Every tensor comes back bit for bit; the zero points in v2's convention (asymmetric
    exports are v2: GPTQModel accepts asymmetric v1 only from itself)."""
    out = qcore.export(qcore.load(FIXTURE), tmp_path / "re", format="gptq")

    def v2(key: str, t: torch.Tensor) -> torch.Tensor:  # v1 stores zero - 1, v2 the zero
        return gptq.pack_cols(gptq.unpack_cols(t, 4) + 1, 4) if key.endswith(".qzeros") else t

    assert_same_tensors(FIXTURE, out, v2)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) \
        == ("gptq", 4, 32, True, False, "gptq_v2")


@pytest.mark.parametrize("method,options", [
    ("rtn", {"bits": 4, "group_size": 32}), ("rtn", {"bits": 8, "group_size": -1, "sym": True}),
    ("rtn", {"bits": 2, "group_size": 32}), ("gptq", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32, "static_groups": False}),  # a permuted g_idx
])
def test_export_round_trip_is_exact(tmp_path: Path, method: str, options: dict) -> None:
    if method not in qcore.list_methods():
        pytest.skip(f"{method} is not installed")
    model = tiny_model("qwen3").eval()
    qcore.quantize(model, method, calibration=tiny_calibration(), **options)
    ids = tiny_inputs(model)
    out = qcore.export(model, tmp_path / "gptq", format="gptq")
    fmt = json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    assert fmt == ("gptq" if options.get("sym") else "gptq_v2")
    with torch.no_grad():
        assert torch.equal(qcore.load(out)(ids).logits, model(ids).logits)


def test_a_zero_point_of_zero_is_written_as_v2(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    qcore.quantize(model, "rtn", bits=4, group_size=32, sym=True)
    layer = model.model.layers[0].mlp.down_proj
    qw = layer.quantized_weight()
    qw = QuantizedWeight(qw.codes, qw.scales, torch.zeros_like(qw.zeros), 4, 32, True)
    model.model.layers[0].mlp.down_proj = QuantLinear.from_quantized(qw, None)
    out = qcore.export(model, tmp_path / "v2", format="gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    ids = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(qcore.load(out)(ids).logits, model(ids).logits)


def test_what_gptq_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    qcore.quantize(model, "rtn", bits=3, group_size=32)
    with pytest.raises(ExportError, match="3-bit weights.*qcore's own format"):
        qcore.export(model, tmp_path / "x", format="gptq")
    assert not (tmp_path / "x").exists()
    mixed = tiny_model("llama").eval()
    qcore.quantize(mixed, "rtn", bits={"default": 4, "*.mlp.down_proj": 8}, group_size=32)
    with pytest.raises(ExportError, match="mixed bits"):
        qcore.export(mixed, tmp_path / "y", format="gptq")


def test_unreadable_gptq_checkpoints_say_why(tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="3-bit GPTQ checkpoints are not read"):
        qcore.load(bad)
    config["quantization_config"]["bits"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.qzeros"]
    from safetensors.torch import save_file

    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks qzeros"):
        qcore.load(bad)
