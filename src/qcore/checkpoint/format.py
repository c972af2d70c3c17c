"""The checkpoint format: file names, versions, and reading and validating what is on disk.

A qcore checkpoint directory::

    config.json                    # model.config + "quantization_config" (the qcore record)
    model.safetensors              # or model-00001-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json         # when the model has one
    tokenizer files                # when save() was given a tokenizer
    .qcore-written.json            # qcore's marker (qcore.checkpoint.atomic)

``config.json["quantization_config"]`` is ``model.qcore_record`` (format, format_version, the
method chain with each config and plugin version, ``modules``, the calibration record, the qcore
version) plus ``quant_method: "qcore"`` (so that other tools refuse it clearly) and a
``checkpoint`` section: the byte size and sha256 of every weight file and the tied tensors that
are stored once. ``modules`` maps every module whose type has a serializer
(:mod:`qcore.checkpoint.serializers`) to ``{"type": type_name, **serializer.to_json(module)}``,
plus ``"plugin"`` and ``"distribution"`` when a plugin provides the type.

Format 1: every entry is a ``QuantLinear`` (no ``"type"``; qcore writes it as ``"type":
"qcore.quant_linear"``, which format-1 readers ignore). Format 2: entries of other types, which an
older qcore cannot rebuild, so it refuses them with "upgrade qcore".
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from qcore.checkpoint.atomic import OLD_INFIX
from qcore.plugin.errors import CheckpointError

FORMAT = "qcore"
FORMAT_VERSION = 2
"""Newest checkpoint format this qcore writes and reads."""
QUANT_LINEAR_TYPE = "qcore.quant_linear"
"""The serializer type of ``QuantLinear``: that of every ``modules`` entry of format 1."""

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in Python's pickle format: never opened (unpickling runs arbitrary code)."""

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_CONVERT_HINT = (
    "convert it once, in an environment you trust, with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), "
    "then quantize OUT with qcore"
)

_FOREIGN_HINTS: dict[str, str] = {
    "gptq": "GPTQ (AutoGPTQ / GPTQModel / optimum)", "awq": "AWQ (AutoAWQ)",
    "compressed-tensors": "compressed-tensors (llm-compressor)", "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ", "quanto": "optimum-quanto", "torchao": "torchao", "fp8": "FP8", "exl2": "ExLlamaV2",
}


def entry_type(entry: dict[str, Any]) -> str:
    """The serializer type of a ``modules`` entry (format 1 entries are ``QuantLinear``)."""
    return str(entry.get("type", QUANT_LINEAR_TYPE))


def required_version(modules: dict[str, dict[str, Any]]) -> int:
    """The oldest format that rebuilds ``modules``: 1 when all are QuantLinear, else 2."""
    return 1 if all(entry_type(e) == QUANT_LINEAR_TYPE for e in modules.values()) else 2


# -- the directory and its JSON -------------------------------------------------------------------
def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a checkpoint directory, or a CheckpointError saying what is there instead."""
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}); the file is corrupt or truncated: re-save the checkpoint") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; the file is corrupt: re-save the checkpoint") from None


def read_config(root: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint as a dict."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG_FILE}, so it is not a qcore checkpoint: pass a "
                              "directory written by qcore.save")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object; it is corrupt: "
                              "re-save the checkpoint")
    return data


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
        from qcore.formats import IMPORTERS

        if method.lower() in IMPORTERS:
            raise CheckpointError(
                f"{root} was quantized by another tool ({tool}); qcore.load imports it, but this path reads "
                "qcore's own checkpoints only: convert it once with qcore.save(qcore.load(DIR), OUT)")
        raise CheckpointError(
            f"{root} was quantized by another tool ({tool}, format={fmt!r}), not by qcore; qcore loads "
            "only its own checkpoints and GPTQ, AWQ and compressed-tensors ones: load it with that tool "
            "or transformers, or quantize the float model with qcore")
    version = qc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"quantization_config in {root / CONFIG_FILE} has no valid format_version "
                              f"({version!r}); the file is corrupt: re-save the checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{root} uses qcore checkpoint format {version}, newer than this qcore reads "
                              f"({FORMAT_VERSION}): upgrade qcore (saved by qcore {qc.get('qcore_version')})")
    modules = qc.get("modules", {})
    if not isinstance(modules, dict):
        raise CheckpointError(f"quantization_config.modules in {root / CONFIG_FILE} is not an object; "
                              "the file is corrupt: re-save the checkpoint")
    bad = [name for name, entry in modules.items() if not isinstance(entry, dict)]
    if bad:
        raise CheckpointError(f"quantization_config.modules[{bad[0]!r}] in {root / CONFIG_FILE} is not an "
                              "object; the file is corrupt: re-save the checkpoint")
    return qc


# -- weight files ---------------------------------------------------------------------------------
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


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(root: Path, files: list[str], recorded: dict[str, dict[str, Any]], verify: bool) -> None:
    """Sizes (always) and sha256 (when ``verify``) of the weight files against the save record."""
    for name in files:
        info = recorded.get(name)
        if not info:
            continue
        size = (root / name).stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise CheckpointError(f"{root / name} has {size} bytes but {info['bytes']} were saved: the file "
                                  "is truncated or was replaced: copy it again or re-save the checkpoint")
        if verify and "sha256" in info and sha256(root / name) != info["sha256"]:
            raise CheckpointError(f"{root / name} does not match the sha256 recorded at save time: the file "
                                  "is corrupt: copy it again or re-save the checkpoint (verify=False skips this)")


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

