"""AdaRound (Nagel et al., 2020) as pure tensor functions.

A weight ``w`` with scale ``s`` and zero point ``z`` (both per group) becomes the code
``floor(w / s) + z + h`` with ``h`` in {0, 1}: round down or up. AdaRound relaxes ``h`` to the
rectified sigmoid ``h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)`` of a free variable
``V`` per weight, starts from ``h(V) = w / s - floor(w / s)`` (the soft weight equals ``w``), and
minimizes the layer's output error plus a regularizer ``1 - |2 h - 1|^beta`` that pushes each
``h`` to 0 or 1 as ``beta`` decays; ``h`` is then hardened.

The output error over the calibration tokens ``X`` [n, in] is ``||X dW^T||^2 / n = tr(dW H dW^T)``
with ``H = X^T X / n`` and ``dW`` the change of the weight: one ``[out, in] x [in, in]`` product
per step, whatever the number of tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from qcore.plugin import quant_params

ZETA = 1.1
"""Upper stretch of the rectified sigmoid (the paper's zeta)."""
GAMMA = -0.1
"""Lower stretch of the rectified sigmoid (the paper's gamma)."""
CLIP_STEPS = 10
"""Clipping ratios the scale search tries between 1 and ``clip_min`` (1 included)."""
REPORT_EVERY = 50
"""Steps between two calls of the progress callback."""
SERIAL_WORK = 2**24
"""Below this many multiply-adds per step (``out * in^2``) a CPU layer is processed on one thread:
waking threads costs more than the work (measured on 2 busy cores: a 172 x 64 layer takes 0.8 ms
per step on one thread, 6 ms on two; ``torch.round`` of a 64 x 64 tensor 2 us against 12 ms)."""


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: Tensor) -> Tensor:
    """The ``V`` with ``rectified_sigmoid(V) == frac`` for ``frac`` in [0, 1)."""
    p = (frac - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def beta_at(step: int, iterations: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """The regularizer exponent at ``step``: None during the warm-up (no regularizer), then a
    linear decay from ``beta_start`` to ``beta_end`` over the remaining steps."""
    start = int(warmup * iterations)
    if step < start:
        return None
    rel = (step - start) / max(iterations - 1 - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)


def round_regularizer(h: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The mean of ``1 - |2 h - 1|^beta`` (0 when every ``h`` is 0 or 1, near 1 when most are
    near 1/2) and its gradient with respect to ``h``, with one ``pow``; ``beta >= 1``."""
    t = 2.0 * h - 1.0
    a = t.abs()
    a_pow = a.pow(beta - 1.0)
    return (1.0 - a_pow * a).mean(), (-2.0 * beta / h.numel()) * a_pow * torch.sign(t)


def expand_groups(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """``[out, n_groups]`` per-group values as ``[out, in]``, one per weight."""
    gs = in_features if group_size == -1 else group_size
    return t.repeat_interleave(gs, dim=1)


def output_error(dw: Tensor, h: Tensor) -> Tensor:
    """Mean squared output error per output feature, ``tr(dW H dW^T) / out``, with ``H = X^T X / n``."""
    return ((dw @ h) * dw).sum() / dw.shape[0]


def group_output_error(dw: Tensor, h: Tensor, group_size: int) -> Tensor:
    """``[out, n_groups]``: each group's output error through its own diagonal block of ``H``
    (the cross terms between groups left out), so groups can be chosen independently."""
    out_f, in_f = dw.shape
    gs = in_f if group_size == -1 else group_size
    d = dw.reshape(out_f, in_f // gs, gs)
    blocks = torch.stack([h[i:i + gs, i:i + gs] for i in range(0, in_f, gs)])
    return torch.einsum("ogi,gij,ogj->og", d, blocks, d)


def rtn_codes(w: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """Round-to-nearest codes (float) of ``w`` with per-weight scales ``s`` and zeros ``z``."""
    return torch.clamp(torch.round(w / s + z), 0, maxq)


def rtn_weight(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Round-to-nearest on the grid ``(scales, zeros)`` [out, n_groups], dequantized ``[out, in]``."""
    s = expand_groups(scales, w.shape[1], group_size)
    z = expand_groups(zeros, w.shape[1], group_size)
    return (rtn_codes(w, s, z, 2**bits - 1) - z) * s


def search_scales(w: Tensor, h: Tensor, bits: int, group_size: int, sym: bool,
                  clip_min: float) -> tuple[Tensor, Tensor]:
    """Per (row, group), the scales and zeros of the clipping ratio in [clip_min, 1] whose
    round-to-nearest output error (:func:`group_output_error`) is smallest; ratio 1 wins ties."""
    ratios = [1.0 - (1.0 - clip_min) * i / CLIP_STEPS for i in range(CLIP_STEPS + 1)] if clip_min < 1 else [1.0]
    params = [quant_params(w, bits, group_size, sym, clip=r) for r in ratios]
    errs = torch.stack([group_output_error(rtn_weight(w, s, z, bits, group_size) - w, h, group_size)
                        for s, z in params])
    best = errs.argmin(dim=0, keepdim=True)  # first minimum: the widest range among equals
    scales = torch.stack([s for s, _ in params]).gather(0, best)[0]
    zeros = torch.stack([z for _, z in params]).gather(0, best)[0]
    return scales.contiguous(), zeros.contiguous()


@dataclass
class RoundingProblem:
    """One layer's rounding problem in per-weight form (every tensor ``[out, in]`` except ``h``)."""

    w: Tensor
    h: Tensor
    """``X^T X / n`` [in, in] (symmetric)."""
    s: Tensor
    z: Tensor
    base: Tensor
    """``floor(w / s) + z``: the code when rounding down."""
    maxq: int
    rtn: Tensor
    """Round-to-nearest's codes."""
    rtn_error: float
    """Round-to-nearest's output error: the reconstruction term is relative to it."""

    @property
    def norm(self) -> float:
        return self.rtn_error if self.rtn_error > 0 else 1.0

    def weight(self, codes: Tensor) -> Tensor:
        """The dequantized weight of (possibly soft) ``codes``, clamped to the grid."""
        return (torch.clamp(codes, 0, self.maxq) - self.z) * self.s


def objective_and_gradient(v: Tensor, prob: RoundingProblem, reg_lambda: float,
                           beta: float | None) -> tuple[Tensor, Tensor]:
    """AdaRound's loss ``output_error / norm + reg_lambda * round_regularizer`` (no regularizer
    when ``beta`` is None) and its gradient with respect to ``V``, written out by hand: one
    ``[out, in] x [in, in]`` product per step (``H`` is symmetric)."""
    sig = torch.sigmoid(v)
    stretched = sig * (ZETA - GAMMA) + GAMMA
    hv = stretched.clamp(0.0, 1.0)
    codes = prob.base + hv
    dw = prob.weight(codes) - prob.w
    hdw = dw @ prob.h
    scale = 1.0 / (dw.shape[0] * prob.norm)
    loss = (hdw * dw).sum() * scale
    on_grid = (codes >= 0) & (codes <= prob.maxq)
    grad_h = torch.where(on_grid, hdw * prob.s, 0.0).mul_(2.0 * scale)
    if beta is not None and reg_lambda > 0:
        reg, reg_grad = round_regularizer(hv, beta)
        loss = loss + reg_lambda * reg
        grad_h.add_(reg_grad, alpha=reg_lambda)
    inside = (stretched >= 0.0) & (stretched <= 1.0)
    return loss, torch.where(inside, grad_h * sig * (1.0 - sig), 0.0).mul_(ZETA - GAMMA)


@dataclass
class RoundingResult:
    """Learned codes and what the optimization reached (errors as :func:`output_error`)."""

    codes: Tensor
    rtn_error: float
    error: float
    flipped: float
    """Fraction of weights whose code differs from round-to-nearest's on the same grid."""


def rounding_problem(w: Tensor, h: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                     group_size: int) -> RoundingProblem:
    """The per-weight problem of ``w`` [out, in] on the grid ``(scales, zeros)`` [out, n_groups]."""
    maxq = 2**bits - 1
    s = expand_groups(scales, w.shape[1], group_size)
    z = expand_groups(zeros, w.shape[1], group_size)
    rtn = rtn_codes(w, s, z, maxq)
    return RoundingProblem(w, h, s, z, torch.floor(w / s) + z, maxq, rtn,
                           float(output_error((rtn - z) * s - w, h)))


def learn_rounding(
    w: Tensor,
    h: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    *,
    iterations: int,
    lr: float,
    reg_lambda: float,
    warmup: float,
    beta_start: float,
    beta_end: float,
    on_report: Callable[[int, float], None] | None = None,
) -> RoundingResult:
    """AdaRound of ``w`` [out, in] on the grid ``(scales, zeros)`` [out, n_groups], given
    ``h = X^T X / n`` [in, in]. Minimizes ``output_error / rtn_error + reg_lambda * regularizer``
    with Adam; ``on_report(steps_done, loss)`` is called every ``REPORT_EVERY`` steps."""
    prob = rounding_problem(w, h, scales, zeros, bits, group_size)
    v = init_v(w / prob.s + prob.z - prob.base)
    opt = torch.optim.Adam([v], lr=lr)
    with serial_if_small(w):
        for step in range(iterations):
            beta = beta_at(step, iterations, warmup, beta_start, beta_end)
            loss, v.grad = objective_and_gradient(v, prob, reg_lambda, beta)
            opt.step()
            if on_report is not None and ((step + 1) % REPORT_EVERY == 0 or step + 1 == iterations):
                on_report(step + 1, float(loss))
    codes = harden(prob.base, v, prob.maxq)
    error = float(output_error(prob.weight(codes) - w, h))
    return RoundingResult(codes.to(torch.uint8), prob.rtn_error, error, float((codes != prob.rtn).float().mean()))


def harden(base: Tensor, v: Tensor, maxq: int) -> Tensor:
    """Final codes ``clamp(base + [h(V) >= 1/2], 0, maxq)`` (float tensor of integers)."""
    return torch.clamp(base + (rectified_sigmoid(v) >= 0.5).to(base.dtype), 0, maxq)


@contextmanager
def serial_if_small(w: Tensor) -> Iterator[None]:
    """One torch thread while a CPU weight this small is processed (:data:`SERIAL_WORK`)."""
    out_f, in_f = w.shape
    if w.device.type != "cpu" or out_f * in_f * in_f >= SERIAL_WORK or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
