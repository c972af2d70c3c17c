"""``qcore.plugin``: the whole public contract between qcore and a method plugin. No torch import.

A plugin imports from here (and from the helper modules in :data:`PUBLIC_MODULES`), declares the
contract versions it supports with ``QCORE_API = ">=1,<2"`` in its plugin module, and implements
the hooks of :mod:`qcore.plugin.hookspecs` with :data:`hookimpl`:

- ``qcore_register_methods``: :class:`MethodSpec` (name, :class:`Capabilities`, a
  :class:`QuantConfig` subclass, the :class:`Quantizer` class run by the engine);
- ``qcore_register_observers``: :class:`ObserverSpec` (statistics of a linear's input, output or
  gradient for ``BlockContext.observe``);
- ``qcore_register_serializers``: :class:`ModuleSerializer` (a module type saved to and rebuilt
  from safetensors + JSON, e.g. an input transform set with ``BlockContext.set_input_transform``);
- ``qcore_register_backends``: :class:`KernelBackend` (a matmul for ``QuantLinear``).
"""
from __future__ import annotations

from qcore.plugin.config import (
    LayerPrecision,
    PerLayer,
    QuantConfig,
    WeightQuantConfig,
    allowed,
    check_per_layer,
    layer_value,
)
from qcore.plugin.errors import (
    ArchitectureError,
    CalibrationError,
    CheckpointError,
    CompatibilityError,
    ConfigError,
    PluginLoadError,
    QcoreError,
    UnknownMethodError,
)
from qcore.plugin.hookspecs import hookimpl
from qcore.plugin.kernel import KernelBackend
from qcore.plugin.protocol import (
    BaseQuantizer,
    BlockContext,
    Needs,
    Propagation,
    Quantizer,
    RunContext,
    Trainer,
)
from qcore.plugin.serialize import ModuleSerializer
from qcore.plugin.spec import KINDS, WEIGHT_KINDS, Capabilities, MethodSpec, ObserverSpec
from qcore.plugin.version import API_ATTRIBUTE, API_VERSION

PUBLIC_MODULES: tuple[str, ...] = (
    "qcore",                    # quantize, save, load, check (the user API)
    "qcore.plugin",             # this contract (and its submodules)
    "qcore.quant",              # QuantLinear, QuantizedWeight, quantize_rtn, ActQuant, packing
    "qcore.arch.fold",          # exact scale folds shared by transform methods
    "qcore.arch.introspect",    # ModelInfo / BlockInfo / ScaleGroup types, inspect_model
    "qcore.data",               # calibration text -> token windows
    "qcore.eval",               # perplexity
    "qcore.models",             # loading models by name, saving float models
    "qcore.checkpoint",         # save/load and the atomic writer for a plugin's own files
    "qcore.progress",           # logging and progress bars
    "qcore.testing",            # the conformance suite (tests only)
    "qcore.tiny",               # tiny models for tests
)
"""Modules (and their submodules) a plugin may import besides ``qcore.plugin``; everything else
in qcore (the engine, the registry, the CLI...) is internal and may change without notice."""

__all__ = [
    "API_ATTRIBUTE", "API_VERSION", "KINDS", "PUBLIC_MODULES", "WEIGHT_KINDS", "ArchitectureError",
    "BaseQuantizer", "BlockContext", "CalibrationError", "Capabilities", "CheckpointError",
    "CompatibilityError", "ConfigError", "KernelBackend", "LayerPrecision", "MethodSpec",
    "ModuleSerializer", "Needs", "ObserverSpec", "PerLayer", "PluginLoadError", "Propagation",
    "QcoreError", "QuantConfig", "Quantizer", "RunContext", "Trainer", "UnknownMethodError",
    "WeightQuantConfig", "allowed", "check_per_layer", "hookimpl", "layer_value",
]
