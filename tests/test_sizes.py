"""4-bit group-128 linear weights take at most 0.27x their fp16 bytes,
in memory (also after the kernels have run) and on disk."""
from __future__ import annotations

import pytest
import torch

import qcore
from qcore import checkpoint
from qcore.tiny import tiny_inputs, tiny_model

LIMIT = 0.27
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64}  # every linear's in_features divisible by 128


@pytest.fixture(scope="module")
def q4g128():
    model = tiny_model("llama", **SHAPE)
    float_desc = checkpoint.describe_checkpoint(model)
    qcore.quantize(model, "rtn", bits=4, group_size=128, check=False)
    return model, float_desc


def quant_linears(model):
    from qcore.quant.linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_float_reference_is_fp16_bytes(q4g128):
    _, float_desc = q4g128
    # the tiny model is float32: its linears are exactly 2x their fp16 bytes
    assert float_desc["linear_ratio"] == pytest.approx(2.0)
    assert float_desc["quantized_bytes"] == 0


def test_in_memory_at_most_027_of_fp16(q4g128):
    model, float_desc = q4g128
    qls = quant_linears(model)
    assert len(qls) == 2 * 7
    fp16 = sum(2 * m.in_features * m.out_features for m in qls.values())
    # the same linears as the float model's (lm_head stays float and is not counted as a linear)
    assert fp16 * 2 == float_desc["linear_bytes"]

    def held() -> int:  # every tensor a QuantLinear holds, including run-time kernel caches
        return sum(m.resident_bytes() for m in qls.values())

    before = held()
    with torch.no_grad():
        model(tiny_inputs(model))
    after = held()
    desc = checkpoint.describe_checkpoint(model)
    assert desc["quantized_bytes"] == after and desc["quantized_fp16_bytes"] == fp16
    assert before / fp16 <= LIMIT, f"as loaded: {before / fp16:.4f}x of fp16"
    assert after / fp16 <= LIMIT, f"after a forward (kernel caches built): {after / fp16:.4f}x of fp16"


def test_on_disk_at_most_027_of_fp16(q4g128, tmp_path):
    model, _ = q4g128
    path = checkpoint.save(model, tmp_path / "q4g128")
    desc = checkpoint.describe_checkpoint(path)
    q = [r for r in desc["layers"] if r["kind"] == "quantized"]
    assert len(q) == 2 * 7 and all(r["bits"] == 4 and r["group_size"] == 128 for r in q)
    assert desc["quantized_ratio"] <= LIMIT, f"on disk: {desc['quantized_ratio']:.4f}x of fp16"
    # the header-only count agrees with the tensors actually stored
    from safetensors import safe_open

    names = {r["name"] for r in q}
    with safe_open(str(path / checkpoint.SINGLE_FILE), framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rpartition(".")[0] in names)
    assert stored == desc["quantized_bytes"]
