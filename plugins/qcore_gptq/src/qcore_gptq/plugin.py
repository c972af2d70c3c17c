"""Registers the ``gptq`` method. No torch import: the quantizer is imported when it runs."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_gptq.config import GPTQConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="gptq",
    summary="GPTQ: Hessian-aware error-compensating rounding (act-order, groups, MoE), any decoder",
    config_cls=GPTQConfig,
    quantizer="qcore_gptq.quantizer:GPTQQuantizer",
    capabilities=Capabilities(
        kind="weight-only",
        weight_bits=(2, 3, 4, 8),
        needs_calibration=True,
        distributed=True,
        group_sizes=(-1, 32, 64, 128),
        notes=("experts with fewer than min_expert_tokens calibration tokens fall back to RTN",),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
