"""GPTQ (Frantar et al., 2022) as pure tensor functions.

Given a weight ``W`` [out, in] and the Hessian proxy ``H`` [in, in] (``2/n sum x x^T`` of the
layer's calibration inputs), :func:`gptq_quantize` rounds ``W`` one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the
upper Cholesky factor of ``H^-1``. Updates are applied lazily, a block of columns at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qcore.plugin import CalibrationError
from qcore.plugin import get_logger
from qcore.plugin import QuantizedWeight, quant_params, quantize_rtn

log = get_logger("qcore_gptq")

DAMP_GROWTH = 10.0
"""Factor applied to the dampening after each failed Cholesky factorization."""
SUB_BLOCK = 32
"""Columns whose errors are applied to each other one by one; the rest of a block gets them by matmul."""
MSE_GRID = 10
"""Number of clipping ratios tried between 1.0 and ``mse_clip`` by the clipping search."""
MSE_NORM = 2.4
"""Norm of the rounding error minimized by the clipping search (as in the GPTQ reference)."""


@dataclass
class GPTQStats:
    """What happened to one matrix (JSON-able through :meth:`as_dict`)."""

    damp: float = 0.0          # absolute dampening finally added to diag(H)
    damp_retries: int = 0      # Cholesky failures before it succeeded
    dead_columns: int = 0      # input columns with diag(H) == 0 (never active)
    loss: float = 0.0          # sum over columns of err^2 / Hinv_ii^2 / 2  (the GPTQ objective)
    fallback: str = ""         # non-empty when RTN was used instead, with the reason
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"damp": self.damp, "damp_retries": self.damp_retries,
               "dead_columns": self.dead_columns, "loss": self.loss}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


def fake_quant(w: Tensor, scales: Tensor, zeros: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Round ``w`` onto the grid ``(code - zero) * scale``; returns (codes, dequantized).

    ``scales``/``zeros`` broadcast against ``w`` (e.g. [out] for one column, [out, 1] for a slice).
    """
    codes = torch.clamp(torch.round(w / scales + zeros), 0, maxq)
    return codes, (codes - zeros) * scales


def group_params(w: Tensor, bits: int, sym: bool, mse_clip: float = 1.0) -> tuple[Tensor, Tensor]:
    """Scales and zeros [out] for the columns of ``w`` [out, k] taken as one group.

    With ``mse_clip < 1`` each row picks, from ``MSE_GRID`` ratios in [mse_clip, 1], the clipped
    range whose rounding error (``MSE_NORM``-norm) is smallest.
    """
    scales, zeros = quant_params(w, bits, -1, sym)
    scales, zeros = scales[:, 0], zeros[:, 0]
    if mse_clip >= 1.0:
        return scales, zeros
    maxq = 2**bits - 1
    best = _err(w, scales, zeros, maxq)
    for step in range(1, MSE_GRID + 1):
        ratio = 1.0 - (1.0 - mse_clip) * step / MSE_GRID
        s, z = quant_params(w, bits, -1, sym, clip=ratio)
        s, z = s[:, 0], z[:, 0]
        err = _err(w, s, z, maxq)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scales = torch.where(better, s, scales)
            zeros = torch.where(better, z, zeros)
    return scales, zeros


def _err(w: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    _, dq = fake_quant(w, s[:, None], z[:, None], maxq)
    return (dq - w).abs().pow(MSE_NORM).sum(1)


def dead_columns(h: Tensor) -> Tensor:
    """Boolean [in]: input columns that were never active (zero Hessian diagonal)."""
    return torch.diagonal(h) == 0


def inverse_cholesky(h: Tensor, damp_percent: float, max_retries: int = 6,
                     name: str = "") -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = damp_percent * mean(diag H)``.

    When ``H + damp I`` (or its inverse) is not positive definite in float32 the dampening grows
    by ``DAMP_GROWTH`` and the factorization is retried, at most ``max_retries`` times.
    Returns (factor, damp used, number of retries).
    """
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    percent = damp_percent
    for attempt in range(max_retries + 1):
        damp = percent * mean_diag
        low, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(up).all()):
                if attempt:
                    log.info("gptq %s: Hessian needed damp_percent=%g (%d retries)", name, percent, attempt)
                return up, damp, attempt
        log.warning("gptq %s: Hessian not positive definite with damp_percent=%g; retrying with %g",
                    name or "layer", percent, percent * DAMP_GROWTH)
        percent *= DAMP_GROWTH
    raise CalibrationError(
        f"GPTQ could not factor the Hessian of {name or 'a layer'} even with damp_percent={percent:g}; "
        "the calibration inputs are degenerate: give more or more varied calibration text"
    )


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    *,
    damp_percent: float = 0.01,
    block_size: int = 128,
    desc_act: bool = False,
    static_groups: bool = False,
    mse_clip: float = 1.0,
    max_damp_retries: int = 6,
    name: str = "",
) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize ``weight`` [out, in] with GPTQ given ``hessian`` [in, in]; returns (weight, stats).

    ``group_size`` must divide ``in`` (or be -1: one scale per output row). With ``desc_act``
    columns are processed in order of decreasing ``diag(H)``; without ``static_groups`` groups are
    then formed in that order and ``g_idx`` records each original column's group. No NaN or inf
    ever reaches the result: a non-finite Hessian or result falls back to RTN (stats.fallback).
    """
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise CalibrationError(
            f"Hessian of {name or 'layer'} has shape {tuple(hessian.shape)}, expected ({in_f}, {in_f}): "
            "collect it from this layer's inputs"
        )
    if group_size != -1 and in_f % group_size:
        raise CalibrationError(
            f"group_size {group_size} does not divide in_features {in_f} of {name or 'layer'}; "
            "use a divisor of in_features or -1"
        )
    stats = GPTQStats()
    w = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(w).all()):
        raise CalibrationError(f"weight of {name or 'layer'} contains NaN or inf; fix the model before quantizing")
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        stats.fallback = "non-finite Hessian (NaN/inf activations)"
        log.warning("gptq %s: %s; using RTN", name or "layer", stats.fallback)
        return quantize_rtn(w, bits, group_size, sym), stats
    h = 0.5 * (h + h.T)

    dead = dead_columns(h)
    stats.dead_columns = int(dead.sum())
    if stats.dead_columns:
        idx = torch.nonzero(dead).flatten()
        h[idx, idx] = 1.0
        w[:, dead] = 0.0

    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs

    static_scales = static_zeros = None
    if static_groups or group_size == -1:
        # every group's parameters from the (dead-zeroed) original weight, in original order
        # (each (row, group) pair is one row of the search)
        s, z = group_params(w.reshape(out_f * n_groups, gs), bits, sym, mse_clip)
        static_scales, static_zeros = s.reshape(out_f, n_groups), z.reshape(out_f, n_groups)

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    hinv, stats.damp, stats.damp_retries = inverse_cholesky(h, damp_percent, max_damp_retries, name)
    del h

    # a block holds whole groups, so each group's scales can come from the updated block
    block = block_size if group_size == -1 else max(1, math.ceil(block_size / gs)) * gs
    sub = SUB_BLOCK if group_size == -1 else math.gcd(SUB_BLOCK, gs)
    codes_t, dyn_scales, dyn_zeros, loss = _gptq_columns(
        w.t().contiguous(), hinv, bits, gs, sym, mse_clip, block, sub, static_scales, static_zeros,
        ((perm if perm is not None else torch.arange(in_f, device=w.device)) // gs).tolist())
    codes = codes_t.t()
    stats.loss = loss

    g_idx = None
    if static_scales is not None:
        scales, zeros = static_scales, static_zeros
    else:
        scales, zeros = dyn_scales, dyn_zeros
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if static_scales is None and group_size != -1:
            g_idx = (inv // gs).to(torch.int32)  # original column j sat at position inv[j]
    qw = QuantizedWeight(codes=codes.to(torch.uint8), scales=scales.contiguous(), zeros=zeros.contiguous(),
                         bits=bits, group_size=group_size, sym=sym, g_idx=g_idx)
    if not bool(torch.isfinite(scales).all() & torch.isfinite(zeros).all()) or \
            not bool(torch.isfinite(qw.dequantize()).all()):
        stats.fallback = "non-finite result"
        log.warning("gptq %s: %s; using RTN", name or "layer", stats.fallback)
        return quantize_rtn(weight.detach().float(), bits, group_size, sym), stats
    return qw, stats


def _gptq_columns(wt: Tensor, hinv: Tensor, bits: int, gs: int, sym: bool, mse_clip: float, block: int,
                  sub: int, static_scales: Tensor | None, static_zeros: Tensor | None,
                  col_group: list[int]) -> tuple[Tensor, Tensor, Tensor, float]:
    """GPTQ's column loop on the TRANSPOSED weight ``wt`` [in, out] (a column is a contiguous row).

    Two levels of lazy updates: inside a ``block`` of columns the error of each column reaches
    only the rest of its ``sub``-column slice at once; the slice's errors reach the rest of the
    block in one matmul, and the block's the remaining columns in another (the same arithmetic
    as updating every later column after each one, in fewer, larger operations). ``sub`` divides
    the group size, so a group's dynamic scales see every earlier update.
    Returns (codes [in, out], dynamic scales and zeros [out, n_groups], loss).
    """
    in_f, out_f = wt.shape
    maxq = 2**bits - 1
    codes_t = torch.zeros(in_f, out_f, dtype=torch.float32, device=wt.device)
    dyn_scales = torch.zeros(out_f, in_f // gs, dtype=torch.float32, device=wt.device)
    dyn_zeros = torch.zeros_like(dyn_scales)
    loss = 0.0
    scale = zero = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        n = i2 - i1
        for j1 in range(0, n, sub):
            j2 = min(j1 + sub, n)
            for i in range(j1, j2):
                col = i1 + i
                if static_scales is not None:
                    g = col_group[col]
                    scale, zero = static_scales[:, g], static_zeros[:, g]
                elif col % gs == 0:
                    scale, zero = group_params(w1[i:i + gs].t(), bits, sym, mse_clip)
                    dyn_scales[:, col // gs] = scale
                    dyn_zeros[:, col // gs] = zero
                x = w1[i]
                c, q = fake_quant(x, scale, zero, maxq)
                codes_t[col] = c
                e = (x - q).div_(hinv1[i, i])
                if i + 1 < j2:
                    w1[i + 1:j2].addr_(hinv1[i, i + 1:j2], e, alpha=-1.0)
                err1[i] = e
            if j2 < n:
                w1[j2:] -= hinv1[j1:j2, j2:].t() @ err1[j1:j2]
        if i2 < in_f:
            wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
        loss += float((err1 * err1).sum()) / 2
    return codes_t, dyn_scales, dyn_zeros, loss


def layer_error(w: Tensor, q: Tensor, x: Tensor) -> float:
    """``||W X^T - Q X^T||_F^2`` for inputs ``x`` [tokens, in] (a test and bench helper)."""
    return float(((x @ (w - q).T) ** 2).sum())


def hessian_from_inputs(x: Tensor) -> Tensor:
    """``2/n sum x x^T`` for inputs ``x`` [tokens, in] (float32), as the engine collects it."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return 2.0 / max(1, x.shape[0]) * (x.T @ x)
