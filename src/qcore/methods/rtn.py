"""Built-in ``rtn``: round to nearest, the baseline every other method is measured against."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, WeightQuantConfig, hookimpl

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""


class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: per-group min/max (or absmax when sym) scales, no calibration."""

    method = "rtn"


SPEC = MethodSpec(
    name="rtn",
    summary="Round to nearest: calibration-free baseline, any bits and group size",
    config_cls=RTNConfig,
    quantizer="qcore.methods.rtn_quantizer:RTNQuantizer",
    capabilities=Capabilities(
        kind="weight-only",
        weight_bits=(2, 3, 4, 8),
        needs_calibration=False,
        distributed=True,
        group_sizes=(-1, 32, 64, 128),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
