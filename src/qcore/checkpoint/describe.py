"""What ``qcore info`` prints: per-layer bits, group size and bytes against fp16, each method's
``record()["info"]`` lines and the other serialized module types."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.checkpoint.format import (
    QUANT_LINEAR_TYPE,
    checkpoint_dir,
    entry_type,
    quantization_config,
    read_config,
    weight_files,
)
from qcore.plugin.errors import CheckpointError

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
    errors = record.get("weight_error") or {}  # relative weight error per quantized layer
    for r in quant:
        if r["name"] in errors:
            r["weight_error"] = float(errors[r["name"]])
    desc = {
        "source": source,
        "format": record.get("format"),
        "format_version": record.get("format_version"),
        "qcore_version": record.get("qcore_version"),
        "chain": [{"method": c.get("method"), "version": c.get("version"), "config": c.get("config", {}),
                   "info": [str(line) for line in (c.get("record") or {}).get("info", [])]}
                  for c in record.get("chain", [])],
        "module_types": _module_types(record.get("modules") or {}),
        "layers": layers,
        "budget": record.get("budget"),
        "quantized_bytes": total(quant, "bytes"), "quantized_fp16_bytes": total(quant, "fp16_bytes"),
        "linear_bytes": total(linear, "bytes"), "linear_fp16_bytes": total(linear, "fp16_bytes"),
        "total_bytes": total(layers, "bytes"), "total_fp16_bytes": total(layers, "fp16_bytes"),
    }
    for key in ("quantized", "linear", "total"):
        ref = desc[f"{key}_fp16_bytes"]
        desc[f"{key}_ratio"] = desc[f"{key}_bytes"] / ref if ref else None
    return desc


def _module_types(modules: dict[str, Any]) -> dict[str, int]:
    """How many serialized modules of each type other than quantized linears (input and
    attention transforms, replaced norms...)."""
    counts: dict[str, int] = {}
    for entry in modules.values():
        kind = entry_type(entry)
        if kind and kind != QUANT_LINEAR_TYPE:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


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

    root = checkpoint_dir(root)
    config = read_config(root)
    from qcore.formats import importer_for

    if importer_for(config) is not None:  # another tool's checkpoint that qcore reads: described as loaded
        from qcore.checkpoint.loading import load

        return {**_describe_model(load(root)), "source": str(root)}
    files = weight_files(root)
    qc = quantization_config(config, root)
    modules = {n: e for n, e in qc.get("modules", {}).items() if entry_type(e) == QUANT_LINEAR_TYPE}
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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}x"


INFO_WIDTH = 100
"""Widest layer table of :func:`format_info` in columns (as the CLI's tables)."""
MIN_NAME = 16
"""Layer names are shortened to fit :data:`INFO_WIDTH`, never below this many characters."""


def _elide(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[len(name) - width + 3:]


def format_info(desc: dict[str, Any]) -> str:
    """The text ``qcore info DIR`` prints: one row per layer, then totals against fp16."""
    chain = " + ".join(
        c["method"] + "(" + ", ".join(f"{k}={_option(v)}" for k, v in sorted(c["config"].items())
                                      if k not in ("method", "config_version") and (k != "ignore" or v)) + ")"
        for c in desc["chain"]) or "none (float)"
    lines = [f"{desc['source']}: qcore format {desc.get('format_version')}, "
             f"qcore {desc.get('qcore_version')}, chain {chain}"]
    has_error = any("weight_error" in r for r in desc["layers"])
    rows = [("layer", "kind", "bits", "group", "shape", "bytes", "fp16 bytes", "ratio")
            + (("rel err",) if has_error else ())]
    for r in desc["layers"]:
        shape = "x".join(str(s) for s in r["shape"]) if r.get("shape") else "-"
        bits = str(r["bits"]) if r["kind"] == "quantized" else "/".join(r.get("dtype", []))
        group = str(r.get("group_size", "-")) if r["kind"] == "quantized" else "-"
        rows.append((r["name"] or "(root)", r["kind"], bits, group, shape, f"{r['bytes']:,}",
                     f"{r['fp16_bytes']:,}", _ratio(r["bytes"] / r["fp16_bytes"] if r["fp16_bytes"] else None))
                    + ((f"{r['weight_error']:.4f}" if "weight_error" in r else "-",) if has_error else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    room = INFO_WIDTH - (sum(widths[1:]) + 2 * (len(widths) - 1))  # for the layer names
    if widths[0] > room >= MIN_NAME:  # long names keep their end: "...layers.29.mlp.down_proj"
        rows = [(_elide(row[0], room),) + tuple(row[1:]) for row in rows]
        widths[0] = room
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j in (0, 1) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    n_quant = sum(1 for r in desc["layers"] if r["kind"] == "quantized")
    lines.append("")
    for c in desc["chain"]:  # a method's record()["info"] lines
        lines += [f"{c['method']}: {line}" for line in c.get("info", [])]
    if desc.get("module_types"):
        lines.append("other serialized modules: " + ", ".join(f"{k} x{v}" for k, v in desc["module_types"].items()))
    for dropped, kept in sorted(desc.get("tied", {}).items()):
        lines.append(f"{dropped} is tied to {kept} (stored once)")
    lines.append(f"quantized layers ({n_quant}): {_human(desc['quantized_bytes'])} vs "
                 f"{_human(desc['quantized_fp16_bytes'])} fp16 ({_ratio(desc['quantized_ratio'])})")
    lines.append(f"all linear layers: {_human(desc['linear_bytes'])} vs {_human(desc['linear_fp16_bytes'])} "
                 f"fp16 ({_ratio(desc['linear_ratio'])})")
    lines.append(f"total: {_human(desc['total_bytes'])} vs {_human(desc['total_fp16_bytes'])} fp16 "
                 f"({_ratio(desc['total_ratio'])})")
    if desc.get("budget"):
        from qcore.pipeline.budget import format_budget

        lines.append(format_budget(desc["budget"]))
    return "\n".join(lines)


MAP_SHOWN = 6
"""A per-layer map with more entries is shown as a summary (its layers are in the table)."""


def _option(value: Any) -> str:
    if isinstance(value, dict) and len(value) > MAP_SHOWN:
        counts: dict[Any, int] = {}
        for k, v in value.items():
            if k != "default":
                counts[v] = counts.get(v, 0) + 1
        return ("per-layer map {" + ", ".join(f"{v}: {n} layers" for v, n in sorted(counts.items()))
                + f", default: {value.get('default')}}}")
    return str(value)
