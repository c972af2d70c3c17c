"""Calibration data: texts -> ``n_samples`` token windows of ``seq_len``, plus a record.

Sources (:func:`read_texts`): a list of strings; a text file (one text); a ``.jsonl`` file (each
line ``{"text": ...}`` or ``{"prefix": ..., "gold_completion": ...}``, the two concatenated as in
C4 samples); a directory of ``.txt`` files; a ``datasets.Dataset`` with a ``text`` column
(duck-typed: qcore does not depend on ``datasets``); the names ``wikitext2``, ``c4``,
``tinystories``, ``shakespeare`` (files of the development ``../shared/data`` folder, when
present; ``wikitext2`` is read one row per line); or ``None``: the standard library's ``pydoc_data.topics`` (~465 KB of English
technical prose that every Python installation has).

Sampling protocol (:func:`get_calibration`): texts are joined with ``"\\n\\n"`` and tokenized
ONCE with the model's tokenizer (its default special tokens, e.g. one BOS at the very start);
then ``n_samples`` *disjoint* windows of ``seq_len`` tokens are placed at random positions with
a ``torch.Generator`` seeded by ``seed`` (so no token is used twice) and returned in random
order. This needs at least ``n_samples * seq_len`` tokens; fewer is a :class:`CalibrationError`.

Importing this module does not import torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcore.plugin.errors import CalibrationError

if TYPE_CHECKING:
    from torch import Tensor

TEXT_SEPARATOR = "\n\n"
"""How texts are joined before tokenization (calibration and perplexity alike)."""

SHARED_DATA_FILES: dict[str, str] = {
    "wikitext2": "wikitext2_raw_test.txt",
    "c4": "c4_sample.jsonl",
    "tinystories": "tinystories_train_head.txt",
    "shakespeare": "tinyshakespeare.txt",
}
"""Dataset names -> files of the development ``shared/data`` folder."""
ROW_PER_LINE: frozenset[str] = frozenset({"wikitext2"})
"""Named datasets stored one row per line (WikiText-2 raw test, empty rows removed): each line
is a row ending in ``"\n"`` as in the HF dataset, so joining rows with ``"\n\n"`` follows the
GPTQ/AWQ/QuaRot evaluation protocol."""

SHARED_ENV = "QCORE_SHARED_DIR"
DEFAULT_SOURCE = "pydoc_data.topics"


@dataclass
class CalibrationData:
    """Calibration windows ``input_ids`` (LongTensor ``[n_samples, seq_len]``) and their record."""

    input_ids: Tensor
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> list[Tensor]:
        """The windows split into batches of at most ``batch_size`` rows."""
        return list(self.input_ids.split(max(1, int(batch_size)), dim=0))


# -- sources ---------------------------------------------------------------------------------------
def shared_dir() -> Path | None:
    """The development ``shared`` folder (``$QCORE_SHARED_DIR``, or ``../shared`` next to the
    project or the working directory); ``None`` on a user's machine."""
    env = os.environ.get(SHARED_ENV)
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / ".." / "shared", Path.cwd() / ".." / "shared"]
    for cand in candidates:
        if (cand / "data").is_dir() or (cand / "models").is_dir():
            return cand.resolve()
    return None


def resolve_dataset_name(name: str) -> Path:
    """Path of a named dataset (``wikitext2``, ``c4``, ``tinystories``, ``shakespeare``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SHARED_DATA_FILES:
        raise CalibrationError(f"unknown dataset name '{name}'; known names: {', '.join(SHARED_DATA_FILES)}")
    root = shared_dir()
    path = root / "data" / SHARED_DATA_FILES[key] if root else None
    if path is None or not path.is_file():
        raise CalibrationError(
            f"dataset '{name}' is not available on this machine (it is looked up as "
            f"shared/data/{SHARED_DATA_FILES[key]}; set {SHARED_ENV} to a folder holding data/). "
            "Pass your own text instead: a .txt or .jsonl file, a directory of .txt files, or a "
            "list of strings; or pass no source to use the built-in default (pydoc_data.topics)"
        )
    return path


def _read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("prefix"), str):
                texts.append(row["prefix"] + str(row.get("gold_completion", "")))
            else:
                raise CalibrationError(
                    f"{path}:{lineno} has no 'text' field (nor 'prefix'/'gold_completion'); "
                    "write one JSON object per line with a 'text' string"
                )
    return texts


def _read_file(path: Path) -> str:
    """The UTF-8 text of ``path``; any failure is a CalibrationError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"text file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                               "convert it to UTF-8 or pass another file") from None
    except OSError as exc:
        raise CalibrationError(f"cannot read text file {path}: {exc.strerror or exc}; check the path and "
                               "its permissions") from None


def _read_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CalibrationError(f"directory {path} holds no .txt files; put text files there or pass a file")
        texts = [_read_file(p) for p in files]
        what = f"the .txt files of directory {path}"
    elif path.suffix.lower() == ".jsonl":
        try:
            texts = _read_jsonl(path)
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it "
                                   "to UTF-8") from None
        except OSError as exc:
            raise CalibrationError(f"cannot read {path}: {exc.strerror or exc}; check the path and its "
                                   "permissions") from None
        what = f"{path}"
    else:
        texts = [_read_file(path)]
        what = f"text file {path}"
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"{what} holds no text (empty or only whitespace); give a file with text")
    return texts


def _default_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def describe_source(source: Any) -> str:
    """A short, JSON-able description of a calibration source for the record."""
    if source is None:
        return DEFAULT_SOURCE
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        key = s.lower().replace("-", "").replace("_", "")
        if key in SHARED_DATA_FILES and not Path(s).exists():
            return key
        return s
    if isinstance(source, (list, tuple)):
        return f"list of {len(source)} texts"
    if hasattr(source, "column_names"):
        return f"dataset {getattr(source, 'info', None) and getattr(source.info, 'dataset_name', None) or type(source).__name__} ({len(source)} rows)"
    return type(source).__name__


def read_texts(source: Any = None) -> list[str]:
    """The texts of a calibration/evaluation source (see the module docstring for the kinds)."""
    if source is None:
        return _default_texts()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            return _read_path(path)
        key = str(source).lower().replace("-", "").replace("_", "")
        if key in SHARED_DATA_FILES:
            path = resolve_dataset_name(str(source))
            if key in ROW_PER_LINE:
                return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines()]
            return _read_path(path)
        raise CalibrationError(
            f"calibration source '{source}' is neither an existing file or directory nor a known "
            f"dataset name ({', '.join(SHARED_DATA_FILES)}); to calibrate on literal text pass a "
            "list of strings"
        )
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        cols = list(source.column_names)
        if "text" not in cols:
            raise CalibrationError(
                f"the dataset has no 'text' column (columns: {', '.join(cols)}); "
                "rename the text column to 'text' (dataset.rename_column(old, 'text'))"
            )
        return [str(t) for t in source["text"]]
    if isinstance(source, (list, tuple)):
        bad = [i for i, t in enumerate(source) if not isinstance(t, str)]
        if bad:
            raise CalibrationError(
                f"calibration texts must be strings; item {bad[0]} is {type(source[bad[0]]).__name__}"
            )
        return list(source)
    raise CalibrationError(
        f"unsupported calibration source of type {type(source).__name__}; pass a list of strings, a "
        ".txt/.jsonl file, a directory of .txt files, a datasets.Dataset with a 'text' column, a "
        f"dataset name ({', '.join(SHARED_DATA_FILES)}) or None for the default"
    )


# -- tokenization ----------------------------------------------------------------------------------
def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as ONE string, with the tokenizer's default special tokens."""
    if callable(tokenizer):
        try:
            enc = tokenizer(text, verbose=False)
        except TypeError:  # tokenizers without the ``verbose`` keyword
            enc = tokenizer(text)
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise CalibrationError(
            f"cannot tokenize with a {type(tokenizer).__name__}; pass the model's tokenizer "
            "(e.g. from qcore.models.load_model or transformers.AutoTokenizer)"
        )
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched output of one string
        ids = ids[0]
    return [int(i) for i in ids]


def text_sha256(texts: list[str]) -> str:
    return hashlib.sha256(TEXT_SEPARATOR.join(texts).encode("utf-8")).hexdigest()


def window_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """Starts of ``n_samples`` disjoint windows of ``seq_len`` in ``n_tokens``, random order.

    Draw ``n_samples`` offsets uniformly in ``[0, slack]`` (slack = unused tokens), sort them and
    add ``i * seq_len`` to the i-th: consecutive starts differ by at least ``seq_len``.
    """
    import torch

    slack = n_tokens - n_samples * seq_len
    if slack < 0:
        raise ValueError("not enough tokens")
    gen = torch.Generator().manual_seed(int(seed))
    offsets = torch.randint(0, slack + 1, (n_samples,), generator=gen).sort().values
    starts = offsets + torch.arange(n_samples) * seq_len
    order = torch.randperm(n_samples, generator=gen)
    return starts[order].tolist()


def get_calibration(source: Any = None, tokenizer: Any = None, n_samples: int = 128, seq_len: int = 512,
                    seed: int = 0) -> CalibrationData:
    """Tokenize ``source`` once and draw ``n_samples`` disjoint random windows of ``seq_len``."""
    import torch

    if tokenizer is None:
        raise CalibrationError("get_calibration needs the model's tokenizer; pass tokenizer=... "
                               "(qcore.models.load_model returns it)")
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"n_samples and seq_len must be positive (got {n_samples}, {seq_len})")
    texts = read_texts(source)
    text = TEXT_SEPARATOR.join(texts)
    ids = tokenize_text(tokenizer, text)
    needed = n_samples * seq_len
    if len(ids) < needed:
        raise CalibrationError(
            f"calibration source {describe_source(source)} gives {len(ids)} tokens but "
            f"n_samples={n_samples} x seq_len={seq_len} needs {needed}; give more text, or lower "
            f"n_samples or seq_len (e.g. n_samples={max(1, len(ids) // seq_len)} at this seq_len)"
        )
    all_ids = torch.tensor(ids, dtype=torch.long)
    starts = window_starts(len(ids), n_samples, seq_len, seed)
    windows = torch.stack([all_ids[s:s + seq_len] for s in starts])
    record = {
        "source": describe_source(source),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "n_samples": int(n_samples),
        "seq_len": int(seq_len),
        "seed": int(seed),
        "n_tokens": len(ids),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
    }
    return CalibrationData(windows, record)
