"""transformers' from_pretrained / save_pretrained of qcore checkpoints (qcore.hf)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qcore
import qcore.hf  # noqa: F401 - registers "qcore" with transformers
from qcore.quant.linear import QuantLinear
from qcore.tiny import tiny_inputs, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "gemma2", "gpt2", "opt"]


def checkpoint(folder: Path, family: str, **overrides: object) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family, **overrides).eval()
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    return qcore.save(model, folder), model


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_equals_qcore_load(tmp_path: Path, family: str) -> None:
    path, model = checkpoint(tmp_path / "ck", family)
    ids = tiny_inputs(model)
    hf_model = AutoModelForCausalLM.from_pretrained(path)
    packed = [m for m in hf_model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, qcore.load(path)(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_again_with_either_reader(tmp_path: Path, tied: bool) -> None:
    path, model = checkpoint(tmp_path / "ck", "llama", tie_word_embeddings=tied)
    ids = tiny_inputs(model)
    with torch.no_grad():
        expected = model(ids).logits
        AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "hf")
        assert torch.equal(qcore.load(tmp_path / "hf")(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, expected)


def test_qcore_save_of_a_from_pretrained_model(tmp_path: Path) -> None:
    path, model = checkpoint(tmp_path / "ck", "qwen3")
    ids = tiny_inputs(model)
    hf_model = AutoModelForCausalLM.from_pretrained(path)
    assert hf_model.qcore_record["chain"][-1]["method"] == "rtn"
    again = qcore.save(hf_model, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(qcore.load(again)(ids).logits, model(ids).logits)


def test_dtype_matches_qcore_load(tmp_path: Path) -> None:
    path, model = checkpoint(tmp_path / "ck", "llama")
    ids = tiny_inputs(model)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = qcore.load(path, dtype=torch.bfloat16)
    assert hf_model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, ref(ids).logits)


def test_a_foreign_config_under_the_qcore_name_is_refused(tmp_path: Path) -> None:
    import json

    from qcore.plugin.errors import CheckpointError

    path, _ = checkpoint(tmp_path / "ck", "llama")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format"] = "something-else"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not qcore's"):
        AutoModelForCausalLM.from_pretrained(path)
