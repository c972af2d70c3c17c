"""compressed-tensors pack-quantized checkpoints written by llm-compressor (tests/fixtures, made by
tools/make_import_fixtures.py) load on qcore's modules with compressed-tensors' own decompression,
and qcore's compressed-tensors export of the imported model is llm-compressor's file again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qcore
from qcore.plugin.errors import CheckpointError
from qcore.quant.linear import QuantLinear
from qcore.testing import assert_same_tensors, max_relative_error

FIXTURE = Path(__file__).with_name("fixtures") / "llmcompressor-tiny-llama-w4g32"
REFERENCE = FIXTURE.with_name(FIXTURE.name + ".reference.safetensors")
LOGITS_RTOL = 1e-2
"""qcore's int4 kernel runs activations in bfloat16; the reference decompresses to float32."""


def test_llmcompressor_checkpoint_matches_compressed_tensors_decompression() -> None:
    ref = load_file(str(REFERENCE))
    model = qcore.load(FIXTURE)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 14 and all(m.bits == 4 and m.group_size == 32 and not m.sym for m in packed.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(packed[name].dequantize_weight().float(), ref[f"{name}.weight"])  # exact
    with torch.no_grad():
        assert max_relative_error(model(ref["probe"]).logits, ref["logits"]) < LOGITS_RTOL
    assert model.qcore_record["chain"][0]["imported"] == "compressed-tensors"


def test_export_of_the_imported_checkpoint_is_the_writers_file(tmp_path: Path) -> None:
    assert_same_tensors(FIXTURE, qcore.export(qcore.load(FIXTURE), tmp_path / "re", format="compressed-tensors"))


def test_quantized_activations_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "w4a8"
    shutil.copytree(FIXTURE, bad)
    config = json.loads((bad / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight-only"):
        qcore.load(bad)
