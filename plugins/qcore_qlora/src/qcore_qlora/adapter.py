"""Adapters on disk in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``).

A directory written by :func:`save_adapter` loads with ``peft.PeftModel.from_pretrained`` on a
4-bit base, and :func:`load_adapter` loads a peft directory into a qcore QLoRA model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from qcore.plugin import CheckpointError

from qcore_qlora.quantizer import ADAPTER_NAME, exact_targets
from qcore_qlora.serialize import restore_peft_state

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors with peft's key names (no adapter name, ``base_model.model.`` prefix)."""
    from peft import get_peft_model_state_dict

    restore_peft_state(model)  # a model from qcore.load carries its LoRA layers but not peft's config
    if not hasattr(model, "peft_config"):
        raise CheckpointError("this model has no LoRA adapter to save; quantize it with "
                              "qcore.quantize(model, 'qlora', ...) first")
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter to ``path`` in peft's format, atomically (:func:`qcore.checkpoint.atomic_dir`:
    an earlier adapter qcore wrote there is replaced, any other folder is refused)."""
    from safetensors.torch import save_file

    from qcore.plugin import atomic_dir

    state = adapter_state_dict(model)
    with atomic_dir(path, overwrite=True, kind="LoRA adapter") as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        model.peft_config[ADAPTER_NAME].save_pretrained(str(tmp))
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(config dict, tensors)`` of a peft adapter directory, with clear errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a peft adapter directory (needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}); pass the directory save_adapter wrote")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"adapter in {path} is unreadable ({exc}); re-save it or use an earlier checkpoint") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} holds a {config.get('peft_type')} adapter, not LoRA; qlora loads LoRA adapters")
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter weights from a peft directory into a QLoRA model (same targets and rank)."""
    from peft import set_peft_model_state_dict

    config, tensors = read_adapter(path)
    restore_peft_state(model)
    if not hasattr(model, "peft_config"):
        raise CheckpointError("the model has no LoRA layers to load into; quantize it with "
                              "qcore.quantize(model, 'qlora', r=..., targets=...) first")
    mine = model.peft_config[ADAPTER_NAME]
    if int(config.get("r", -1)) != mine.r or set(config.get("target_modules") or []) != set(mine.target_modules):
        raise CheckpointError(f"adapter in {path} has r={config.get('r')} and other target modules than this "
                              f"model (r={mine.r}); quantize with the adapter's r and targets")
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    with exact_targets():
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"adapter in {path} does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); load it into the model it was trained on")
    return model
