"""SmoothQuant options (pydantic; no torch import)."""
from __future__ import annotations

from pydantic import field_validator, model_validator

from qcore.plugin import QuantConfig

W_BITS: tuple[int, ...] = (4, 8)
A_BITS: tuple[int, ...] = (4, 6, 8)


class SmoothQuantConfig(QuantConfig):
    """Smooth activation outliers into the weights (exact fold), then quantize activations
    (and, when no weight method follows in the chain, weights per channel with RTN)."""

    method = "smoothquant"

    alpha: float = 0.5
    """Migration strength a in s_j = max|X_j|^a / max|W_j|^(1-a) (used when alpha_grid is None)."""
    alpha_grid: list[float] | None = None
    """Candidates for a, searched per scale group to minimize the group's output error with
    fake-quantized weights and activations; "no smoothing" is always a candidate too."""
    w_bits: int = 8
    """Weight bits when no weight method follows in the chain (per-channel symmetric RTN)."""
    a_bits: int = 8
    """Activation bits (8 runs the int8 matmul with dynamic per-token scales; 4/6 are fake-quantized)."""
    act_dynamic: bool = True
    """Per-token scales computed at run time; False = one static per-tensor scale from calibration."""
    group_size: int = -1
    """Weight group size of the built-in RTN step; -1 = per output channel (needed by the int8 kernel)."""
    smooth: bool = True
    """Fold smoothing scales (False = naive W8A8 baseline: quantize without smoothing)."""
    online_smoothing: bool = False
    """Also smooth groups whose producer cannot absorb the scale exactly (GELU between fc1 and
    fc2, a fused qkv before o, post-norm norms): the division is then an input transform run
    before the linear's kernel (qcore.quant.transforms.ChannelScale, saved in the checkpoint)."""
    quantize: bool = True
    """Quantize activations/weights after smoothing (False = only the exact smoothing fold)."""

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("alpha must lie in [0, 1] (0.5 is the paper's default)")
        return v

    @field_validator("alpha_grid")
    @classmethod
    def _grid(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("alpha_grid must be a non-empty list of values in [0, 1], e.g. [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]")
        return v

    @field_validator("w_bits")
    @classmethod
    def _w_bits(cls, v: int) -> int:
        if v not in W_BITS:
            raise ValueError(f"w_bits must be one of {W_BITS}; chain a weight method (e.g. ['smoothquant', 'gptq']) for others")
        return v

    @field_validator("a_bits")
    @classmethod
    def _a_bits(cls, v: int) -> int:
        if v not in A_BITS:
            raise ValueError(f"a_bits must be one of {A_BITS}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be -1 (per channel) or a positive integer such as 32, 64 or 128")
        return v

    @model_validator(mode="after")
    def _something(self) -> SmoothQuantConfig:
        if not self.smooth and not self.quantize:
            raise ValueError("smooth=False with quantize=False does nothing; set one of them to True")
        return self
