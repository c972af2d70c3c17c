"""qcore: one API for quantizing large language models, every method a plugin.

``import qcore`` is light: torch is imported only when a model is touched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcore.plugin import (
    API_VERSION,
    BaseQuantizer,
    CalibrationError,
    Capabilities,
    CheckpointError,
    CompatibilityError,
    ConfigError,
    MethodSpec,
    PluginLoadError,
    QcoreError,
    QuantConfig,
    Quantizer,
    UnknownMethodError,
    WeightQuantConfig,
    hookimpl,
)
from qcore.registry import get_method, list_methods, list_plugins

__version__ = "0.1.0"

# Heavy entry points, imported on first attribute access (they import torch).
_LAZY = {
    "quantize": "qcore.pipeline.api",
    "check": "qcore.compat",
    "save": "qcore.checkpoint",
    "load": "qcore.checkpoint",
    "finetune": "qcore.pipeline.api",
    "inspect_model": "qcore.arch.introspect",
    "export": "qcore.formats",
}

if TYPE_CHECKING:
    from qcore.pipeline.api import finetune, quantize
    from qcore.compat import check
    from qcore.arch.introspect import inspect_model
    from qcore.checkpoint import load, save
    from qcore.formats import export


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcore' has no attribute '{name}'")


__all__ = [
    "API_VERSION", "BaseQuantizer", "CalibrationError", "Capabilities", "CheckpointError", "CompatibilityError",
    "ConfigError", "MethodSpec", "export", "PluginLoadError", "QcoreError", "QuantConfig", "Quantizer",
    "UnknownMethodError", "WeightQuantConfig", "__version__", "check", "finetune", "get_method",
    "hookimpl", "inspect_model", "list_methods", "list_plugins", "load", "quantize", "save",
]
