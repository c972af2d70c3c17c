"""Registers the ``awq`` method (no torch import)."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_awq.config import AWQConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="awq",
    summary="AWQ: activation-aware per-channel scale search folded exactly, clip search, RTN or GPTQ after",
    config_cls=AWQConfig,
    quantizer="qcore_awq.quantizer:AWQQuantizer",
    capabilities=Capabilities(
        kind="weight-only",
        weight_bits=(2, 3, 4, 8),
        needs_calibration=True,
        distributed=True,
        composes_with=("gptq", "kind:reconstruction"),
        group_sizes=(-1, 32, 64, 128),
        notes=(
            "scale groups come from introspection; groups that cannot be folded exactly are skipped and logged",
            "runs on CPU",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
