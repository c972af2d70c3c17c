"""Metadata that travels with a checkpoint: no local path, tags, the model card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import qcore
from qcore.models import load_model
from qcore.checkpoint.card import portable_name, record_evaluation, tags
from qcore.testing import tiny_calibration
from qcore.tiny import tiny_model


def test_portable_name_keeps_hub_ids_and_drops_local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert portable_name("/work/shared/models/stories260K") == "stories260K"
    assert portable_name("/models/llama/") == "llama"
    assert portable_name("~/models/smol") == "smol"
    assert portable_name("./out/smol") == "smol"
    assert portable_name("C:\\models\\smol") == "smol"
    assert portable_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert portable_name("smollm2-135m") == "smollm2-135m"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable_name("org/name") == "name"  # a local folder that looks like a Hub id


@pytest.mark.parametrize("chain,options,expected", [
    ("gptq", {"bits": 4, "group_size": 32}, ["qcore", "gptq", "w4", "g32"]),
    (["awq", "gptq"], {"bits": 3, "group_size": 32}, ["qcore", "awq", "gptq", "awq+gptq", "w3", "g32"]),
    ("rtn", {"bits": {"default": 4, "*.mlp.down_proj": 8}, "group_size": -1},
     ["qcore", "rtn", "w-mixed", "per-channel"]),
])
def test_tags(chain: str | list[str], options: dict, expected: list[str]) -> None:
    if any(m not in qcore.list_methods() for m in ([chain] if isinstance(chain, str) else chain)):
        pytest.skip(f"{chain} not installed")
    model = tiny_model("llama")
    qcore.quantize(model, chain, calibration=tiny_calibration(), **options)
    assert tags(model.qcore_record) == expected


def test_activation_and_kv_widths_are_tagged() -> None:
    record = {"chain": [{"method": "quarot", "config": {"w_bits": 4, "a_bits": 4, "kv_bits": 16,
                                                        "group_size": 64}}]}
    assert tags(record) == ["qcore", "quarot", "w4", "g64", "a4"]


def test_checkpoint_holds_no_local_path_and_a_model_card(tmp_path: Path) -> None:
    src = tmp_path / "my-float-model"
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    model, _ = load_model(str(src))
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    out = qcore.save(model, tmp_path / "ck")
    for f in out.iterdir():
        if f.is_file() and f.suffix in (".json", ".md"):
            assert str(tmp_path) not in f.read_text(), f"{f.name} holds a path of this machine"
    config = json.loads((out / "config.json").read_text())
    assert config["_name_or_path"] == "my-float-model"
    assert config["quantization_config"]["tags"] == ["qcore", "rtn", "w4", "g32"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- qcore\n- rtn\n")
    assert "# my-float-model, quantized with qcore (rtn)" in card and "group_size=32" in card
    assert "qcore.load" in card and "Evaluation" not in card
    record_evaluation(out, {"data": "wikitext2", "perplexity": 12.5, "float_perplexity": 11.25,
                            "tokens": 4088, "seq_len": 512})
    assert "| float | 11.250 |" in (out / "README.md").read_text()
    loaded = qcore.load(out)  # the record edit keeps the checkpoint valid
    assert loaded.qcore_record["evaluation"]["perplexity"] == 12.5
