"""AWQ's searches as small pure tensor functions (Lin et al., 2023).

Scale search: for a group of linears that read the same input ``x``, scale input channel ``j``
by ``s_j`` (weights' columns times ``s``, the input divided by ``s`` upstream), with
``s = mean|x|^a / mean|w|^(1-a)`` for ``a`` on a grid; keep the ``a`` whose quantized output is
closest to the float output. Clip search: per output row and weight group, shrink the weight
range and keep the shrink that minimizes that group's contribution to the output error.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Smallest scale before normalization (keeps channels with no activation finite).
MIN_SCALE = 1e-4

FakeQuant = Callable[[Tensor], Tensor]
"""w [out, in] float -> quantized-then-dequantized w (same shape), e.g. RTN at the chosen bits."""


def alpha_grid(n_grid: int) -> list[float]:
    """The exponents searched: 0, 1/n, ..., (n-1)/n (20 points by default)."""
    return [i / n_grid for i in range(n_grid)]


def shrink_grid(clip_grid: int, max_shrink: float) -> list[float]:
    """Range multipliers searched by the clip search: 1, 1 - 1/g, ... > 1 - max_shrink."""
    return [1.0 - i / clip_grid for i in range(max(1, int(round(max_shrink * clip_grid))))]


def activation_mean(x: Tensor) -> Tensor:
    """Mean |x| per input channel over every token: [..., in] -> float32 [in]."""
    return x.detach().float().abs().reshape(-1, x.shape[-1]).mean(0)


def weight_mean(weights: Sequence[Tensor], group_size: int | Sequence[int]) -> Tensor:
    """Mean over output rows of |w| normalized by its group's absmax: -> float32 [in].

    ``weights`` are the [out, in] weights of one scale group (their rows pooled);
    ``group_size`` (one for all, or one per weight) -1 means one group per row.
    """
    sizes = [group_size] * len(weights) if isinstance(group_size, int) else list(group_size)
    normed = []
    for wi, size in zip(weights, sizes):
        w = wi.detach().float()
        rows, cols = w.shape
        gs = cols if size == -1 else size
        if cols % gs:
            raise ValueError(f"group_size {gs} does not divide in_features {cols}")
        grouped = w.abs().reshape(rows, cols // gs, gs)
        normed.append((grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(rows, cols))
    return torch.cat(normed, dim=0).mean(0)


def awq_scales(x_mean: Tensor, w_mean: Tensor | None, alpha: float, duo_scaling: bool = True) -> Tensor:
    """s = x_mean^a / w_mean^(1-a) (or x_mean^a), clamped and normalized so sqrt(max*min) = 1."""
    s = x_mean.float().clamp_min(MIN_SCALE).pow(alpha)
    if duo_scaling:
        if w_mean is None:
            raise ValueError("duo_scaling needs w_mean")
        s = s / w_mean.float().clamp_min(MIN_SCALE).pow(1.0 - alpha)
    s = s.clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(w: Tensor, s: Tensor, fake_quant: FakeQuant) -> Tensor:
    """The effective weight after scaling columns by ``s``, quantizing, and folding 1/s upstream:
    Q(w * s) / s, so that it applies to the UNscaled input."""
    s = s.to(w.dtype)
    return fake_quant(w * s[None, :]) / s[None, :]


def search_scale(
    x_mean: Tensor,
    w_mean: Tensor | None,
    loss_fn: Callable[[Tensor], float],
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[Tensor, float | None, list[float], float]:
    """Grid search of the exponent ``a``.

    ``loss_fn(s)`` returns the output error with the group's weights scaled by ``s`` and
    quantized. Returns ``(best_s, best_alpha, losses_per_alpha, loss_unscaled)``; ``best_alpha``
    is None (and ``best_s`` all ones) when no scaled candidate beats leaving the group unscaled.
    """
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    base = float(loss_fn(ones))
    best_s, best_alpha, best_loss = ones, None, base
    losses = []
    for alpha in alpha_grid(n_grid):
        s = awq_scales(x_mean, w_mean, alpha, duo_scaling)
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best_loss:
            best_s, best_alpha, best_loss = s, alpha, loss
    return best_s, best_alpha, losses, base


def clip_bounds(w: Tensor, group_size: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per (row, group) range the quantizer uses (qcore's grid: asymmetric ranges include 0):
    two [out, n_groups] tensors ``(lo, hi)``."""
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    g = w.reshape(rows, cols // gs, gs)
    if sym:
        a = g.abs().amax(-1)
        return -a, a
    return g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)


def apply_clip(w: Tensor, shrink: Tensor, group_size: int, sym: bool) -> Tensor:
    """Clamp each (row, group) of w to ``shrink`` times its quantization range.

    ``shrink`` is [out, n_groups] in (0, 1]. RTN of the result equals RTN of ``w`` with
    ``clip=shrink``, and a later GPTQ sees the shrunk range.
    """
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    lo, hi = clip_bounds(w, group_size, sym)
    g = w.reshape(rows, cols // gs, gs)
    sh = shrink.to(w.dtype)[..., None]
    return torch.clamp(g, min=lo[..., None] * sh, max=hi[..., None] * sh).reshape(rows, cols)


def search_clip(
    w: Tensor,
    x: Tensor,
    group_size: int,
    sym: bool,
    fake_quant: FakeQuant,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    row_chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """Per (row, group) shrink of the weight range minimizing that group's output error.

    w: [out, in]; x: [tokens, in] sampled inputs of this linear. The error of a group is
    mean over tokens of (x_g . q(w_g) - x_g . w_g)^2, the group's share of the output.
    Returns ``(shrink [out, n_groups], error_reduction [out, n_groups] >= 0)``.
    """
    w = w.detach().float()
    x = x.detach().float().reshape(-1, w.shape[1])
    shrinks = []
    gains = []
    for start in range(0, w.shape[0], row_chunk):
        s, g = _search_clip_rows(w[start:start + row_chunk], x, group_size, sym, fake_quant, clip_grid, max_shrink)
        shrinks.append(s)
        gains.append(g)
    return torch.cat(shrinks), torch.cat(gains)


def _search_clip_rows(w: Tensor, x: Tensor, group_size: int, sym: bool, fake_quant: FakeQuant, clip_grid: int,
                      max_shrink: float) -> tuple[Tensor, Tensor]:
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    n_groups = cols // gs
    xg = x.reshape(-1, n_groups, gs).transpose(0, 1)                       # [G, T, gs]
    ref = torch.bmm(xg, w.reshape(rows, n_groups, gs).permute(1, 2, 0))    # [G, T, rows]
    best_err = torch.full((rows, n_groups), float("inf"))
    best = torch.ones(rows, n_groups)
    first_err = None
    for shrink in shrink_grid(clip_grid, max_shrink):
        cand = torch.full((rows, n_groups), shrink)
        q = fake_quant(apply_clip(w, cand, group_size, sym))
        out = torch.bmm(xg, q.reshape(rows, n_groups, gs).permute(1, 2, 0))
        err = (out - ref).pow(2).mean(1).transpose(0, 1)                   # [rows, G]
        if first_err is None:
            first_err = err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    assert first_err is not None
    return best, (first_err - best_err).clamp_min(0)
