"""Tensor-at-a-time checkpoint I/O for models larger than memory.

- :class:`InputShards`: a float safetensors checkpoint (one file or shards with an index) read one
  tensor at a time (``safe_open``), with a fingerprint of what is on disk.
- :func:`write_safetensors`: a safetensors file written from tensors fetched one at a time, laid out
  byte for byte as ``safetensors.torch.save_file`` lays it out (header, then the tensors sorted by
  dtype and name), so a streamed checkpoint equals one saved from memory.
- :func:`part_tensors`: where each tensor of a safetensors file lies, to copy it without loading
  the file.
- :func:`write_shards`: a checkpoint's weight files (shards planned as :func:`qcore.checkpoint.save`
  plans them) from such sources; peak memory is one tensor.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcore.checkpoint.atomic import write_json
from qcore.checkpoint.format import INDEX_FILE, SHARD_PATTERN, SINGLE_FILE, sha256, weight_files
from qcore.checkpoint.saving import plan_shards
from qcore.plugin.errors import CheckpointError

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_COPY_CHUNK = 1 << 24
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype, shape and a function returning its bytes' owner."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor | RawTensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RawTensor:
    """A tensor's bytes inside a safetensors file: copied in chunks, never loaded whole."""

    path: Path
    start: int
    end: int

    def copy_to(self, out: Any) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.end - self.start
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{self.path} ended early: the file is truncated; delete it and rerun")
                out.write(chunk)
                left -= len(chunk)


# -- the safetensors layout -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _dtype_rank() -> dict[str, int]:
    """The order in which the installed safetensors writes dtypes (asked once, with 1-element tensors)."""
    from safetensors.torch import save

    data = save({f"t{i}": torch.zeros(1, dtype=dt) for i, dt in enumerate(_DTYPE_NAMES)})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    ordered = sorted((v["data_offsets"][0], v["dtype"]) for k, v in header.items() if k != "__metadata__")
    return {dt: i for i, (_, dt) in enumerate(ordered)}


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    rank = _dtype_rank()
    order = sorted(specs, key=lambda s: (rank[_dtype_name(s.dtype)], s.name))
    head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in order:
        head[s.name] = {"dtype": _dtype_name(s.dtype), "shape": list(s.shape),
                        "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"streamed checkpoints cannot hold {dtype} tensors; quantize in memory") from None


def _write_tensor(out: Any, spec: TensorSpec) -> None:
    value = spec.fetch()
    if isinstance(value, RawTensor):
        if value.end - value.start != spec.nbytes:
            raise CheckpointError(f"{value.path}: tensor {spec.name} holds {value.end - value.start} bytes, "
                                  f"expected {spec.nbytes}; the file is damaged: delete it and rerun")
        value.copy_to(out)
        return
    if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
        raise CheckpointError(f"tensor {spec.name} is {value.dtype} {tuple(value.shape)}, expected "
                              f"{spec.dtype} {spec.shape}")
    flat = value.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    out.write(memoryview(flat.numpy()))


def write_safetensors(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """Write ``specs`` to ``path`` as ``safetensors.torch.save_file`` would, one tensor at a time."""
    header, order = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for spec in order:
            _write_tensor(f, spec)


def part_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], RawTensor]]:
    """``{name: (dtype name, shape, bytes)}`` of a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path} ({exc}); the file is damaged: "
                              "delete it and rerun") from None
    base = 8 + n
    return {k: (v["dtype"], tuple(v["shape"]), RawTensor(path, base + v["data_offsets"][0], base + v["data_offsets"][1]))
            for k, v in header.items() if k != "__metadata__"}


def write_shards(specs: list[TensorSpec], directory: Path, max_bytes: int,
                 metadata: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Weight files of ``specs`` (in state-dict order) as :func:`qcore.checkpoint.save` writes them:
    the same shard plan, names and index; returns ``{file: {bytes, sha256}}``."""
    by_name = {s.name: s for s in specs}
    shards = plan_shards({s.name: s.nbytes for s in specs}, max_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [SHARD_PATTERN.format(index=i + 1, total=len(shards)) for i in range(len(shards))])
    files: dict[str, dict[str, Any]] = {}
    for fname, keys in zip(names, shards):
        fpath = directory / fname
        write_safetensors(fpath, [by_name[k] for k in keys], METADATA if metadata is None else metadata)
        files[fname] = {"bytes": fpath.stat().st_size, "sha256": sha256(fpath)}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
        write_json(directory / INDEX_FILE, index, sort_keys=True)
    return files


# -- the input checkpoint ---------------------------------------------------------------------------
class InputShards:
    """The tensors of a float safetensors checkpoint folder, read one at a time."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.files = weight_files(self.root)
        bad = [f for f in self.files if not f.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{self.root}: streaming reads safetensors only, not {', '.join(bad)}")
        self.where: dict[str, str] = {}
        self.layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        for fname in self.files:
            for key, (dtype, shape, _) in part_tensors(self.root / fname).items():
                self.where[key] = fname
                self.layout[key] = (dtype, shape)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``key`` read from its file (cast to ``dtype`` when given)."""
        from safetensors import safe_open

        fname = self.where.get(key)
        if fname is None:
            raise CheckpointError(f"{self.root} has no tensor {key}; the checkpoint does not match its "
                                  "config.json (or is incomplete)")
        # opened per tensor: a kept handle maps the whole shard, and every page read stays resident
        with safe_open(str(self.root / fname), framework="pt", device="cpu") as handle:
            t = handle.get_tensor(key)
            return t.clone() if dtype is None or t.dtype == dtype else t.to(dtype)  # owned, not the file's pages

    def close(self) -> None:
        """Nothing is held open between reads (kept for symmetry with the callers' ``finally``)."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the checkpoint on disk: config.json's hash, each weight file's size and
        modification time, and the hash of the tensor layout (names, dtypes, shapes)."""
        files = {}
        for fname in self.files:
            st = (self.root / fname).stat()
            files[fname] = [st.st_size, st.st_mtime_ns]
        layout = json.dumps(sorted((k, v[0], list(v[1])) for k, v in self.layout.items()))
        cfg = self.root / "config.json"
        return {"path": str(self.root.resolve()),
                "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None,
                "files": files, "layout_sha256": hashlib.sha256(layout.encode()).hexdigest()}


def iter_dtype_names() -> Iterator[tuple[torch.dtype, str]]:
    """The dtypes streamed files can hold, with their safetensors names."""
    yield from _DTYPE_NAMES.items()


def dtype_of(name: str) -> torch.dtype:
    return _NAME_DTYPES[name]
