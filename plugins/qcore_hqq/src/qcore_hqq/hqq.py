"""Half-Quadratic Quantization (Badri and Shaji, 2023) as pure tensor functions.

HQQ keeps the round-to-nearest codes ``q = clamp(round(w / s + z), 0, 2**bits - 1)`` but
chooses each group's zero point ``z`` (and optionally its scale ``s``) to minimize the
lp error ``sum |w - (q - z) * s|^p`` with ``p < 1``, which is robust to the few weights that
fall far off the grid. The non-convex problem is split with an auxiliary error variable
``e ~ w - (q - z) * s`` (half-quadratic splitting) and solved by alternating:

1. ``e = shrink_lp(w - w_hat, beta)``: the proximal step of ``|e|^p`` (generalized
   soft-thresholding, :func:`shrink_lp`);
2. ``z = mean(q - (w - e) / s)`` over the group: the closed-form minimizer of the quadratic
   term (with ``optimize_scale``, ``(s, z)`` are the least-squares affine fit of ``w - e``
   on ``q``, also closed form);
3. ``beta *= kappa`` (the penalty schedule); stop early when the mean absolute error stops
   falling.

Conventions follow :mod:`qcore.quant.primitives`: weights are ``[out, in]``, groups run along
``in`` (this is HQQ's ``axis=1``), ``s`` is the step (HQQ stores its inverse) and ``z`` is a
float zero point in code units, so the result is a plain :class:`QuantizedWeight`.
Every group of a layer is solved at once (vectorized over ``[n_groups_total, group_size]``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from qcore.plugin import QuantizedWeight, check_bits, check_group_size

LP_NORM = 0.7
"""Default p of the lp error (the reference implementation's default)."""
BETA = 10.0
"""Default initial half-quadratic penalty."""
KAPPA = 1.01
"""Default growth of the penalty per iteration."""
ITERS = 20
"""Default maximum number of solver iterations."""
EPS = 1e-8
"""Added to ``|x|`` before raising it to the negative power ``p - 1``."""
MIN_SCALE = 1e-8
"""Smallest step kept by the scale update (a flat group keeps its previous step)."""
CHUNK_ELEMENTS = 1 << 18
"""Weights solved together, so the solver's ~25 passes per iteration run on cache-sized pieces
(SmolLM2-135M, 3-bit g64, 2 threads: 6.1 s against 7.2 s for one solve per matrix); early stop is
decided per chunk."""


@dataclass
class HQQStats:
    """What the solver did for one weight (JSON-able through :meth:`as_dict`)."""

    iters: int
    """Iterations run (fewer than ``iters`` when it stopped early)."""
    error_init: float
    """Mean absolute reconstruction error of the min/max start."""
    error: float
    """Mean absolute reconstruction error of the result."""
    mse_init: float
    """Mean squared reconstruction error of the start."""
    mse: float
    """Mean squared reconstruction error of the result (never above ``mse_init``)."""

    def as_dict(self) -> dict[str, float | int]:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in asdict(self).items()}


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Proximal step of ``|x|^p / beta`` used by HQQ: ``sign(x) relu(|x| - |x|^(p-1) / beta)``.

    For ``p == 1`` it is plain soft-thresholding at ``1 / beta``. For ``p < 1`` the threshold
    grows as ``|x|`` shrinks, so small residuals are set to zero and only large ones (the
    outliers the lp norm forgives) survive. An element can only survive when
    ``|x|^(2-p) > 1 / beta``, so the power is evaluated on those elements alone.
    """
    a = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(a - 1.0 / beta)
    alive = a > (1.0 / beta) ** (1.0 / (2.0 - p))
    out = torch.zeros_like(x)
    if bool(alive.any()):
        av = a[alive]
        out[alive] = torch.sign(x[alive]) * torch.relu(av - torch.pow(av + EPS, p - 1.0) / beta)
    return out


def minmax_params(wg: Tensor, bits: int, round_zero: bool = False) -> tuple[Tensor, Tensor]:
    """HQQ's start: ``s = (max - min) / (2**bits - 1)``, ``z = -min / s`` per row of ``wg``.

    Unlike :func:`qcore.quant.primitives.quant_params` the range is not widened to include 0;
    the zero point is rounded to an integer code only with ``round_zero`` (so that 0.0 lies on
    the starting grid). A flat group gets ``s = 1`` (it is then exact).
    """
    wmin = wg.amin(dim=-1, keepdim=True)
    wmax = wg.amax(dim=-1, keepdim=True)
    scale = (wmax - wmin) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -wmin / scale
    return scale, torch.round(zero) if round_zero else zero


def _affine_fit(q: Tensor, target: Tensor, scale: Tensor, dq: Tensor, prod: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``target ~ (q - z) * s`` per row: closed form of the quadratic sub-problem.

    Rows where ``q`` is constant (or the fit's slope is not positive) keep their step and
    only refit the zero point. ``dq`` and ``prod`` are scratch tensors shaped like ``q``.
    """
    qm = q.mean(dim=-1, keepdim=True)
    tm = target.mean(dim=-1, keepdim=True)
    torch.sub(q, qm, out=dq)
    var = torch.mul(dq, dq, out=prod).mean(dim=-1, keepdim=True)
    cov = torch.mul(dq, target, out=prod).mean(dim=-1, keepdim=True)  # sum(dq) = 0: no centring of target
    slope = cov / var.clamp_min(1e-12)
    ok = (var > 1e-12) & (slope > MIN_SCALE)
    scale = torch.where(ok, slope, scale)
    return scale, qm - tm / scale


def _shrunk_target(w: Tensor, resid: Tensor, resid_absmax: float, beta: float, p: float,
                   out: Tensor) -> Tensor:
    """``w - shrink_lp(resid, beta, p)``; just ``w`` (no work) when no residual survives, i.e.
    when ``max |resid|`` is below the shrinkage threshold."""
    threshold = 1.0 / beta if p == 1 else (1.0 / beta) ** (1.0 / (2.0 - p))
    if resid_absmax <= threshold:
        return w
    return torch.sub(w, shrink_lp(resid, beta, p), out=out)


def hqq_solve(wg: Tensor, scale: Tensor, zero: Tensor, bits: int, *, lp_norm: float = LP_NORM,
              beta: float = BETA, kappa: float = KAPPA, iters: int = ITERS, early_stop: bool = True,
              optimize_scale: bool = False) -> tuple[Tensor, Tensor, HQQStats]:
    """Run the half-quadratic proximal solver on grouped weights ``wg [G, group_size]``.

    ``scale`` and ``zero`` are ``[G, 1]`` starting values (:func:`minmax_params`). Returns the
    optimized ``(scale, zero)`` and stats. Early stop (as in the reference) ends the loop at the
    first iteration whose mean absolute error over all groups is not below the best so far.
    Each group returns the iterate with its lowest squared error: where no residual survives the
    shrinkage (the usual case at HQQ's default beta, whose threshold ``beta^(-1/(2-p))`` is far
    above typical rounding errors) every step is an exact coordinate-descent step on the squared
    error (best codes, then best zero), so this is the iterate the updates aim for; and the
    result is never worse than the start. Works in place in a few preallocated ``[G, group_size]``
    buffers (fresh large tensors per operation cost more than the arithmetic on a CPU).
    """
    maxq = 2**bits - 1
    w = wg.float().contiguous()
    scale, zero = scale.float().clone(), zero.float().clone()
    best_scale, best_zero = scale.clone(), zero.clone()
    best_sq = torch.full_like(zero, float("inf"))
    best_abs = torch.zeros_like(zero)
    q, resid, tmp = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
    extra = torch.empty_like(w) if optimize_scale else None
    best_total = float("inf")
    error_init = mse_init = float("nan")
    done = 0
    for step in range(iters + 1):
        torch.div(w, scale, out=q).add_(zero).round_().clamp_(0, maxq)      # codes
        torch.sub(q, zero, out=resid).mul_(scale).sub_(w).neg_()           # w - (q - z) * s
        torch.abs(resid, out=tmp)
        abs_err = tmp.mean(dim=-1, keepdim=True)
        absmax = float(tmp.max())
        sq_err = torch.mul(resid, resid, out=tmp).mean(dim=-1, keepdim=True)
        better = sq_err < best_sq
        best_sq = torch.where(better, sq_err, best_sq)
        best_abs = torch.where(better, abs_err, best_abs)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        total = float(abs_err.mean())
        if step == 0:
            error_init, mse_init = total, float(sq_err.mean())
        if step == iters or (early_stop and step > 0 and not total < best_total):
            break
        best_total = min(best_total, total)
        target = _shrunk_target(w, resid, absmax, beta, lp_norm, tmp)
        if extra is not None:
            scale, zero = _affine_fit(q, target, scale, resid, extra)
        else:
            zero = torch.sub(q, torch.div(target, scale, out=resid), out=resid).mean(dim=-1, keepdim=True)
        beta *= kappa
        done = step + 1
    stats = HQQStats(iters=done, error_init=error_init, error=float(best_abs.mean()), mse_init=mse_init,
                     mse=float(best_sq.mean()))
    return best_scale, best_zero, stats


def _merge_stats(stats: list[HQQStats], weights: list[int]) -> HQQStats:
    """One weight's stats from its chunks' (means weighted by groups, the most iterations)."""
    total = sum(weights)

    def mean(key: str) -> float:
        return sum(getattr(st, key) * n for st, n in zip(stats, weights)) / total

    return HQQStats(iters=max(st.iters for st in stats), error_init=mean("error_init"), error=mean("error"),
                    mse_init=mean("mse_init"), mse=mean("mse"))


def quantize_hqq(w: Tensor, bits: int, group_size: int, *, lp_norm: float = LP_NORM,
                 beta: float = BETA, kappa: float = KAPPA, iters: int = ITERS,
                 early_stop: bool = True, optimize_scale: bool = False,
                 round_zero: bool = False) -> tuple[QuantizedWeight, HQQStats]:
    """HQQ-quantize a ``[out, in]`` weight into the core's :class:`QuantizedWeight`.

    Groups of ``group_size`` input columns (-1: one group per output channel). Codes are
    ``clamp(round(w / s + z), 0, 2**bits - 1)`` with the optimized float ``(s, z)``, so
    ``dequantize()`` gives exactly the solver's reconstruction.
    """
    check_bits(bits)
    out_f, in_f = w.shape
    n_groups = check_group_size(in_f, group_size)
    wg = w.detach().float().reshape(out_f * n_groups, -1)
    scale, zero = minmax_params(wg, bits, round_zero)
    rows = max(1, CHUNK_ELEMENTS // wg.shape[1])
    parts = [hqq_solve(wg[i:i + rows], scale[i:i + rows], zero[i:i + rows], bits, lp_norm=lp_norm, beta=beta,
                       kappa=kappa, iters=iters, early_stop=early_stop, optimize_scale=optimize_scale)
             for i in range(0, wg.shape[0], rows)]
    scale = torch.cat([p[0] for p in parts])
    zero = torch.cat([p[1] for p in parts])
    stats = _merge_stats([p[2] for p in parts], [p[0].shape[0] for p in parts])
    codes = torch.div(wg, scale).add_(zero).round_().clamp_(0, 2**bits - 1).to(torch.uint8).reshape(out_f, in_f)
    qw = QuantizedWeight(codes=codes, scales=scale.reshape(out_f, n_groups).contiguous(),
                         zeros=zero.reshape(out_f, n_groups).contiguous(), bits=bits,
                         group_size=group_size, sym=False)
    return qw, stats
