"""GPTQ options. No torch import."""
from __future__ import annotations

from pydantic import field_validator

from qcore.plugin import PerLayer, WeightQuantConfig, allowed, check_per_layer

GPTQ_BITS: tuple[int, ...] = (2, 3, 4, 8)


class GPTQConfig(WeightQuantConfig):
    """GPTQ (Frantar et al., 2022): second-order, error-compensating weight rounding.

    damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean; a Hessian
    that is still not positive definite gets 10x more, up to ``max_damp_retries`` times.
    block_size: columns per lazy batch update (rounded up to a multiple of ``group_size``).
    desc_act: quantize columns in order of decreasing Hessian diagonal (activation order).
    static_groups: compute every group's scales from the original weight before quantizing
    (with ``desc_act`` this keeps groups contiguous, so no ``g_idx`` is needed); otherwise each
    group's scales come from the error-compensated weights when GPTQ enters it.
    true_sequential: quantize q/k/v, then o, then gate/up, then down, re-collecting inputs after
    each subset; False collects every linear's Hessian from the block's float inputs at once.
    min_expert_tokens: an MoE expert whose linears saw fewer calibration tokens falls back to RTN.
    mse_clip: grid-search a per-group clipping ratio in [mse_clip, 1] (the one minimizing the
    group's rounding error, as the GPTQ reference code's ``--mse`` option with its ``maxshrink``
    0.8) instead of plain min/max; 1.0 disables the search.
    """

    method = "gptq"
    damp_percent: float = 0.01
    block_size: int = 128
    desc_act: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    min_expert_tokens: int = 16
    max_damp_retries: int = 6
    mse_clip: float = 0.8

    @field_validator("damp_percent")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("damp_percent must be in (0, 1); the usual value is 0.01")
        return v

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("block_size must be a positive integer such as 128")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, allowed(GPTQ_BITS), "bits must be one of 2, 3, 4 or 8")

    @field_validator("min_expert_tokens", "max_damp_retries")
    @classmethod
    def _nonneg(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("mse_clip")
    @classmethod
    def _clip(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("mse_clip must be in (0, 1]; 1.0 disables the clipping search, 0.8 is the default")
        return v
