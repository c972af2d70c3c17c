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

import time
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
REFIT_CHUNK_ELEMENTS = 2**24
"""Rows per chunk of :func:`refit_scales` so that its ``[rows, n_groups, in]`` product stays at
this many elements (64 MiB in float32)."""
REFIT_RIDGE = 1e-6
"""Ridge added to each row's normal equations, relative to their mean diagonal (a group whose
codes all equal the zero point has no say in its scale)."""
FUSED_ADAM_DEVICES = ("cpu", "cuda")
"""Devices where Adam runs as one fused kernel (fewer passes over ``V`` per step)."""
BF16_MIN_GAIN = 1.5
"""``product="auto"``: the step's Hessian product runs in bfloat16 only where that is measured at
least this much faster than float32 for the layer's shape (CPUs with AMX or AVX512-BF16; on AVX2
bfloat16 is slower and float32 stays)."""
RACE_ROUNDS = 3
"""Timed products per dtype when :func:`product_dtype` races them (after one warm-up each)."""
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
    slope: Tensor
    """``d(dW) / dh``: the scale where rounding up or down gives two codes on the grid, 0 where
    both clamp to the same code (``base < 0`` or ``base >= maxq``)."""
    offset: Tensor
    """``dW`` at ``h = 0``, so that ``dW = offset + slope * h`` (one fused multiply-add a step)."""
    h_product: Tensor
    """``h`` in the dtype of the step's product ``dW H`` (``h`` itself in float32)."""

    @property
    def norm(self) -> float:
        return self.rtn_error if self.rtn_error > 0 else 1.0

    def weight(self, codes: Tensor) -> Tensor:
        """The dequantized weight of (possibly soft) ``codes``, clamped to the grid."""
        return (torch.clamp(codes, 0, self.maxq) - self.z) * self.s


def objective_and_gradient(v: Tensor, prob: RoundingProblem, reg_lambda: float,
                           beta: float | None, with_loss: bool = True) -> tuple[Tensor | None, Tensor]:
    """AdaRound's loss ``output_error / norm + reg_lambda * round_regularizer`` (no regularizer
    when ``beta`` is None) and its gradient with respect to ``V``, written out by hand: one
    ``[out, in] x [in, in]`` product per step (``H`` is symmetric) and a dozen elementwise passes.
    The loss is left out (None) unless ``with_loss``: the optimization needs only the gradient."""
    sig = torch.sigmoid(v)
    stretched = sig.mul(ZETA - GAMMA).add_(GAMMA)
    hv = stretched.clamp(0.0, 1.0)
    inside = hv == stretched
    dw = torch.addcmul(prob.offset, prob.slope, hv)
    hp = prob.h_product
    hdw = dw @ hp if hp.dtype == dw.dtype else (dw.to(hp.dtype) @ hp).float()
    scale = 1.0 / (dw.shape[0] * prob.norm)
    loss = torch.vdot(hdw.flatten(), dw.flatten()) * scale if with_loss else None
    grad_h = hdw.mul_(prob.slope)  # times 2 * scale below
    if beta is not None and reg_lambda > 0:
        t = hv.mul_(2.0).sub_(1.0)  # hv is not needed any more
        a = t.abs()
        a_pow = _power(a, beta - 1.0)
        if loss is not None:
            loss = loss + reg_lambda * (1.0 - torch.vdot(a_pow.flatten(), a.flatten()) / t.numel())
        grad_h.addcmul_(a_pow, t.sign_(), value=-beta * reg_lambda / (t.numel() * scale))
    dsig = torch.addcmul(sig, sig, sig, value=-1.0)  # sigmoid' = sig - sig^2
    return loss, grad_h.mul_(dsig).mul_(inside).mul_(2.0 * scale * (ZETA - GAMMA))


def _power(a: Tensor, p: float) -> Tensor:
    """``a ** p`` for ``a >= 0`` as ``exp(p log a)`` (4x faster than ``pow`` with a fractional
    exponent on CPU; ``0 ** 0 = 1``)."""
    if p == 0.0:
        return torch.ones_like(a)
    return torch.log(a).mul_(p).exp_()


@dataclass
class RoundingResult:
    """Learned codes and what the optimization reached (errors as :func:`output_error`)."""

    codes: Tensor
    rtn_error: float
    error: float
    flipped: float
    """Fraction of weights whose code differs from round-to-nearest's on the same grid."""


_RACED: dict[tuple[str, int, int, int], torch.dtype] = {}
""":func:`product_dtype`'s choices: (device type, out, in, threads) -> dtype."""


def product_dtype(out_f: int, in_f: int, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the step's ``[out, in] x [in, in]`` product on ``device``: bfloat16 where a
    race of the two (once per shape and thread count in a process, on random data) finds it at
    least :data:`BF16_MIN_GAIN` times faster than float32 including the conversion, else float32.
    Only CPUs race; other devices keep float32."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.float32
    key = (device.type, out_f, in_f, torch.get_num_threads())
    if key not in _RACED:
        gen = torch.Generator().manual_seed(0)
        dw = torch.randn(out_f, in_f, generator=gen)
        h = torch.randn(in_f, in_f, generator=gen)
        hb = h.bfloat16()
        fp32 = _best_seconds(lambda: dw @ h)
        bf16 = _best_seconds(lambda: (dw.bfloat16() @ hb).float())
        _RACED[key] = torch.bfloat16 if fp32 >= BF16_MIN_GAIN * bf16 else torch.float32
    return _RACED[key]


def _best_seconds(fn: Callable[[], Tensor]) -> float:
    """Fastest of :data:`RACE_ROUNDS` timed calls of ``fn`` after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(RACE_ROUNDS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rounding_problem(w: Tensor, h: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                     group_size: int, product: torch.dtype = torch.float32) -> RoundingProblem:
    """The per-weight problem of ``w`` [out, in] on the grid ``(scales, zeros)`` [out, n_groups];
    the steps' product ``dW H`` in ``product`` (float32 or bfloat16)."""
    maxq = 2**bits - 1
    s = expand_groups(scales, w.shape[1], group_size)
    z = expand_groups(zeros, w.shape[1], group_size)
    rtn = rtn_codes(w, s, z, maxq)
    base = torch.floor(w / s) + z
    free = (base >= 0) & (base < maxq)
    offset = (base.clamp(0, maxq) - z) * s - w
    return RoundingProblem(w, h, s, z, base, maxq, rtn, float(output_error((rtn - z) * s - w, h)),
                           torch.where(free, s, 0.0), offset, h.to(product))


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
    product: torch.dtype | None = torch.float32,
    on_report: Callable[[int, float], None] | None = None,
) -> RoundingResult:
    """AdaRound of ``w`` [out, in] on the grid ``(scales, zeros)`` [out, n_groups], given
    ``h = X^T X / n`` [in, in]. Minimizes ``output_error / rtn_error + reg_lambda * regularizer``
    with Adam (each step's ``dW H`` in ``product``, None: :func:`product_dtype`'s choice; the
    errors reported in float32); ``on_report(steps_done, loss)`` is called every ``REPORT_EVERY`` steps."""
    with serial_if_small(w):
        dtype = product if product is not None else product_dtype(w.shape[0], w.shape[1], w.device)
    prob = rounding_problem(w, h, scales, zeros, bits, group_size, dtype)
    v = init_v(w / prob.s + prob.z - prob.base)
    opt = torch.optim.Adam([v], lr=lr, fused=v.device.type in FUSED_ADAM_DEVICES)
    with serial_if_small(w):
        for step in range(iterations):
            beta = beta_at(step, iterations, warmup, beta_start, beta_end)
            report = on_report is not None and ((step + 1) % REPORT_EVERY == 0 or step + 1 == iterations)
            loss, v.grad = objective_and_gradient(v, prob, reg_lambda, beta, with_loss=report)
            opt.step()
            if on_report is not None and loss is not None:
                on_report(step + 1, float(loss))
    codes = harden(prob.base, v, prob.maxq)
    error = float(output_error(prob.weight(codes) - w, h))
    return RoundingResult(codes.to(torch.uint8), prob.rtn_error, error, float((codes != prob.rtn).float().mean()))


def row_errors(dw: Tensor, h: Tensor) -> Tensor:
    """``[out]``: each output's error ``dW_r H dW_r^T``."""
    return ((dw @ h) * dw).sum(dim=1)


def grid_error(w: Tensor, h: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> float:
    """:func:`output_error` of integer ``codes`` on the grid ``(scales, zeros)`` [out, n_groups]."""
    s = expand_groups(scales, w.shape[1], group_size)
    z = expand_groups(zeros, w.shape[1], group_size)
    return float(output_error((codes.float() - z) * s - w, h))


def refit_scales(w: Tensor, h: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor,
                 group_size: int) -> Tensor:
    """Scales [out, n_groups] that minimize each output's error ``(W_hat - W) H (W_hat - W)^T``
    for fixed integer ``codes`` and ``zeros``: per row a least-squares problem in its group scales,
    ``G s = b`` with ``G[g, k] = q_g H_gk q_k^T`` and ``b[g] = q_g (H w)_g`` (``q = codes - zeros``).
    A row keeps its old scales where the fit is singular, not finite, not positive, or not better."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    ng = in_f // gs
    q = codes.float() - expand_groups(zeros, in_f, group_size)
    hq = h.reshape(ng, gs, in_f)
    b = (q * (w @ h)).reshape(out_f, ng, gs).sum(dim=2)
    chunk = max(1, REFIT_CHUNK_ELEMENTS // (ng * in_f))
    fitted = []
    for r in range(0, out_f, chunk):
        qc = q[r:r + chunk].reshape(-1, ng, gs)
        t = torch.einsum("rgi,gij->rgj", qc, hq).reshape(-1, ng, ng, gs)
        g = torch.einsum("rgkj,rkj->rgk", t, qc)
        ridge = REFIT_RIDGE * g.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        g = g + ridge[:, None, None] * torch.eye(ng, dtype=g.dtype, device=g.device)
        sol, info = torch.linalg.solve_ex(g, b[r:r + chunk])
        fitted.append(torch.where((info == 0)[:, None], sol, float("nan")))
    new = torch.cat(fitted)
    old_err = row_errors(q * expand_groups(scales, in_f, group_size) - w, h)
    new_err = row_errors(q * expand_groups(new.clamp_min(1e-30), in_f, group_size) - w, h)
    keep = ~(torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1) & (new_err < old_err))
    return torch.where(keep[:, None], scales, new).contiguous()


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
