"""Registers the ``adaround`` method. No torch import: the quantizer is imported when it runs."""
from __future__ import annotations

from collections.abc import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_adaround.config import ADAROUND_BITS, AdaRoundConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="adaround",
    summary="AdaRound: learned up/down rounding per weight minimizing the layer's output error (input Hessian)",
    config_cls=AdaRoundConfig,
    quantizer="qcore_adaround.quantizer:AdaRoundQuantizer",
    capabilities=Capabilities(
        kind="reconstruction",
        weight_bits=ADAROUND_BITS,
        needs_calibration=True,
        group_sizes=(-1, 32, 64, 128),
        notes=(
            ("per linear, true-sequential; the output error is computed from the input Hessian, so an "
             "iteration costs out*in^2 whatever the number of calibration tokens"),
            "linears no calibration token reached fall back to RTN",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
