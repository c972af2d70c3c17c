"""Metadata that travels with a checkpoint: portable names, search tags and the model card.

Nothing of the machine that made a checkpoint is written into it: a local path (the model's
``_name_or_path``, the calibration tokenizer's folder) becomes the folder's name, a Hub id stays
as it is (:func:`portable_name`). ``quantization_config["tags"]`` lists the method chain and the
widths for search (:func:`tags`); ``README.md`` is a model card generated from the record
(:func:`model_card`), regenerated when an evaluation is added (:func:`record_evaluation`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qcore.checkpoint.atomic import atomic_file, write_json
from qcore.checkpoint.format import CONFIG_FILE, read_config

CARD_FILE = "README.md"
"""The model card's file name in a checkpoint (the Hub shows it)."""
LIBRARY_TAG = "qcore"
WEIGHT_KEYS: tuple[str, ...] = ("bits", "w_bits")
"""Config keys that hold a method's weight width."""


def portable_name(name: str | os.PathLike[str] | None) -> str | None:
    """A model or tokenizer name without the local machine in it: a path (absolute, ``~``, ``./``,
    or an existing folder) becomes its last component; a Hub id (``org/name``) or a short name
    stays."""
    if name is None:
        return None
    text = str(name)
    if not text:
        return text
    looks_local = text.startswith(("/", "~", ".", "\\")) or (len(text) > 1 and text[1] == ":") or Path(text).exists()
    return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text if looks_local else text


def _width(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, dict):
            return "mixed"
        if isinstance(value, int):
            return str(value)
    return None


def tags(record: dict[str, Any]) -> list[str]:
    """Search tags of a record: ``qcore``, each method and the chain (``awq+gptq``), the weight
    width and group (``w4``, ``g64``; ``w-mixed`` for per-layer maps), activation and KV-cache
    widths below 16 (``a8``, ``kv4``)."""
    chain = [c.get("method", "?") for c in record.get("chain", [])]
    out = [LIBRARY_TAG, *chain]
    if len(chain) > 1:
        out.append("+".join(chain))
    configs = [c.get("config", {}) for c in record.get("chain", [])]
    weight = next((w for c in reversed(configs) if (w := _width(c, WEIGHT_KEYS))), None)
    if weight:
        out.append(f"w{weight}" if weight != "mixed" else "w-mixed")
    group = next((c["group_size"] for c in reversed(configs) if "group_size" in c), None)
    if isinstance(group, int):
        out.append("per-channel" if group < 0 else f"g{group}")
    for key, prefix in (("a_bits", "a"), ("kv_bits", "kv")):
        value = next((c[key] for c in configs if isinstance(c.get(key), int) and c[key] < 16), None)
        if value is not None:
            out.append(f"{prefix}{value}")
    return list(dict.fromkeys(out))


def portable_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a JSON copy) with the calibration tokenizer's path made portable and tags set."""
    calib = record.get("calibration")
    if isinstance(calib, dict) and "tokenizer" in calib:
        calib["tokenizer"] = portable_name(calib["tokenizer"])
    record["tags"] = tags(record)
    return record


def _bytes(root: Path, files: dict[str, Any]) -> int:
    return sum(int(info.get("bytes", 0)) or (root / name).stat().st_size for name, info in files.items())


def model_card(config: dict[str, Any], root: Path | None = None) -> str:
    """The Markdown model card of a checkpoint's ``config.json`` dict (``root``: its folder, for
    the weight files' size when the record lacks it)."""
    qc = config.get("quantization_config", {})
    chain = qc.get("chain", [])
    base = portable_name(config.get("_name_or_path")) or "a Hugging Face model"
    methods = " + ".join(c.get("method", "?") for c in chain) or "qcore"
    lines = ["---", "library_name: transformers", "tags:"]
    lines += [f"- {t}" for t in qc.get("tags", tags(qc))]
    lines += ["---", "", f"# {base}, quantized with qcore ({methods})", ""]
    lines += [f"Architecture `{(config.get('architectures') or ['?'])[0]}`, qcore {qc.get('qcore_version', '?')}, "
              f"checkpoint format {qc.get('format_version', '?')}.", ""]
    lines += ["| step | plugin | version | options |", "|---|---|---|---|"]
    for c in chain:
        options = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(c.get("config", {}).items())
                            if k not in ("method", "config_version"))
        lines.append(f"| {c.get('method', '?')} | {c.get('distribution', c.get('plugin', '?'))} | "
                     f"{c.get('version', '?')} | {options} |")
    files = qc.get("checkpoint", {}).get("files", {})
    if files and root is not None:
        lines += ["", f"Weights: {len(files)} safetensors file(s), {_bytes(root, files) / 1e6:.2f} MB."]
    calib = qc.get("calibration")
    if isinstance(calib, dict):
        lines += ["", f"Calibration: {calib.get('source', '?')}, {calib.get('n_samples', '?')} x "
                      f"{calib.get('seq_len', '?')} tokens (seed {calib.get('seed', '?')}), "
                      f"sha256 `{calib.get('sha256', '?')}`."]
    ev = qc.get("evaluation")
    if isinstance(ev, dict):
        lines += ["", f"Evaluation ({ev.get('data', '?')}, {ev.get('tokens', '?')} predicted tokens, "
                      f"{ev.get('seq_len', '?')}-token windows, qcore's perplexity protocol):", "",
                  "| model | perplexity |", "|---|---|"]
        if ev.get("float_perplexity") is not None:
            lines.append(f"| float | {ev['float_perplexity']:.3f} |")
        lines.append(f"| quantized | {ev['perplexity']:.3f} |")
    lines += ["", "## Use", "", "```python", "import qcore", "model = qcore.load(\"THIS_FOLDER\")", "",
              "# or through transformers", "import qcore.hf", "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")", "```", ""]
    return "\n".join(lines)


def write_card(root: Path, config: dict[str, Any]) -> Path:
    """Write ``root/README.md`` from ``config`` atomically; returns its path."""
    with atomic_file(root / CARD_FILE) as tmp:
        tmp.write_text(model_card(config, root), encoding="utf-8")
    return root / CARD_FILE


def record_evaluation(path: str | os.PathLike[str], evaluation: dict[str, Any]) -> None:
    """Add ``evaluation`` (``data``, ``perplexity``, ``tokens``, ``seq_len``, optional
    ``float_perplexity``) to a checkpoint's record and regenerate its model card, each file
    replaced atomically."""
    root = Path(path)
    config = read_config(root)
    config["quantization_config"]["evaluation"] = evaluation
    write_json(root / CONFIG_FILE, config, sort_keys=True)
    write_card(root, config)
