"""Save and load quantized models: safetensors shards + JSON, atomic writes, no pickle ever.

On-disk layout of a qcore checkpoint directory::

    config.json                    # model.config + "quantization_config" (the qcore record)
    model.safetensors              # or model-00001-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json         # when the model has one
    tokenizer files                # when save() was given a tokenizer

``config.json["quantization_config"]`` is ``model.qcore_record`` (format, format_version, the
method chain with each config and plugin version, ``modules``: every quantized module's
``QuantLinear.meta()``, the calibration record, the qcore version) plus ``quant_method: "qcore"``
(so that other tools refuse it clearly) and a ``checkpoint`` section written by :func:`save`:
the byte size and sha256 of every weight file and the tied tensors that are stored once.

:func:`load` builds the model from its config with parameters on the ``meta`` device (buffers
are computed as usual, so non-persistent ones such as rotary ``inv_freq`` are exact), applies
:func:`qcore.arch.introspect.prepare_model`, swaps in empty ``QuantLinear`` modules, then assigns the
tensors read from safetensors. No float weight is materialized.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.plugin.errors import CheckpointError
from qcore.progress import get_logger

log = get_logger("io")

FORMAT = "qcore"
FORMAT_VERSION = 1
"""Newest checkpoint format this qcore writes and reads."""

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in Python's pickle format: never opened (unpickling runs arbitrary code)."""

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_SIZE_UNITS: dict[str, int] = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}

_CONVERT_HINT = (
    "convert it once, in an environment you trust, with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), "
    "then quantize OUT with qcore"
)


# -- small pure helpers ---------------------------------------------------------------------------
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


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file (module-level so tests can inject failures)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- save -----------------------------------------------------------------------------------------
def save(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None,
         max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Write a quantized ``model`` (and ``tokenizer``) to directory ``path``, atomically.

    Everything is written into a temporary directory beside ``path`` and renamed into place, so
    a failure leaves any earlier checkpoint at ``path`` intact. An existing ``path`` is replaced
    only when qcore wrote it and ``overwrite`` is True; the folder the model was read from never
    is (:func:`check_target`). Returns the resolved path.
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
        qconfig["checkpoint"]["files"] = files
        config_dict = json.loads(config.to_json_string(use_diff=False))
        config_dict["architectures"] = [type(model).__name__]  # the class these tensors belong to
        config_dict["quantization_config"] = qconfig
        _write_json(config_dict, tmp / CONFIG_FILE)
        gen = getattr(model, "generation_config", None)
        if gen is not None and _can_generate(model):
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    target = Path(path).expanduser().absolute()
    log.info("saved %s (%d weight file(s), %d quantized modules)", target, len(files),
             len(qconfig["modules"]))
    return target


MARKER_FILE = ".qcore-written.json"
"""Written last into every folder qcore creates: what wrote it and the files it holds. Only a
folder carrying it (and holding nothing else) may be replaced, and only when asked to."""
TMP_INFIX = ".qcore-tmp-"
OLD_INFIX = ".qcore-old-"


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a folder qcore wrote, or None (no marker, or not one of qcore's)."""
    try:
        data = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == "qcore" else None


def _foreign_entries(path: Path, marker: dict[str, Any]) -> list[str]:
    """Entries of a qcore-written folder that qcore did not write there (the user's)."""
    ours = set(marker.get("files", [])) | {MARKER_FILE}
    return sorted(e.name for e in path.iterdir() if e.name not in ours)


def check_target(path: str | os.PathLike[str], overwrite: bool = False,
                 inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse an output folder whose writing could delete anything of the user's.

    Allowed: a path that does not exist, an empty folder, or (only with ``overwrite``) a folder
    that qcore wrote (its marker lists every entry in it). Never a model being read (``inputs``),
    a folder containing one, the current directory or one of its parents. Returns the absolute
    target; raises :class:`CheckpointError` with the reason and the fix otherwise.
    """
    target = Path(path).expanduser().absolute()
    resolved = target.resolve()
    for src in inputs:
        s = Path(src).expanduser().resolve()
        if resolved == s or resolved in s.parents:
            raise CheckpointError(f"{target} is (or contains) the input model {src}; writing there would "
                                  "delete it: pass another output folder")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(f"{target} is the current directory or one of its parents; qcore writes a "
                              "whole folder: pass a new folder, e.g. --out out/model-q4")
    if not target.exists():
        return target
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is a file; qcore writes a folder: pass a new folder")
    entries = sorted(e.name for e in target.iterdir())
    if not entries:
        return target
    marker = read_marker(target)
    if marker is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(f"{target} exists and was not written by qcore (it holds {shown}); refusing to "
                              "replace it: pass a new or empty folder")
    foreign = _foreign_entries(target, marker)
    if foreign:
        raise CheckpointError(f"{target} was written by qcore but now also holds {', '.join(foreign[:5])}, "
                              "which qcore did not write; refusing to replace it: move those files out or "
                              "pass another folder")
    if not overwrite:
        raise CheckpointError(f"{target} already holds a qcore {marker.get('kind', 'output')}; pass "
                              "overwrite=True (--overwrite on the command line) to replace it, or pick "
                              "another folder")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_leftovers(target: Path) -> list[Path]:
    """Delete what interrupted writes of ``target`` left beside it: temporary folders of
    processes that are gone, and a moved-aside earlier version once ``target`` exists again.
    A moved-aside version is the only copy while ``target`` is missing: it is kept and reported
    (by :func:`load` too). Returns what was removed."""
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(f".{target.name}{TMP_INFIX}*"):
        pid = tmp.name.removeprefix(f".{target.name}{TMP_INFIX}").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and read_marker(tmp) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    old = sorted(parent.glob(f".{target.name}{OLD_INFIX}*"))
    if old and target.is_dir():
        for o in old:
            shutil.rmtree(o, ignore_errors=True)
            removed.append(o)
    elif old:
        log.warning("%s is missing but an interrupted write left its earlier version at %s: rename it back",
                    target, old[-1])
    for r in removed:
        log.info("removed %s, left by an interrupted write", r)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False, kind: str = "checkpoint",
               inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success qcore's marker is added, the files
    are synced and the folder is renamed to ``path``, on failure it is deleted, leaving ``path``
    as it was. Only a folder qcore wrote may be replaced, and only with ``overwrite``
    (:func:`check_target`). Permissions follow the umask."""
    target = check_target(path, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_INFIX}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        mask = _umask()
        files = sorted(f.name for f in tmp.iterdir())
        _write_json({"writer": "qcore", "kind": kind, "files": files}, tmp / MARKER_FILE)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
                _fsync_file(f)
        os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        check_target(target, overwrite, inputs)  # again: the folder may have changed meanwhile
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_sources(model: nn.Module) -> tuple[str, ...]:
    """Local folders ``model`` was read from (its ``name_or_path``), which no write may replace."""
    src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return (str(src),) if src and Path(str(src)).expanduser().is_dir() else ()


def _can_generate(model: nn.Module) -> bool:
    fn = getattr(model, "can_generate", None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:  # noqa: BLE001 - a model that cannot answer does not generate
        return False


def _state_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    meta = [n for n, t in state.items() if t.device.type == "meta"]
    if meta:
        raise CheckpointError(f"cannot save: {len(meta)} tensor(s) are on the meta device (never "
                              f"materialized), e.g. {', '.join(meta[:3])}; load or compute them first")
    return {n: t.detach() if t.device.type == "cpu" else t.detach().cpu() for n, t in state.items()}


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
        files[fname] = {"bytes": fpath.stat().st_size, "sha256": _sha256(fpath)}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
        _write_json(index, directory / INDEX_FILE)
    return files


def _quantization_config(model: nn.Module, record: dict[str, Any], tied: dict[str, str]) -> dict[str, Any]:
    import qcore

    from qcore.quant.linear import QuantLinear

    try:
        qc = json.loads(json.dumps(record))  # a JSON-able deep copy
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model.qcore_record cannot be written as JSON ({exc}); a method recorded a "
                              "non-JSON value: record plain numbers, strings, lists and dicts") from None
    qc.setdefault("format", FORMAT)
    qc.setdefault("format_version", FORMAT_VERSION)
    qc.setdefault("qcore_version", qcore.__version__)
    qc.setdefault("chain", [])
    # The modules that are QuantLinear in the model are the truth: load rebuilds exactly these
    # (keeping any extra per-module keys a method recorded).
    recorded = qc.get("modules") or {}
    qc["modules"] = {n: {**recorded.get(n, {}), **m.meta()}
                     for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    stale = sorted(set(recorded) - set(qc["modules"]))
    if stale:
        log.warning("qcore_record lists %d module(s) that are not QuantLinear in the model (e.g. %s); "
                    "they are saved as they are now", len(stale), stale[0])
    qc["quant_method"] = FORMAT
    qc["checkpoint"] = {"files": {}, "tied": tied}
    return qc


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(parent)
        return
    old = parent / f".{target.name}{OLD_INFIX}{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


# -- load -----------------------------------------------------------------------------------------
def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         *, with_tokenizer: bool = False, verify: bool = True) -> Any:
    """Rebuild a model saved by :func:`save` without materializing float weights.

    ``dtype`` casts the float (non-quantized) parameters; ``verify`` checks each weight file's
    sha256 against the one recorded at save time. With ``with_tokenizer=True`` returns
    ``(model, tokenizer)``.
    """
    root = _checkpoint_dir(path)
    files = weight_files(root)
    config_dict = read_config(root)
    qconfig = quantization_config(config_dict, root)
    ckpt = qconfig.get("checkpoint", {})
    _check_files(root, files, ckpt.get("files", {}), verify)

    model = _build_empty(config_dict, root, dtype)
    from qcore.arch.introspect import prepare_model

    prepare_model(model)
    _swap_quant_modules(model, qconfig.get("modules", {}), root)
    state = read_tensors(root, files, device)
    _assign(model, state, ckpt.get("tied", {}), root)
    if dtype is not None:
        _cast_float_params(model, dtype)
    model.to(device)
    _post_load(model)
    model.eval()
    model.qcore_record = {k: v for k, v in qconfig.items() if k not in ("checkpoint", "quant_method")}
    if with_tokenizer:
        return model, load_tokenizer(root)
    return model


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved beside a checkpoint (``save(..., tokenizer=tok)``)."""
    root = _checkpoint_dir(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {root}: pass tokenizer= to qcore.save, or load the "
                              "tokenizer of the original model with AutoTokenizer.from_pretrained")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:  # noqa: BLE001 - any failure: name the directory
        raise CheckpointError(f"cannot load the tokenizer in {root} ({type(exc).__name__}: {exc}); "
                              "re-save the checkpoint with a working tokenizer") from exc


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser()
    if root.is_dir():
        return root
    if root.exists():
        raise CheckpointError(f"{root} is a file; qcore.load takes the checkpoint directory that "
                              "qcore.save wrote")
    leftovers = sorted(root.parent.glob(f".{root.name}{OLD_INFIX}*")) if root.parent.is_dir() else []
    if leftovers:
        raise CheckpointError(f"{root} does not exist, but an interrupted save left the previous "
                              f"checkpoint at {leftovers[-1]}: rename it back to {root.name}")
    raise CheckpointError(f"{root} does not exist: pass the directory that qcore.save wrote")


def weight_files(root: Path) -> list[str]:
    """The safetensors files of a checkpoint (index order when sharded); refuses pickle-only dirs."""
    index = root / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; the index is corrupt: re-save the checkpoint")
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{root} is missing shard(s) {', '.join(missing)} listed in {INDEX_FILE} "
                                  "(incomplete copy or download): copy every shard, or re-save the checkpoint")
        return names
    if (root / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if pickles and not shards:
        raise CheckpointError(f"{root} holds only pickle weight files ({', '.join(pickles)}); qcore only "
                              f"loads safetensors because unpickling can run arbitrary code: {_CONVERT_HINT}")
    if shards:
        return shards
    raise CheckpointError(f"no weights in {root} (no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors): "
                          "pass a directory written by qcore.save, or re-save it")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}); the file is corrupt or truncated: re-save the checkpoint") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; the file is corrupt: re-save the checkpoint") from None


def read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG_FILE}, so it is not a qcore checkpoint: pass a "
                              "directory written by qcore.save")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object; it is corrupt: "
                              "re-save the checkpoint")
    return data


_FOREIGN_HINTS: dict[str, str] = {
    "gptq": "GPTQ (AutoGPTQ / GPTQModel / optimum)", "awq": "AWQ (AutoAWQ)",
    "compressed-tensors": "compressed-tensors (llm-compressor)", "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ", "quanto": "optimum-quanto", "torchao": "torchao", "fp8": "FP8", "exl2": "ExLlamaV2",
}


def quantization_config(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """The qcore record in ``config.json``, or a CheckpointError naming what was found instead."""
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(
            f"{root} is a float Hugging Face checkpoint (config.json has no quantization_config), not a "
            "qcore checkpoint: quantize it with qcore.quantize (or `qcore quantize`), or load it with "
            "transformers' from_pretrained")
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config in {root / CONFIG_FILE} is a {type(qc).__name__}, "
                              "not an object; the file is corrupt: re-save the checkpoint")
    fmt = qc.get("format")
    if fmt != FORMAT:
        method = str(qc.get("quant_method", "?"))
        tool = _FOREIGN_HINTS.get(method.lower(), f"quant_method={method!r}")
        raise CheckpointError(
            f"{root} was quantized by another tool ({tool}, format={fmt!r}), not by qcore; qcore loads "
            "only its own checkpoints: load it with that tool or transformers, or quantize the float "
            "model with qcore")
    version = qc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"quantization_config in {root / CONFIG_FILE} has no valid format_version "
                              f"({version!r}); the file is corrupt: re-save the checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{root} uses qcore checkpoint format {version}, newer than this qcore reads "
                              f"({FORMAT_VERSION}): upgrade qcore (saved by qcore {qc.get('qcore_version')})")
    if not isinstance(qc.get("modules", {}), dict):
        raise CheckpointError(f"quantization_config.modules in {root / CONFIG_FILE} is not an object; "
                              "the file is corrupt: re-save the checkpoint")
    return qc


def _check_files(root: Path, files: list[str], recorded: dict[str, dict[str, Any]], verify: bool) -> None:
    """Sizes (always) and sha256 (when ``verify``) of the weight files against the save record."""
    for name in files:
        info = recorded.get(name)
        if not info:
            continue
        size = (root / name).stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise CheckpointError(f"{root / name} has {size} bytes but {info['bytes']} were saved: the file "
                                  "is truncated or was replaced: copy it again or re-save the checkpoint")
        if verify and "sha256" in info and _sha256(root / name) != info["sha256"]:
            raise CheckpointError(f"{root / name} does not match the sha256 recorded at save time: the file "
                                  "is corrupt: copy it again or re-save the checkpoint (verify=False skips this)")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers are computed as usual.

    Non-persistent buffers (rotary ``inv_freq``, causal masks) are not in the checkpoint, so they
    must be computed by the modules' own ``__init__``: building under ``torch.device("meta")``
    would leave them empty.
    """
    register = nn.Module.register_parameter
    owner = threading.get_ident()

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
            cls = type(module._parameters[name])
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = cls(module._parameters[name].to("meta"), **kwargs)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _model_class(config: Any, root: Path) -> Any:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    if getattr(config, "architectures", None):
        raise CheckpointError(f"{root}: transformers {transformers.__version__} has no model class "
                              f"{config.architectures}; upgrade transformers (custom code is not loaded)")
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


def _build_empty(config_dict: dict[str, Any], root: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model of ``config.json`` with its parameters on meta."""
    import transformers
    from transformers import CONFIG_MAPPING

    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{root / CONFIG_FILE}: model_type {model_type!r} is unknown to transformers "
                              f"{transformers.__version__}: upgrade transformers")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(d)
    except Exception as exc:  # noqa: BLE001 - bad config values
        raise CheckpointError(f"{root / CONFIG_FILE} cannot be read as a {model_type} config "
                              f"({type(exc).__name__}: {exc}): re-save the checkpoint") from exc
    cls = _model_class(config, root)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with params_on_meta():
        if cls.__name__.startswith("AutoModel"):
            return cls.from_config(config, **kwargs)
        return cls._from_config(config, **kwargs)


def _swap_quant_modules(model: nn.Module, modules: dict[str, dict[str, Any]], root: Path) -> None:
    from qcore.quant.linear import QuantLinear

    for name, meta in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, leaf)
        except AttributeError:
            raise CheckpointError(f"{root}: the quantized module {name!r} does not exist in the "
                                  f"{type(model).__name__} built from config.json; the checkpoint does not "
                                  "match its config: re-save it") from None
        in_f = getattr(old, "in_features", None)
        out_f = getattr(old, "out_features", None)
        if (in_f, out_f) != (meta.get("in_features"), meta.get("out_features")):
            raise CheckpointError(f"{root}: {name} is {in_f}x{out_f} (in x out) in the model built from "
                                  f"config.json but {meta.get('in_features')}x{meta.get('out_features')} in "
                                  "quantization_config.modules; the checkpoint is inconsistent: re-save it")
        try:
            new = QuantLinear.from_meta(meta, device="meta")
        except Exception as exc:  # noqa: BLE001 - a meta dict from another version
            raise CheckpointError(f"{root}: cannot rebuild quantized module {name} from {meta} "
                                  f"({type(exc).__name__}: {exc}); upgrade qcore or re-save") from exc
        setattr(parent, leaf, new)


def read_tensors(root: Path, files: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files, with errors that name the bad file."""
    from safetensors import safe_open

    dev = str(torch.device(device))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = root / name
        try:
            with safe_open(str(path), framework="pt", device=dev) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key in state:
                        raise CheckpointError(f"tensor {key} appears in two weight files of {root} (the "
                                              f"second is {name}); re-save the checkpoint")
                    state[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors
            raise CheckpointError(f"cannot read {path}: {exc}; the file is truncated or corrupt: copy it "
                                  "again or re-save the checkpoint") from exc
    return state


def _assign(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str], root: Path) -> None:
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state) - set(tied))
    unexpected = sorted(set(state) - expected)
    if missing:
        raise CheckpointError(f"{root} lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{', '.join(missing[:5])}: the checkpoint is truncated or incomplete; re-save it")
    if unexpected:
        raise CheckpointError(f"{root} has {len(unexpected)} tensor(s) the model built from config.json does not, "
                              f"e.g. {', '.join(unexpected[:5])}; the checkpoint does not match its config: re-save it")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the tensors in {root} do not fit the model built from config.json ({exc}); "
                              "re-save the checkpoint") from exc
    for dropped, kept in tied.items():
        _set_tensor(model, dropped, _get_tensor(model, kept))
    on_meta = [n for n, t in _all_tensors(model) if t.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"{root}: {len(on_meta)} tensor(s) were not in the checkpoint, e.g. "
                              f"{', '.join(on_meta[:5])}: it is truncated or incomplete; re-save it")


def _all_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent), leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if leaf in parent._parameters:
        parent._parameters[leaf] = value  # type: ignore[assignment]
    elif leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        setattr(parent, leaf, value)


def _cast_float_params(model: nn.Module, dtype: torch.dtype) -> None:
    from qcore.quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
    model.config.dtype = dtype


def _post_load(model: nn.Module) -> None:
    """Let quantized modules rebuild derived state (e.g. kernel layouts) from their loaded buffers."""
    from qcore.quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            hook = getattr(module, "post_load", None)
            if callable(hook):
                hook()


# -- sizes / `qcore info` -------------------------------------------------------------------------
_DTYPE_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
                                "U64": 8}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _layer_row(name: str, kind: str, nbytes: int, fp16_bytes: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "bytes": int(nbytes), "fp16_bytes": int(fp16_bytes), **extra}


def _summarize(layers: list[dict[str, Any]], source: str, record: dict[str, Any]) -> dict[str, Any]:
    def total(rows: list[dict[str, Any]], key: str) -> int:
        return int(sum(r[key] for r in rows))

    quant = [r for r in layers if r["kind"] == "quantized"]
    linear = [r for r in layers if r.get("linear")]
    desc = {
        "source": source,
        "format": record.get("format"),
        "format_version": record.get("format_version"),
        "qcore_version": record.get("qcore_version"),
        "chain": [{"method": c.get("method"), "version": c.get("version"), "config": c.get("config", {})}
                  for c in record.get("chain", [])],
        "layers": layers,
        "quantized_bytes": total(quant, "bytes"), "quantized_fp16_bytes": total(quant, "fp16_bytes"),
        "linear_bytes": total(linear, "bytes"), "linear_fp16_bytes": total(linear, "fp16_bytes"),
        "total_bytes": total(layers, "bytes"), "total_fp16_bytes": total(layers, "fp16_bytes"),
    }
    for key in ("quantized", "linear", "total"):
        ref = desc[f"{key}_fp16_bytes"]
        desc[f"{key}_ratio"] = desc[f"{key}_bytes"] / ref if ref else None
    return desc


def _quant_row(name: str, meta: dict[str, Any], nbytes: int, shape_bias: bool) -> dict[str, Any]:
    out_f, in_f = int(meta.get("out_features", 0)), int(meta.get("in_features", 0))
    fp16 = 2 * (out_f * in_f + (out_f if shape_bias else 0))
    return _layer_row(name, "quantized", nbytes, fp16, linear=True, bits=meta.get("bits"),
                      group_size=meta.get("group_size"), sym=meta.get("sym"), shape=[out_f, in_f])


def describe_checkpoint(path_or_model: str | os.PathLike[str] | nn.Module) -> dict[str, Any]:
    """Per-layer bits, group size and bytes of a checkpoint directory (read from the file headers
    only) or of a model in memory, with totals against the same tensors in fp16.

    A layer is a module that directly holds tensors. Quantized layers count everything they hold
    (packed codes, scales, zeros, ``g_idx``, bias, and in memory any cached kernel layout); their
    fp16 reference is ``2 * (out * in + bias)``. Float tensors count their own bytes against
    2 bytes per element. Tied tensors count once.
    """
    if isinstance(path_or_model, nn.Module):
        return _describe_model(path_or_model)
    return _describe_dir(Path(path_or_model))


def _describe_dir(root: Path) -> dict[str, Any]:
    from safetensors import safe_open

    root = _checkpoint_dir(root)
    files = weight_files(root)
    qc = quantization_config(read_config(root), root)
    modules: dict[str, dict[str, Any]] = qc.get("modules", {})
    per_module: dict[str, list[tuple[str, list[int], str]]] = {}
    for fname in files:
        try:
            with safe_open(str(root / fname), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    sl = f.get_slice(key)
                    per_module.setdefault(_module_of(key), []).append((key, list(sl.get_shape()), sl.get_dtype()))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read {root / fname}: {exc}; the file is truncated or corrupt: "
                                  "copy it again or re-save the checkpoint") from exc
    layers = []
    for mod, tensors in sorted(per_module.items(), key=lambda kv: _natural_key(kv[0])):
        nbytes = sum(_numel(s) * _DTYPE_BYTES.get(dt, 4) for _, s, dt in tensors)
        if mod in modules:
            has_bias = any(k.endswith(".bias") for k, _, _ in tensors)
            layers.append(_quant_row(mod, modules[mod], nbytes, has_bias))
        else:
            fp16 = sum(_numel(s) * (2 if dt in _FLOAT_CODES else _DTYPE_BYTES.get(dt, 4)) for _, s, dt in tensors)
            is_linear = any(k.endswith(".weight") and len(s) == 2 for k, s, _ in tensors) and _linear_name(mod)
            layers.append(_layer_row(mod, "float", nbytes, fp16, linear=bool(is_linear),
                                     dtype=sorted({dt for _, s, dt in tensors}),
                                     shape=next((s for k, s, _ in tensors if k.endswith(".weight")), None)))
    desc = _summarize(layers, str(root), {k: v for k, v in qc.items() if k != "checkpoint"})
    desc["tied"] = dict(qc.get("checkpoint", {}).get("tied", {}))
    return desc


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_NOT_LINEAR = re.compile(r"(^|\.)(lm_head|embed\w*|wte|wpe|\w*norm\w*|ln_\w+)$")


def _linear_name(module_name: str) -> bool:
    """Heuristic for a header-only view: 2-D weights that are not embeddings, norms or the lm_head."""
    return not _NOT_LINEAR.search(module_name)


def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, persistent buffers and tensor attributes (e.g. cached kernel layouts) of one module."""
    tensors: list[torch.Tensor] = [p for p in module._parameters.values() if p is not None]
    tensors += [b for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    return tensors


def _describe_model(model: nn.Module) -> dict[str, Any]:
    from qcore.quant.linear import QuantLinear

    linear_types: tuple[type, ...] = (nn.Linear,)
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        linear_types += (Conv1D,)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[tuple[str, int]] = set()
    layers = []
    for name, module in model.named_modules():
        fresh = []
        for t in _held_tensors(module):
            key = (t.device.type, t.untyped_storage().data_ptr()) if t.device.type != "meta" else ("meta", id(t))
            if key in seen:
                continue
            seen.add(key)
            fresh.append(t)
        if not fresh:
            continue
        nbytes = sum(t.untyped_storage().nbytes() if t.device.type != "meta" else t.nbytes for t in fresh)
        if isinstance(module, QuantLinear):
            if callable(getattr(module, "resident_bytes", None)):  # includes kernel caches
                nbytes = module.resident_bytes()
            layers.append(_quant_row(name, module.meta(), nbytes, getattr(module, "bias", None) is not None))
        else:
            fp16 = sum(t.numel() * 2 if t.is_floating_point() else t.nbytes for t in fresh)
            is_linear = isinstance(module, linear_types) and module is not out_emb
            layers.append(_layer_row(name, "float", nbytes, fp16, linear=is_linear,
                                     dtype=sorted({str(t.dtype).replace("torch.", "") for t in fresh}),
                                     shape=list(getattr(module, "weight").shape) if hasattr(module, "weight")
                                     and isinstance(module.weight, torch.Tensor) else None))
    record = getattr(model, "qcore_record", None) or {}
    return _summarize(layers, type(model).__name__, record)


inspect_checkpoint = describe_checkpoint
"""The name used in docs/architecture.md."""


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}x"


def format_info(desc: dict[str, Any]) -> str:
    """The text ``qcore info DIR`` prints: one row per layer, then totals against fp16."""
    chain = " + ".join(
        c["method"] + "(" + ", ".join(f"{k}={v}" for k, v in sorted(c["config"].items())
                                      if k not in ("method", "config_version") and (k != "ignore" or v)) + ")"
        for c in desc["chain"]) or "none (float)"
    lines = [f"{desc['source']}: qcore format {desc.get('format_version')}, "
             f"qcore {desc.get('qcore_version')}, chain {chain}"]
    rows = [("layer", "kind", "bits", "group", "shape", "bytes", "fp16 bytes", "ratio")]
    for r in desc["layers"]:
        shape = "x".join(str(s) for s in r["shape"]) if r.get("shape") else "-"
        bits = str(r["bits"]) if r["kind"] == "quantized" else "/".join(r.get("dtype", []))
        group = str(r.get("group_size", "-")) if r["kind"] == "quantized" else "-"
        rows.append((r["name"] or "(root)", r["kind"], bits, group, shape, f"{r['bytes']:,}",
                     f"{r['fp16_bytes']:,}", _ratio(r["bytes"] / r["fp16_bytes"] if r["fp16_bytes"] else None)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j in (0, 1) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    n_quant = sum(1 for r in desc["layers"] if r["kind"] == "quantized")
    lines.append("")
    for dropped, kept in sorted(desc.get("tied", {}).items()):
        lines.append(f"{dropped} is tied to {kept} (stored once)")
    lines.append(f"quantized layers ({n_quant}): {_human(desc['quantized_bytes'])} vs "
                 f"{_human(desc['quantized_fp16_bytes'])} fp16 ({_ratio(desc['quantized_ratio'])})")
    lines.append(f"all linear layers: {_human(desc['linear_bytes'])} vs {_human(desc['linear_fp16_bytes'])} "
                 f"fp16 ({_ratio(desc['linear_ratio'])})")
    lines.append(f"total: {_human(desc['total_bytes'])} vs {_human(desc['total_fp16_bytes'])} fp16 "
                 f"({_ratio(desc['total_ratio'])})")
    return "\n".join(lines)
