"""Registers the ``qlora`` method. No torch import (the quantizer is imported lazily)."""
from __future__ import annotations

from typing import Callable

from qcore.plugin.hookspecs import hookimpl
from qcore.plugin.spec import Capabilities, MethodSpec

from qcore_qlora.config import QLoRAConfig

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
