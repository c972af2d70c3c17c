"""Registers the method, its observer and its module serializer (no torch import)."""
from __future__ import annotations

from typing import Any, Callable

from qcore.plugin import Capabilities, MethodSpec, ObserverSpec, hookimpl
from qcore_pow2.config import Pow2Config

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(MethodSpec(
        name="pow2",
        summary="Round to nearest with power-of-two scales after power-of-two input scaling",
        config_cls=Pow2Config,
        quantizer="qcore_pow2.quantizer:Pow2Quantizer",
        capabilities=Capabilities(kind="weight-only", weight_bits=(2, 3, 4, 8), needs_calibration=True),
    ))


@hookimpl
def qcore_register_observers(register: Callable[[ObserverSpec], None]) -> None:
    register(ObserverSpec("pow2.log2_absmax", "log2 of max |x| per input channel",
                          "qcore_pow2.modules:Log2AbsMax"))


@hookimpl
def qcore_register_serializers(register: Callable[[Any], None]) -> None:
    from qcore_pow2.modules import InputShiftSerializer

    register(InputShiftSerializer())
