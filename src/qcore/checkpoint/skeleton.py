"""The model of a checkpoint's ``config.json``, built without materializing its float weights.

Parameters are created on the ``meta`` device while buffers are computed as usual: the
non-persistent ones (rotary ``inv_freq``, causal masks) are not in the checkpoint, so only the
modules' own ``__init__`` can compute them, and building under ``torch.device("meta")`` would
leave them empty.

Why a patch of ``nn.Module.register_parameter``: transformers 5 no longer ships
``init_empty_weights`` (its ``from_pretrained`` builds everything on meta and recomputes
non-persistent buffers with private initialization code), and accelerate, which has
``init_empty_weights(include_buffers=False)``, is not a qcore dependency and installs the same
patch for every thread. Ours is scoped: a lock admits one build at a time, only the building
thread's parameters go to meta, and the original method is restored on exit.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.checkpoint.format import CONFIG_FILE
from qcore.plugin.errors import CheckpointError

_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """While inside, parameters this thread registers are moved to the meta device."""
    with _BUILD_LOCK:
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


def build_empty(config_dict: dict[str, Any], root: Path, dtype: torch.dtype | None) -> nn.Module:
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
