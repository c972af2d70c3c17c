"""BRECQ options. No torch import."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qcore.plugin import PerLayer, WeightQuantConfig, allowed, check_per_layer

BRECQ_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
BRECQ_ACT_BITS: tuple[int, ...] = (4, 6, 8)
"""Activation widths (``a_bits``): those the core's ``ActQuant`` runs."""


class BrecqConfig(WeightQuantConfig):
    """BRECQ (Li et al., 2021): learn the rounding of every linear of a block jointly.

    Per decoder block, one continuous variable V per weight of each quantizable linear (AdaRound's
    rectified sigmoid h(V), started at the fractional part) is trained with Adam so that the block
    with fake-quantized weights reproduces the float block's output on the calibration inputs
    (from the already-quantized blocks), relative to round-to-nearest's error, plus ``reg_lambda``
    times the mean rounding regularizer ``1 - |2 h(V) - 1|^beta``; then h(V) is hardened to 0 or 1
    and (``scale_refit``) each linear's scales are refit to its codes where that helps the block.
    """

    method = "brecq"
    iterations: int = Field(200, ge=1)
    """Adam steps per block (each on about ``batch_tokens`` calibration tokens)."""
    batch_tokens: int = Field(512, ge=1)
    """Calibration tokens per step: ``max(1, batch_tokens // seq_len)`` whole windows, drawn at
    random from one captured batch (4 windows of 128 tokens, 1 of 512), or, where one batch holds
    fewer, whole batches drawn at random until they hold that many."""
    train_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the block's matmuls in the training steps (bfloat16: ``torch.autocast``, about 2x
    faster per step on CPUs with AMX, slower on AVX2-only ones); the errors that decide what is
    packed are always computed in float32."""
    lr: float = Field(0.1, gt=0.0)
    """Adam learning rate of V (0.3 left many 2-bit SmolLM2 blocks worse than round-to-nearest
    after hardening; 0.1 did not)."""
    reg_lambda: float = Field(300.0, ge=0.0)
    """Weight of the rounding regularizer (mean over the block's weights) against the block's
    output error relative to round-to-nearest's (at 30, 18-23% of SmolLM2's 2-bit rounding
    variables were still undecided at the end and hardening cost more than at 300)."""
    warmup: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of the iterations without regularizer (the paper's 20%)."""
    beta_start: float = Field(20.0, ge=1.0)
    """Regularizer exponent after the warm-up, decayed linearly to ``beta_end``."""
    beta_end: float = Field(2.0, ge=1.0)
    """Regularizer exponent at the last iteration."""
    loss: Literal["mse", "fisher"] = "mse"
    """Output error per element: plain squared error, or weighted by the squared gradient of the
    model's loss with respect to the block output (diagonal Fisher; one gradient pass first)."""
    learn_scales: bool = False
    """Also learn each group's scale (a log-scale factor per group, LSQ-style) jointly with V."""
    scale_lr: float = Field(1e-3, gt=0.0)
    """Adam learning rate of the log-scale factors (``learn_scales``)."""
    scale_init: Literal["minmax", "search"] = "search"
    """Initial scales and zero points: each group's min/max, or the clipping ratio in
    [clip_min, 1] with the smallest round-to-nearest output error through the group's block of
    the input Hessian."""
    clip_min: float = Field(0.7, gt=0.0, le=1.0)
    """Smallest clipping ratio the ``search`` scale init tries."""
    scale_refit: bool = True
    """After hardening, refit each linear's group scales to its codes (AdaRound's least-squares fit
    through the linear's input Hessian), linear by linear, kept only where the block's error drops."""
    step_seed: int = 0
    """Seed of the random choice of calibration windows per step."""
    a_bits: int | None = None
    """Quantize every quantized linear's input at run time to this many bits (W4A8: 8, W4A4: 4;
    symmetric grid), its step size learned jointly with the rounding (LSQ); None: weights only."""
    a_dynamic: bool = False
    """Activation grids: one static step per linear (False), or per-token steps covering a fraction
    (clip ratio) of each token's range (True)."""
    a_learn: bool | None = None
    """Learn the activation steps (True) or keep the initial ones (False: the clip ratio with the
    smallest quantization error on the linear's calibration inputs). None: learn static steps,
    keep dynamic grids' searched clip ratios (on stories260K W4A4, learning lowered the static
    grids' perplexity increase by about 9% and raised the dynamic ones' by 3-14%)."""
    a_lr: float = Field(0.001, gt=0.0)
    """Adam learning rate of the activation steps' parameters (log step, or logit of the clip ratio)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, allowed(BRECQ_BITS), "bits must be one of 2, 3, 4, 5, 6 or 8")

    @field_validator("a_bits")
    @classmethod
    def _a_bits(cls, v: int | None) -> int | None:
        if v is not None and v not in BRECQ_ACT_BITS:
            raise ValueError(f"a_bits must be one of {', '.join(map(str, BRECQ_ACT_BITS))} (W4A8: a_bits=8), "
                             "or None for weights only")
        return v

    @property
    def learns_activation_steps(self) -> bool:
        """Whether the activation steps are trained (``a_learn``, or its default for the grid)."""
        return self.a_learn if self.a_learn is not None else not self.a_dynamic

    @model_validator(mode="after")
    def _betas(self) -> BrecqConfig:
        if self.beta_end > self.beta_start:
            raise ValueError("beta_end must not exceed beta_start (beta decays, e.g. from 20 to 2)")
        return self
