"""``qcore.plugin``: the whole public contract between qcore and a method plugin. No torch import.

A plugin imports from here only (helpers such as ``quantize_rtn`` or ``fold_scale_group`` too: see
:data:`HELPERS`, resolved lazily), declares the
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
    NonFiniteError,
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

HELPERS: dict[str, str] = {
    # the user API
    "quantize": "qcore", "save": "qcore", "load": "qcore",
    # packed weights, activation quantization, run-time input transforms
    "QuantizedWeight": "qcore.quant.primitives", "quant_params": "qcore.quant.primitives",
    "quantize_codes": "qcore.quant.primitives", "dequantize_codes": "qcore.quant.primitives",
    "quantize_rtn": "qcore.quant.primitives", "check_bits": "qcore.quant.primitives",
    "check_group_size": "qcore.quant.primitives", "ActQuant": "qcore.quant.act",
    "fake_quant_act": "qcore.quant.act", "ChannelScale": "qcore.quant.transforms",
    "TransformedLinear": "qcore.quant.transformed", "QuantLinear": "qcore.quant.linear",
    # model knowledge and exact folds
    "inspect_model": "qcore.arch.introspect", "ModelInfo": "qcore.arch.introspect",
    "BlockInfo": "qcore.arch.introspect", "ScaleGroup": "qcore.arch.introspect",
    "norm_offset": "qcore.arch.introspect", "fold_scale_group": "qcore.arch.fold",
    "group_tie": "qcore.arch.fold", "scale_columns": "qcore.arch.fold",
    # text, evaluation, models, files
    "read_texts": "qcore.data", "tokenize_text": "qcore.data", "text_sha256": "qcore.data",
    "describe_source": "qcore.data", "TEXT_SEPARATOR": "qcore.data", "perplexity": "qcore.eval",
    "save_float": "qcore.models", "atomic_dir": "qcore.checkpoint", "write_json": "qcore.checkpoint",
    # logging and progress bars
    "get_logger": "qcore.progress", "bar": "qcore.progress",
}
"""Helpers a plugin imports from ``qcore.plugin`` too (``from qcore.plugin import quantize_rtn``),
resolved on first use so that importing the contract never imports torch. Everything else in qcore
(the engine, the registry, the CLI...) is internal and may change without notice."""


def __getattr__(name: str) -> object:
    if name in HELPERS:
        import importlib

        return getattr(importlib.import_module(HELPERS[name]), name)
    raise AttributeError(f"module 'qcore.plugin' has no attribute '{name}'")


__all__ = [
    "API_ATTRIBUTE", "API_VERSION", "HELPERS", "KINDS", "WEIGHT_KINDS", "ArchitectureError",
    "BaseQuantizer", "BlockContext", "CalibrationError", "Capabilities", "CheckpointError",
    "CompatibilityError", "ConfigError", "KernelBackend", "LayerPrecision", "MethodSpec",
    "ModuleSerializer", "Needs", "NonFiniteError", "ObserverSpec", "PerLayer", "PluginLoadError", "Propagation",
    "QcoreError", "QuantConfig", "Quantizer", "RunContext", "Trainer", "UnknownMethodError",
    "WeightQuantConfig", "allowed", "check_per_layer", "hookimpl", "layer_value",
]
