"""SmoothQuant's pure tensor functions (Xiao et al., 2022).

A scale group's linears read one input X [tokens, in]; with per-channel factors s the block
computes ``(X / s) @ (W * s).T == X @ W.T`` exactly (``/ s`` folded into the producer, ``* s``
into the weights' input columns, see :mod:`qcore.arch.fold`). Choosing

    s_j = max|X_j|^a / max_k max_i |W^(k)_ij|^(1-a)

moves a share ``a`` of each input channel's range from the activations to the weights, so
activation outliers shrink and both become easy to quantize.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qcore.plugin import ActQuant, fake_quant_act
from qcore.plugin import quantize_rtn

EPS: float = 1e-5
"""Floor of max|X_j| and max|W_j| before the powers (as the reference implementation)."""
S_RANGE: tuple[float, float] = (1e-5, 1e5)
"""Clamp of the smoothing factors (keeps the folded norm weights finite)."""


def weight_absmax(weights: Sequence[Tensor]) -> Tensor:
    """max over all linears and output rows of |W[:, j]|: float32 [in]."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothing_scales(act_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """s = max|X|^a / max|W|^(1-a), float32 [in]; channels never seen active (or all-zero
    weight columns) get s = 1 so that nothing is divided by a meaningless number."""
    a = act_absmax.float()
    w = w_absmax.float().to(a.device)
    s = a.clamp(min=EPS).pow(alpha) / w.clamp(min=EPS).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(*S_RANGE)


def static_act_scale(absmax: Tensor | float, bits: int) -> float:
    """Per-tensor symmetric scale covering the calibrated range: max|X| / (2^(b-1) - 1)."""
    m = float(absmax.max()) if isinstance(absmax, Tensor) else float(absmax)
    s = m / (2 ** (bits - 1) - 1)
    return s if s > 0 else 1.0


def fake_quant_weight(w: Tensor, bits: int, group_size: int = -1) -> Tensor:
    """Symmetric RTN quantize-dequantize of a [out, in] weight (the weights SmoothQuant ships)."""
    return quantize_rtn(w.float(), bits, group_size, True).dequantize()


def group_error(x: Tensor, weights: Sequence[Tensor], s: Tensor | None, w_bits: int, a_bits: int,
                group_size: int = -1, dynamic: bool = True) -> float:
    """Relative squared output error of a scale group after smoothing by ``s`` (None = no
    smoothing) with fake-quantized weights and activations:
    sum_k ||Q_a(X/s) Q_w(W_k s)^T - X W_k^T||^2 / sum_k ||X W_k^T||^2."""
    xf = x.float()
    xs = xf if s is None else xf / s
    if dynamic:
        act = ActQuant(a_bits, dynamic=True)
    else:
        act = ActQuant(a_bits, dynamic=False, scale=static_act_scale(xs.abs().max(), a_bits))
    xq = fake_quant_act(xs, act)
    num = 0.0
    den = 0.0
    for w in weights:
        wf = w.detach().float()
        ref = xf @ wf.t()
        ws = wf if s is None else wf * s[None, :]
        out = xq @ fake_quant_weight(ws, w_bits, group_size).t()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def search_alpha(x: Tensor, act_absmax: Tensor, weights: Sequence[Tensor], grid: Sequence[float],
                 w_bits: int, a_bits: int, group_size: int = -1,
                 dynamic: bool = True, w_absmax: Tensor | None = None
                 ) -> tuple[float | None, Tensor | None, dict[str, float]]:
    """Best of "no smoothing" and each a of ``grid`` by :func:`group_error` on samples ``x``.

    ``w_absmax``: the weights' per-channel max (default :func:`weight_absmax`; pass a tied one for
    GQA v -> o). Returns ``(alpha or None, s or None, {candidate: error})`` (None = leave the
    group alone)."""
    w_max = weight_absmax(weights) if w_absmax is None else w_absmax
    errors: dict[str, float] = {"none": group_error(x, weights, None, w_bits, a_bits, group_size, dynamic)}
    best: tuple[float, float | None, Tensor | None] = (errors["none"], None, None)
    for a in grid:
        s = smoothing_scales(act_absmax, w_max, float(a))
        err = group_error(x, weights, s, w_bits, a_bits, group_size, dynamic)
        errors[f"{float(a):g}"] = err
        if err < best[0]:
            best = (err, float(a), s)
    return best[1], best[2], errors


def sample_rows(xs: Sequence[Tensor], max_rows: int, seed: int = 0) -> Tensor:
    """At most ``max_rows`` rows drawn without replacement (fixed seed) from the concatenation."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs], dim=0)
    if x.shape[0] <= max_rows:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
    return x[idx.sort().values.to(x.device)]
