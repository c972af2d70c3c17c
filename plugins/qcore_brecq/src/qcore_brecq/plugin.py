"""Registers the ``brecq`` method. No torch import: the quantizer is imported when it runs."""
from __future__ import annotations

from collections.abc import Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_brecq.config import BRECQ_ACT_BITS, BRECQ_BITS, BrecqConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

SPEC = MethodSpec(
    name="brecq",
    summary="BRECQ: learned rounding of all linears of a block jointly, reproducing the float block's output",
    config_cls=BrecqConfig,
    quantizer="qcore_brecq.quantizer:BrecqQuantizer",
    capabilities=Capabilities(
        kind="reconstruction",
        weight_bits=BRECQ_BITS,
        activation_bits=BRECQ_ACT_BITS,
        needs_calibration=True,
        group_sizes=(-1, 32, 64, 128),
        notes=(
            ("per block: forward and backward through the whole block with fake-quantized weights on "
             "about batch_tokens calibration tokens per step; a step costs about three block forwards on them"),
            "loss='fisher' adds a gradient pass of the model's loss before the block pass",
            ("a_bits: activation quantization (W4A8, W4A4) with step sizes learned with the rounding (LSQ): "
             "static per-tensor steps, or per-token grids with a searched clip ratio (a_dynamic)"),
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)
