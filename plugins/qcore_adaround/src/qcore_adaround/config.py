"""AdaRound options. No torch import."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qcore.plugin import PerLayer, WeightQuantConfig, allowed, check_per_layer

ADAROUND_BITS: tuple[int, ...] = (2, 3, 4, 8)
# The default steps and rate, measured 2026-12-01 (2-vCPU AMD EPYC, AVX2, shared with other
# jobs). stories260K 3-bit g32 (down_proj float), mean perplexity increase over 4 calibration seeds: 1000 steps at lr 0.01
# +1.113, 500 at 0.03 +1.126, 300 at 0.05 +1.136, 200 at 0.05 +1.222 (GPTQ +1.072). SmolLM2-135M
# block 10, 3-bit g64, output error relative to round-to-nearest: q_proj 0.619 / 0.652 / 0.675
# (1000 at 0.01 / 300 at 0.05 / 200 at 0.05), down_proj 0.657 / 0.663 / 0.680. 300 steps at 0.05
# keeps the quality of 1000 within 2% for 0.3x the time.


class AdaRoundConfig(WeightQuantConfig):
    """AdaRound (Nagel et al., 2020): learn, per weight, whether to round up or down.

    Per linear (true-sequential order, inputs from the already-quantized blocks) a continuous
    variable V per weight is trained with Adam on the layer's output error, computed exactly from
    its input Hessian, relative to round-to-nearest's, plus ``reg_lambda`` times the mean
    rounding regularizer ``1 - |2 h(V) - 1|^beta``; then h(V) is hardened to 0 or 1.
    """

    method = "adaround"
    iterations: int = Field(300, ge=1)
    """Adam steps per linear (300 at lr 0.05: measured above)."""
    lr: float = Field(5e-2, gt=0.0)
    """Adam learning rate of V (0.05 with 300 steps; fewer steps need a larger rate)."""
    reg_lambda: float = Field(30.0, ge=0.0)
    """Weight of the rounding regularizer (mean over weights) against the output error relative to RTN's."""
    warmup: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of the iterations without regularizer (the paper's 20%)."""
    beta_start: float = Field(20.0, ge=1.0)
    """Regularizer exponent after the warm-up, decayed linearly to ``beta_end``."""
    beta_end: float = Field(2.0, ge=1.0)
    """Regularizer exponent at the last iteration (at least 1: the regularizer is smooth)."""
    product: Literal["float32", "bfloat16", "auto"] = "float32"
    """dtype of each step's Hessian product ``dW H``: float32; bfloat16 (faster on CPUs with AMX,
    slower on AVX2-only ones); or auto (bfloat16 where a race on the layer's shape finds it at least
    1.5x faster). SmolLM2-135M block 10, 3-bit g64, 300 steps: error relative to round-to-nearest
    q_proj 0.657 / 0.659 (float32 / bfloat16), o_proj 0.527 / 0.527, gate_proj 0.640 / 0.639,
    down_proj 0.551 / 0.555; steps 1.3-1.9x faster in bfloat16 on an Intel Xeon with AMX (one thread,
    bench/adaround_step_time.py). Float32 stays the default until a whole-model run confirms it."""
    scale_init: Literal["minmax", "search"] = "search"
    """Scales and zero points: from each group's min/max, or the clipping ratio in [clip_min, 1]
    whose round-to-nearest output error (the group's block of the Hessian) is smallest."""
    clip_min: float = Field(0.7, gt=0.0, le=1.0)
    """Smallest clipping ratio the ``search`` scale init tries."""
    scale_refit: bool = True
    """After the rounding is hardened, refit each output's group scales to the learned codes:
    the least-squares scales of that output's error through the full input Hessian (closed form;
    a row keeps its scales where the fit is not better)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, allowed(ADAROUND_BITS), "bits must be one of 2, 3, 4 or 8")

    @model_validator(mode="after")
    def _betas(self) -> AdaRoundConfig:
        if self.beta_end > self.beta_start:
            raise ValueError("beta_end must not exceed beta_start (beta decays, e.g. from 20 to 2)")
        return self
