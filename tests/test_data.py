"""qcore.data: sources, seeded disjoint windows, records, clear errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from qcore.data import (
    TEXT_SEPARATOR,
    CalibrationData,
    get_calibration,
    read_texts,
    window_starts,
)
from qcore.plugin.errors import CalibrationError
from qcore.testing import HAS_SHARED, SHARED, STORIES_DIR, requires_shared


class CharTokenizer:
    """One token per character (code point mod 1000) plus a BOS, like a HF tokenizer call."""

    name_or_path = "char"

    def __call__(self, text: str, **kwargs: object) -> dict[str, list[int]]:
        return {"input_ids": [1] + [ord(c) % 1000 for c in text]}


TOK = CharTokenizer()


def test_list_of_strings_windows_shape_and_record() -> None:
    texts = ["abcdefghij" * 20, "klmnopqrst" * 20]
    cal = get_calibration(texts, TOK, n_samples=4, seq_len=50, seed=3)
    assert isinstance(cal, CalibrationData)
    assert cal.input_ids.shape == (4, 50) and cal.input_ids.dtype == torch.long
    rec = cal.record
    joined = TEXT_SEPARATOR.join(texts)
    assert rec["sha256"] == hashlib.sha256(joined.encode()).hexdigest()
    assert rec["n_tokens"] == len(joined) + 1
    assert (rec["n_samples"], rec["seq_len"], rec["seed"]) == (4, 50, 3)
    assert rec["source"] == "list of 2 texts"
    json.dumps(rec)  # JSON-able
    # every window is a contiguous slice of the token stream
    stream = torch.tensor(TOK(joined)["input_ids"])
    for row in cal.input_ids:
        hits = [s for s in range(len(stream) - 49) if torch.equal(stream[s:s + 50], row)]
        assert hits


def test_seeded_and_disjoint() -> None:
    starts = window_starts(1000, 10, 64, seed=5)
    assert starts == window_starts(1000, 10, 64, seed=5)
    assert starts != window_starts(1000, 10, 64, seed=6)
    s = sorted(starts)
    assert all(b - a >= 64 for a, b in zip(s, s[1:]))
    assert s[0] >= 0 and s[-1] + 64 <= 1000
    # exact fit: the windows tile the stream
    assert sorted(window_starts(640, 10, 64, seed=0)) == list(range(0, 640, 64))


def test_too_little_text_says_found_and_needed() -> None:
    with pytest.raises(CalibrationError) as exc:
        get_calibration(["short text"], TOK, n_samples=4, seq_len=10)
    msg = str(exc.value)
    assert "11 tokens" in msg and "needs 40" in msg and "n_samples" in msg and "more text" in msg


def test_text_file_jsonl_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("second file", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["first file"]
    assert read_texts(tmp_path) == ["first file", "second file"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "t1"}) + "\n\n"
                  + json.dumps({"prefix": "pre", "gold_completion": "fix"}) + "\n", encoding="utf-8")
    assert read_texts(jl) == ["t1", "prefix"]
    jl.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="'text'"):
        read_texts(jl)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no .txt"):
        read_texts(empty)


def test_dataset_duck_typed() -> None:
    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, key: str) -> list:
            return {"text": ["x y", "z"], "id": [1, 2]}[key]

        def __len__(self) -> int:
            return 2

    assert read_texts(FakeDataset()) == ["x y", "z"]
    FakeDataset.column_names = ["body"]
    with pytest.raises(CalibrationError, match="rename"):
        read_texts(FakeDataset())


def test_default_source_is_pydoc_topics() -> None:
    texts = read_texts(None)
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000
    cal = get_calibration(None, TOK, n_samples=8, seq_len=128, seed=0)
    assert cal.record["source"] == "pydoc_data.topics"
    assert cal.input_ids.shape == (8, 128)


def test_bad_sources() -> None:
    with pytest.raises(CalibrationError, match="list of strings"):
        read_texts("this is not a file")
    with pytest.raises(CalibrationError, match="strings"):
        read_texts(["ok", 3])
    with pytest.raises(CalibrationError, match="tokenizer"):
        get_calibration(["x"], None)


def test_named_dataset_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import qcore.data as data

    monkeypatch.setattr(data, "shared_dir", lambda: None)
    with pytest.raises(CalibrationError, match="not available"):
        read_texts("wikitext2")


@requires_shared
def test_named_datasets_and_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    assert HAS_SHARED and SHARED.is_dir()
    c4 = read_texts("c4")
    assert len(c4) == 1480
    first = json.loads((SHARED / "data" / "c4_sample.jsonl").open().readline())
    assert c4[0] == first["prefix"] + first["gold_completion"]
    rows = read_texts("wikitext2")  # one row per line, each ending in "\n" as in the HF dataset
    assert len(rows) == 2891 and rows[0] == " = Robert Boulter = \n"
    tok = AutoTokenizer.from_pretrained(STORIES_DIR, local_files_only=True)
    cal = get_calibration("tinystories", tok, n_samples=16, seq_len=256, seed=0)
    assert cal.input_ids.shape == (16, 256)
    assert int(cal.input_ids.max()) < 512
    assert cal.record["source"] == "tinystories" and cal.record["n_tokens"] > 16 * 256
