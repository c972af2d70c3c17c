"""QuaRot options (pydantic; no torch import)."""
from __future__ import annotations

from pydantic import ValidationInfo, field_validator, model_validator

from qcore.plugin import QuantConfig, allowed, check_per_layer

W_BITS: tuple[int, ...] = (2, 3, 4, 8)
A_BITS: tuple[int, ...] = (4, 6, 8, 16)
"""Activation bits; 16 leaves activations in float."""
KV_BITS: tuple[int, ...] = (4, 8, 16)
"""KV-cache bits; 16 leaves keys and values in float."""
A4_CLIP = 0.9
"""Default clip ratio of 4-bit activations (the QuaRot paper's; measured best or near it: W4A4
rotated GPTQ perplexity at clip 1.0 / 0.9 / 0.85, stories260K 5.167 / 5.103 / 5.200, SmolLM2-135M
76.6 / 70.3 / 64.9; docs/results.md)."""


class QuaRotConfig(QuantConfig):
    """Rotate the model exactly with Hadamard transforms (R1 on the residual stream, R2 per
    attention head on v -> o, R4 online before every down projection, R3 online on queries and
    keys after RoPE), then quantize activations (a_bits < 16), the KV cache (kv_bits < 16) and,
    when no weight method follows in the chain, the weights with RTN."""

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
    a_clip: float | None = None
    """Fraction of each token's activation range the grid covers; None = A4_CLIP at 4 bits, else 1 (no clipping)."""
    kv_bits: int = 16
    """KV-cache bits: 4 or 8 fake-quantize keys (after R3) and values per token and head, asymmetric, as the attention reads them; 16 = float."""
    kv_clip: float = 1.0
    """Fraction of each token's key/value range the KV grid covers (1 = no clipping; the QuaRot paper uses 0.95)."""
    kv_group_size: int = -1
    """Channels of the head dimension sharing one KV scale and zero point; -1 = the whole head."""
    r2: bool = True
    """Apply R2 (per-head Hadamard on v -> o) when rotating (False: an ablation)."""
    r3: bool | None = None
    """Apply R3 (online Hadamard on queries and keys after RoPE) when rotating: None = when kv_bits < 16, as QuaRot."""
    r4: bool = True
    """Apply R4 (online Hadamard before every down projection) when rotating (False: an ablation)."""

    @field_validator("w_bits", "a_bits", "kv_bits")
    @classmethod
    def _bits(cls, v: int, info: ValidationInfo) -> int:
        choices = {"w_bits": W_BITS, "a_bits": A_BITS, "kv_bits": KV_BITS}[str(info.field_name)]
        return int(check_per_layer(v, allowed(choices), f"{info.field_name} must be one of {choices}"))

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return int(check_per_layer(v, lambda g: g == -1 or g > 0, "group_size must be -1 (per channel) or positive"))

    @field_validator("a_clip", "kv_clip")
    @classmethod
    def _clip(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"{info.field_name} must lie in (0, 1]: the fraction of each token's range the grid "
                             "covers (1 = no clipping)")
        return v

    @field_validator("kv_group_size")
    @classmethod
    def _kv_group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("kv_group_size must be -1 (the whole head) or a positive divisor of the head width")
        return v

    @property
    def act_clip(self) -> float:
        """The activation clip ratio in use (``a_clip``, or its default for ``a_bits``)."""
        if self.a_clip is not None:
            return self.a_clip
        return A4_CLIP if self.a_bits == 4 else 1.0

    @property
    def use_r3(self) -> bool:
        """Whether R3 runs (rotations on and ``r3``, or ``kv_bits < 16`` when ``r3`` is None)."""
        return self.rotate and (self.kv_bits < 16 if self.r3 is None else self.r3)

    @model_validator(mode="after")
    def _does_something(self) -> QuaRotConfig:
        if not (self.rotate or self.quantize):
            raise ValueError("rotate=False and quantize=False together change nothing: keep one of them")
        return self
