"""Registers the ``smoothquant`` method (no torch import)."""
from __future__ import annotations

from typing import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_smoothquant.config import A_BITS, W_BITS, SmoothQuantConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="smoothquant",
    summary="SmoothQuant: migrate activation outliers into weights (exact fold), W8A8 with an int8 matmul",
    config_cls=SmoothQuantConfig,
    quantizer="qcore_smoothquant.quantizer:SmoothQuantQuantizer",
    capabilities=Capabilities(
        kind="transform",
        weight_bits=W_BITS,
        activation_bits=A_BITS,
        needs_calibration=True,
        distributed=True,
        composes_with=("kind:weight-only", "kind:reconstruction"),
        group_sizes=(-1, 32, 64, 128),
        chain_options=(("w_bits", "bits"),),
        notes=(
            "scale groups come from introspection; groups that cannot be folded exactly are skipped and logged",
            "A8 dynamic per-token with 8-bit per-channel weights runs QuantLinear's w8a8 int8 backend; A4/A6 are fake-quantized",
            "followed by a weight method (e.g. gptq), the smoothed float weights are left for it (W4A8 with bits=4)",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
