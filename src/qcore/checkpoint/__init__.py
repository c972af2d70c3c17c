"""qcore's checkpoint format: safetensors + JSON only (never pickle), every write atomic.

- :mod:`~qcore.checkpoint.atomic`: the one atomic writer (folders, single files, JSON) and the
  rules for which folders may be replaced.
- :mod:`~qcore.checkpoint.format`: file names, format versions, reading and checking what is on disk.
- :mod:`~qcore.checkpoint.serializers`: module types stored as JSON + tensors (``QuantLinear``,
  plugins' modules).
- :mod:`~qcore.checkpoint.saving` / :mod:`~qcore.checkpoint.loading`: :func:`save` and :func:`load`;
  :mod:`~qcore.checkpoint.skeleton`: the model of a config without its float weights.
- :mod:`~qcore.checkpoint.describe`: what ``qcore info`` prints.
"""
from __future__ import annotations

from qcore.checkpoint.atomic import (
    MARKER_FILE,
    OLD_INFIX,
    TMP_INFIX,
    atomic_dir,
    atomic_file,
    check_target,
    clean_leftovers,
    model_sources,
    read_marker,
    write_json,
)
from qcore.checkpoint.describe import describe_checkpoint, format_info
from qcore.checkpoint.format import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    QUANT_LINEAR_TYPE,
    SINGLE_FILE,
    read_tensors,
    weight_files,
)
from qcore.checkpoint.loading import load, load_tokenizer
from qcore.checkpoint.saving import dedupe_tied, parse_size, plan_shards, save
from qcore.checkpoint.serializers import serializer_for, serializer_named, serializers

__all__ = [
    "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "INDEX_FILE", "MARKER_FILE", "OLD_INFIX", "QUANT_LINEAR_TYPE",
    "SINGLE_FILE", "TMP_INFIX", "atomic_dir", "atomic_file", "check_target",
    "clean_leftovers", "dedupe_tied", "describe_checkpoint", "format_info", "load", "load_tokenizer",
    "model_sources", "parse_size", "plan_shards", "read_marker", "read_tensors", "save", "serializer_for",
    "serializer_named", "serializers", "weight_files", "write_json",
]
