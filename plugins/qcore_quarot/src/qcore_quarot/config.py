"""QuaRot options (pydantic; no torch import)."""
from __future__ import annotations

from pydantic import ValidationInfo, field_validator, model_validator

from qcore.plugin import QuantConfig, allowed, check_per_layer

W_BITS: tuple[int, ...] = (2, 3, 4, 8)
A_BITS: tuple[int, ...] = (4, 6, 8, 16)
"""Activation bits; 16 leaves activations in float."""


class QuaRotConfig(QuantConfig):
    """Rotate the model exactly with Hadamard transforms (R1 on the residual stream, R2 per
    attention head on v -> o, R4 online before every down projection), then quantize activations
    (a_bits < 16) and, when no weight method follows in the chain, the weights with RTN."""

    method = "quarot"

    rotate: bool = True
    """Apply the rotations (False = the same quantization without them: the baseline QuaRot improves on)."""
    rotation_seed: int = 0
    """Seed of R1's random sign flips (and of the random orthogonal block of sizes no Hadamard construction covers)."""
    quantize: bool = True
    """Quantize after rotating (False = only the exact rotations: the logits do not change)."""
    w_bits: int = 4
    """Weight bits of the built-in RTN step (a weight method after quarot in a chain takes it as its bits)."""
    group_size: int = -1
    """Weight group size of the built-in RTN step; -1 = one scale per output channel."""
    w_sym: bool = False
    """Symmetric weight grid (False = asymmetric with a zero point, as qcore's rtn)."""
    a_bits: int = 16
    """Activation bits: 4, 6 or 8 quantize every quantizable linear's input per token at run time; 16 = float."""
    a_sym: bool = True
    """Symmetric per-token activation grid."""

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _bits(cls, v: int, info: ValidationInfo) -> int:
        choices = W_BITS if info.field_name == "w_bits" else A_BITS
        return int(check_per_layer(v, allowed(choices), f"{info.field_name} must be one of {choices}"))

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return int(check_per_layer(v, lambda g: g == -1 or g > 0, "group_size must be -1 (per channel) or positive"))

    @model_validator(mode="after")
    def _does_something(self) -> QuaRotConfig:
        if not (self.rotate or self.quantize):
            raise ValueError("rotate=False and quantize=False together change nothing: keep one of them")
        return self
