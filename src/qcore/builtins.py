"""qcore's own observers, module serializers and kernel backends, registered through the same
hooks as any third-party plugin (entry point ``builtins`` in the ``qcore`` group).

The hooks import their implementations only when called (the registries are filled on first
use, after torch is loaded), so ``qcore list`` stays light.
"""
from __future__ import annotations

from typing import Any, Callable

from qcore.plugin import hookimpl

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""


@hookimpl
def qcore_register_observers(register: Callable[[Any], None]) -> None:
    from qcore.pipeline.observers import BUILTIN_OBSERVERS

    for spec in BUILTIN_OBSERVERS:
        register(spec)


@hookimpl
def qcore_register_serializers(register: Callable[[Any], None]) -> None:
    from qcore.checkpoint.serializers import QuantLinearSerializer
    from qcore.quant.transformed import TransformedLinearSerializer
    from qcore.quant.transforms import ChannelScaleSerializer

    register(QuantLinearSerializer())
    register(TransformedLinearSerializer())
    register(ChannelScaleSerializer())


@hookimpl
def qcore_register_backends(register: Callable[[Any], None]) -> None:
    from qcore.quant.backends import builtin_backends

    for backend in builtin_backends():
        register(backend)
