"""HQQ options. No torch import."""
from __future__ import annotations

from pydantic import field_validator

from qcore.plugin import PerLayer, WeightQuantConfig, allowed, check_per_layer, layer_value

HQQ_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
AUTO_SCALE_MAX_BITS = 2
"""With ``optimize_scale=None`` the scale is refit at this many bits and fewer."""
AUTO_ROUND_ZERO_MAX_BITS = 4
"""With ``round_zero=None`` the starting zero point is rounded at this many bits and fewer."""


class HQQConfig(WeightQuantConfig):
    """Half-Quadratic Quantization (Badri and Shaji, 2023): calibration-free; per group, the
    float zero point (and with ``optimize_scale`` the scale) minimizes the lp error between the
    weights and their dequantized values.

    lp_norm: p of the error (p <= 1; smaller forgives outlier weights more).
    beta: initial half-quadratic penalty; kappa: its growth per iteration (``beta *= kappa``).
    iters: maximum solver iterations; early_stop: stop when the mean absolute error stops falling.
    optimize_scale: also refit the scale in closed form (a least-squares affine fit per group)
    instead of keeping the min/max scale as the paper does. ``None`` (default): on at 1 and 2
    bits, where the min/max step is far too coarse (stories260K, 2-bit g32, perplexity 39.7
    with it against 98 without and 167 for RTN), off at 3 bits and more (the paper's setting).
    round_zero: start from the integer zero point ``round(-min / s)`` (0.0 then lies on the
    starting grid, as in RTN) instead of the float one. ``None`` (default): on at 4 bits and
    fewer. The reference package rounds at 4 bits; at 3 bits the float start lands SmolLM2-135M
    (g64) at perplexity 271 against RTN's 101, the rounded one at 94 (docs/results.md).
    axis: the axis groups run along, in HQQ's terms: 1 = along the input features (the only
    layout qcore's packed format stores).
    """

    method = "hqq"
    group_size: PerLayer = 64
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    optimize_scale: bool | None = None
    round_zero: bool | None = None
    axis: int = 1

    def scale_optimized(self, bits: int | None = None) -> bool:
        """Whether the scale is refit at ``bits`` (default: the config's default width):
        ``optimize_scale``, or its per-bits default when None."""
        b = layer_value(self.bits, "") if bits is None else bits
        return self.optimize_scale if self.optimize_scale is not None else b <= AUTO_SCALE_MAX_BITS

    def zero_rounded(self, bits: int | None = None) -> bool:
        """Whether the starting zero point is rounded at ``bits`` (``round_zero``, or its per-bits default)."""
        b = layer_value(self.bits, "") if bits is None else bits
        return self.round_zero if self.round_zero is not None else b <= AUTO_ROUND_ZERO_MAX_BITS

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, allowed(HQQ_BITS), f"bits must be one of {', '.join(map(str, HQQ_BITS))}")

    @field_validator("sym")
    @classmethod
    def _sym(cls, v: bool) -> bool:
        if v:
            raise ValueError("HQQ optimizes a float zero point, so it is asymmetric only; use sym=False "
                             "(the default), or method 'rtn' for a symmetric grid")
        return v

    @field_validator("lp_norm")
    @classmethod
    def _p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("lp_norm must be in (0, 1]; HQQ's default is 0.7")
        return v

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not v > 0.0:
            raise ValueError("beta must be > 0; HQQ's default is 10")
        return v

    @field_validator("kappa")
    @classmethod
    def _kappa(cls, v: float) -> float:
        if not v >= 1.0:
            raise ValueError("kappa must be >= 1 (the penalty may only grow); HQQ's default is 1.01")
        return v

    @field_validator("iters")
    @classmethod
    def _iters(cls, v: int) -> int:
        if v < 0:
            raise ValueError("iters must be >= 0 (0 keeps the min/max start); HQQ's default is 20")
        return v

    @field_validator("axis")
    @classmethod
    def _axis(cls, v: int) -> int:
        if v == 0:
            raise ValueError("axis=0 (groups along the output channels) cannot be stored in qcore's packed "
                             "format, whose scales are [out_features, n_groups] along the input features; "
                             "use axis=1 (the default)")
        if v != 1:
            raise ValueError("axis must be 1 (groups along the input features)")
        return v
