"""The Quantizer protocol: how the core drives one method over a model.

The engine (:mod:`qcore.pipeline.engine`) runs a chain of quantizers in ONE pass over the model:

1. ``prepare(run)`` for each quantizer, in chain order (whole-model changes before
   calibration: rotations, adapter injection, unfusing);
2. for each decoder block, for each quantizer in chain order, ``process_block(block)``: the
   block's captured calibration inputs are in ``block.inputs`` (``None`` for calibration-free
   chains); the method collects statistics with ``block.collect(...)``, changes the block (fold
   scales, quantize linears with ``block.quantize_linear``), and the engine then feeds the
   changed block's outputs to the next block;
3. ``finalize(run)`` for each quantizer (modules outside blocks, bookkeeping).

Only calibration-free methods may leave ``process_block`` work undone; a weight method that
follows a transform quantizes the transformed weights. Importing this module never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from qcore.plugin.config import QuantConfig
    from qcore.pipeline.engine import BlockContext, RunContext
    from qcore.plugin.spec import MethodSpec


@runtime_checkable
class Quantizer(Protocol):
    """What a method's ``spec.quantizer`` class implements (``cls(config, spec)``)."""

    config: QuantConfig
    spec: MethodSpec

    def prepare(self, run: RunContext) -> None:
        """Change the whole model before the block pass (may be a no-op)."""

    def process_block(self, block: BlockContext) -> None:
        """Calibrate and change one decoder block."""

    def finalize(self, run: RunContext) -> None:
        """Finish after every block was processed (may be a no-op)."""


class BaseQuantizer:
    """Convenience base: stores config and spec, no-op hooks."""

    #: set True when ``process_block`` reads ``block.float_outputs`` (costs one forward per block)
    needs_float_outputs: bool = False

    def __init__(self, config: QuantConfig, spec: MethodSpec) -> None:
        self.config = config
        self.spec = spec

    def prepare(self, run: RunContext) -> None:
        return None

    def process_block(self, block: BlockContext) -> None:
        return None

    def finalize(self, run: RunContext) -> None:
        return None

    def record(self) -> dict[str, Any]:
        """Extra JSON-able metadata saved with the checkpoint (timings, per-layer choices)."""
        return {}
