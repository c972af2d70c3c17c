"""Registers the ``hqq`` method. No torch import: the quantizer is imported when it runs."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_hqq.config import HQQ_BITS, HQQConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="hqq",
    summary="HQQ: calibration-free half-quadratic optimization of float zero points (lp error), 1 to 8 bits",
    config_cls=HQQConfig,
    quantizer="qcore_hqq.quantizer:HQQQuantizer",
    capabilities=Capabilities(
        kind="weight-only",
        weight_bits=HQQ_BITS,
        needs_calibration=False,
        distributed=True,
        group_sizes=(-1, 16, 32, 64, 128, 256),
        notes=(
            "asymmetric only (float zero points); groups along the input features (HQQ axis=1)",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
