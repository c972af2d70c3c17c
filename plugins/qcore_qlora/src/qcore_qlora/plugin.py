"""Registers the ``qlora`` method and its checkpoint serializers. No torch import (the quantizer and
the serializers are imported lazily)."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, ModuleSerializer, hookimpl

from qcore_qlora.config import QLoRAConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="qlora",
    summary="QLoRA: NF4/FP4 bitsandbytes base + trainable LoRA adapters (peft); merge, then re-quantize",
    config_cls=QLoRAConfig,
    quantizer="qcore_qlora.quantizer:QLoRAQuantizer",
    capabilities=Capabilities(
        kind="adapter",
        weight_bits=(4,),
        needs_calibration=False,
        trains=True,
        composes_with=(),
        group_sizes=(64,),
        notes=(
            "bitsandbytes 4-bit blocks of 64 weights (flattened), not qcore's packed format",
            "to deploy: merge the adapter into a float model, then quantize with any weight method",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)


@hookimpl
def qcore_register_serializers(register: Callable[[ModuleSerializer], None]) -> None:
    """The 4-bit base linear and its LoRA wrapper, so that ``qcore.save`` / ``qcore.load`` round-trip
    a QLoRA model (implementation imported here: it needs torch)."""
    from qcore_qlora.serialize import Linear4bitSerializer, LoraLinear4bitSerializer

    register(Linear4bitSerializer())
    register(LoraLinear4bitSerializer())
