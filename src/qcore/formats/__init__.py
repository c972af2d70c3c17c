"""Export a quantized model or a qcore checkpoint to formats other runtimes load.

One module per format (``FORMATS``), each with the same three names:

- ``KIND``: ``"dir"`` (a folder, written through :func:`qcore.checkpoint.atomic.atomic_dir`) or
  ``"file"`` (one file, written through :func:`qcore.checkpoint.atomic.atomic_file`);
- ``check(model, **options) -> list[str]``: why this format cannot hold ``model`` (each reason
  names the format that can); empty when it can. Runs before anything is written;
- ``write(model, target, tokenizer, **options) -> None``: write into ``target`` (the temporary
  folder or file that is renamed into place on success). Its keyword-only parameters are the
  format's options (``qcore.export(..., lm_head_bits=8)``); formats without any take none.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from qcore.plugin.errors import QcoreError

FORMATS: dict[str, str] = {
    "compressed-tensors": "qcore.formats.compressed_tensors",
    "gptq": "qcore.formats.gptq",
    "awq": "qcore.formats.awq",
    "gguf": "qcore.formats.gguf",
    "onnx": "qcore.formats.onnx",
}
"""Export format name -> the module that writes it (``compressed-tensors``: pack-quantized
weight-only checkpoints that transformers and vLLM load; ``gptq``: the GPTQ layout of
AutoGPTQ / GPTQModel; ``awq``: AutoAWQ's GEMM layout; ``qcore.load`` reads both; ``gguf``: one
llama.cpp file, 4-bit codes as Q4_0 / Q4_1 and 8-bit symmetric ones as Q8_0, exactly; ``onnx``: an
onnxruntime decoder graph with a KV cache, quantized linears as MatMulNBits holding qcore's codes)."""


IMPORTERS: dict[str, str] = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed-tensors"}
"""``quantization_config["quant_method"]`` of other tools' checkpoints that ``qcore.load`` reads ->
the format (of :data:`FORMATS`) whose module has ``load(root, config, device, dtype)``."""


def importer_for(config: dict[str, Any]) -> ModuleType | None:
    """The format module that reads a checkpoint with this ``config.json`` dict, or None."""
    qc = config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    return format_module(IMPORTERS[method]) if method in IMPORTERS else None


class ExportError(QcoreError, ValueError):
    """A model that a format cannot hold, or an unknown format."""


def list_formats() -> list[str]:
    """Names of the export formats whose module is present."""
    return [name for name, mod in FORMATS.items() if importlib.util.find_spec(mod) is not None]


def format_module(name: str) -> ModuleType:
    """The module writing format ``name``; :class:`ExportError` naming the formats otherwise."""
    if name not in FORMATS or importlib.util.find_spec(FORMATS[name]) is None:
        raise ExportError(f"unknown export format {name!r}: choose one of {', '.join(list_formats())}")
    return importlib.import_module(FORMATS[name])


def check_export(model: Any, format: str) -> list[str]:
    """Why ``format`` cannot hold ``model``; empty when it can."""
    return list(format_module(format).check(model))


def export(model_or_dir: Any, out: str | os.PathLike[str], format: str, *, tokenizer: Any = None,
           overwrite: bool = False, **options: Any) -> Path:
    """Write ``model_or_dir`` (a quantized model, or a qcore checkpoint folder) to ``out`` in
    ``format``; returns the output path. Checked first, written aside and renamed into place:
    a refusal or a failure leaves ``out`` as it was. ``options`` go to the format's ``check`` and
    ``write`` (e.g. ``lm_head_bits=8`` for onnx); a format that takes none refuses them."""
    from qcore.checkpoint.atomic import atomic_dir, atomic_file, model_sources

    mod = format_module(format)
    _check_options(mod, format, options)
    model, tokenizer, inputs = _model(model_or_dir, tokenizer)
    reasons = list(mod.check(model, **options))
    if reasons:
        raise ExportError(f"format {format!r} cannot hold this model: " + "; ".join(reasons))
    inputs = inputs + model_sources(model)
    if mod.KIND == "dir":
        with atomic_dir(out, overwrite, kind=f"export-{format}", inputs=inputs) as tmp:
            mod.write(model, tmp, tokenizer, **options)
        return Path(out).expanduser().absolute()
    target = Path(out).expanduser().absolute()
    if target.is_dir():
        raise ExportError(f"{target} is a folder; format {format!r} writes one file: pass a file name")
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass overwrite=True (--overwrite) to replace it, or another name")
    for src in inputs:
        if target.resolve() == Path(src).expanduser().resolve():
            raise ExportError(f"{target} is the input model; pass another output name")
    with atomic_file(target) as tmp:
        mod.write(model, tmp, tokenizer, **options)
    return target


def _check_options(mod: ModuleType, format: str, options: dict[str, Any]) -> None:
    """Refuse options the format's ``write`` does not take, naming those it does."""
    import inspect

    params = inspect.signature(mod.write).parameters
    taken = [n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise ExportError(f"format {format!r} takes no option {', '.join(unknown)}; "
                          + (f"its options: {', '.join(taken)}" if taken else "it takes none"))


def _model(model_or_dir: Any, tokenizer: Any) -> tuple[Any, Any, tuple[str, ...]]:
    """The model to export, its tokenizer and the folders it was read from."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        from qcore.checkpoint import load, load_tokenizer

        path = str(model_or_dir)
        model = load(path)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(path)
            except Exception:  # noqa: BLE001 - a checkpoint may hold no tokenizer
                tokenizer = None
        return model, tokenizer, (path,)
    return model_or_dir, tokenizer, ()
