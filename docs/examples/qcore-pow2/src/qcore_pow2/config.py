"""Options of ``pow2`` (no torch import)."""
from __future__ import annotations

from pydantic import Field

from qcore.plugin import WeightQuantConfig


class Pow2Config(WeightQuantConfig):
    """Round to nearest with power-of-two scales, after power-of-two input scaling."""

    method = "pow2"
    max_shift: int = Field(3, ge=0, le=8)
    """Largest input-channel shift (a channel is divided by at most 2**max_shift)."""
