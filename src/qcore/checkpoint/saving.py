"""``save``: a quantized model as safetensors shards + JSON, written atomically. Never pickle."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.checkpoint.atomic import atomic_dir, model_sources, write_json
from qcore.checkpoint.card import portable_name, portable_record, write_card
from qcore.checkpoint.format import (
    CONFIG_FILE,
    FORMAT,
    INDEX_FILE,
    SHARD_PATTERN,
    SINGLE_FILE,
    entry_type,
    required_version,
    sha256,
)
from qcore.checkpoint.serializers import Table, provenance, serializer_for, serializers
from qcore.plugin.errors import CheckpointError
from qcore.plugin.serialize import RESERVED_KEYS
from qcore.progress import get_logger

log = get_logger("io")

_SIZE_UNITS: dict[str, int] = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def save(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None,
         max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Write a quantized ``model`` (and ``tokenizer``) to directory ``path``, atomically.

    Everything is written into a temporary directory beside ``path`` and renamed into place, so
    a failure leaves any earlier checkpoint at ``path`` intact. An existing ``path`` is replaced
    only when qcore wrote it and ``overwrite`` is True; the folder the model was read from never
    is (:func:`qcore.checkpoint.check_target`). Returns the resolved path.
    """
    record = getattr(model, "qcore_record", None)
    if not isinstance(record, dict):
        raise CheckpointError("this model has no qcore_record, so it was not quantized by qcore: run "
                              "qcore.quantize(model, ...) first (save a float model with model.save_pretrained, or "
                              "qcore.models.save_float for one loaded from GGUF)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise CheckpointError(f"{type(model).__name__} has no Hugging Face config; qcore.save needs a "
                              "transformers model (PreTrainedModel)")
    max_bytes = parse_size(max_shard_size)
    state, tied = dedupe_tied(_state_for_save(model))
    qconfig = _quantization_config(model, record, tied)
    with atomic_dir(path, overwrite, "checkpoint", model_sources(model)) as tmp:
        files = _write_weights(state, tmp, max_bytes)
        write_config_files(model, qconfig, files, tmp, tokenizer)
    target = Path(path).expanduser().absolute()
    log.info("saved %s (%d weight file(s), %d serialized modules)", target, len(files),
             len(qconfig["modules"]))
    return target


def write_config_files(model: nn.Module, qconfig: dict[str, Any], files: dict[str, dict[str, Any]], tmp: Path,
                       tokenizer: Any = None) -> None:
    """``config.json`` (with ``quantization_config``), the model card, the generation config and
    the tokenizer of a checkpoint whose weight ``files`` are written in ``tmp``."""
    qconfig["checkpoint"]["files"] = files
    config_dict = json.loads(model.config.to_json_string(use_diff=False))
    config_dict["architectures"] = [type(model).__name__]  # the class these tensors belong to
    if "_name_or_path" in config_dict:  # no path of this machine in the checkpoint
        config_dict["_name_or_path"] = portable_name(config_dict["_name_or_path"])
    config_dict["quantization_config"] = qconfig
    write_json(tmp / CONFIG_FILE, config_dict, sort_keys=True)
    write_card(tmp, config_dict)
    gen = getattr(model, "generation_config", None)
    if gen is not None and _can_generate(model):
        gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


# -- the record -----------------------------------------------------------------------------------
def _quantization_config(model: nn.Module, record: dict[str, Any], tied: dict[str, str]) -> dict[str, Any]:
    import qcore

    try:
        qc = json.loads(json.dumps(record))  # a JSON-able deep copy
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model.qcore_record cannot be written as JSON ({exc}); a method recorded a "
                              "non-JSON value: record plain numbers, strings, lists and dicts") from None
    qc.setdefault("format", FORMAT)
    qc.setdefault("qcore_version", qcore.__version__)
    qc.setdefault("chain", [])
    # The modules of the model are the truth: load rebuilds exactly these (keeping any extra
    # per-module keys a method recorded).
    recorded = qc.get("modules") or {}
    qc["modules"] = module_entries(model, recorded)
    stale = sorted(set(recorded) - set(qc["modules"]))
    if stale:
        log.warning("qcore_record lists %d module(s) that have no serializer in the model (e.g. %s); "
                    "they are saved as they are now", len(stale), stale[0])
    qc["format_version"] = required_version(qc["modules"])
    qc["quant_method"] = FORMAT
    qc["checkpoint"] = {"files": {}, "tied": tied}
    return portable_record(qc)


def module_entries(model: nn.Module, recorded: dict[str, Any] | None = None,
                   table: Table | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"type", **to_json(module), "plugin", "distribution"}}`` of every module of
    ``model`` whose type has a serializer, over the keys ``recorded`` holds for the same type there."""
    table = serializers() if table is None else table
    entries: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ser = serializer_for(module, table)
        if ser is None:
            continue
        data = ser.to_json(module)
        clash = sorted(set(data) & set(RESERVED_KEYS))
        if clash:
            raise CheckpointError(f"serializer {ser.type_name!r} wrote the reserved key(s) {clash} for {name}; "
                                  f"its to_json must not use {list(RESERVED_KEYS)}: fix the plugin")
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"serializer {ser.type_name!r} described {name} with a non-JSON value ({exc}); "
                                  "its to_json must return plain numbers, strings, lists and dicts") from None
        extra = (recorded or {}).get(name, {})
        if entry_type(extra) != ser.type_name:  # recorded for another module once at that name
            extra = {}
        entries[name] = {**extra, **data, "type": ser.type_name, **provenance(ser)}
    return entries


# -- tensors --------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"``, ``"500MB"``, ``"1GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}; use e.g. '2GB'")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise CheckpointError(f"cannot read max_shard_size {size!r}; use a byte count or a string "
                              "such as '2GB', '500MB' or '1GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the same tensor as an earlier name (tied weights).

    Returns the state to write and ``{dropped name: kept name}``. Tensors that only *overlap*
    another's storage (views of one buffer) are cloned, since safetensors refuses shared storage.
    """
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for name, t in state.items():
        key = _tensor_key(t)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        storage = (t.device.type, t.untyped_storage().data_ptr())
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        if storage in storages or not whole:
            t = t.contiguous().clone()
        storages.add(storage)
        out[name] = t
    return out, tied


def _state_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    meta = [n for n, t in state.items() if t.device.type == "meta"]
    if meta:
        raise CheckpointError(f"cannot save: {len(meta)} tensor(s) are on the meta device (never "
                              f"materialized), e.g. {', '.join(meta[:3])}; load or compute them first")
    return {n: t.detach() if t.device.type == "cpu" else t.detach().cpu() for n, t in state.items()}


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file (module-level so tests can inject failures)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_weights(state: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> dict[str, dict[str, Any]]:
    """Write the shards (and the index when there are several); return {file: {bytes, sha256}}."""
    sizes = {n: t.nbytes for n, t in state.items()}
    shards = plan_shards(sizes, max_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [SHARD_PATTERN.format(index=i + 1, total=len(shards)) for i in range(len(shards))])
    files: dict[str, dict[str, Any]] = {}
    for fname, keys in zip(names, shards):
        fpath = directory / fname
        _write_shard({k: state[k] for k in keys}, fpath)
        files[fname] = {"bytes": fpath.stat().st_size, "sha256": sha256(fpath)}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
        write_json(directory / INDEX_FILE, index, sort_keys=True)
    return files


def _can_generate(model: nn.Module) -> bool:
    fn = getattr(model, "can_generate", None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:  # noqa: BLE001 - a model that cannot answer does not generate
        return False
