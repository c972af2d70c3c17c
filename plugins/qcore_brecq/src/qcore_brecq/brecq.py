"""BRECQ (Li et al., 2021) as small tensor functions: fake-quantized weights that are a
differentiable function of AdaRound's rounding variables, the block's reconstruction loss, and
slicing a block call's arguments to a subset of its calibration windows.

A weight ``w`` on the grid ``(s, z)`` (per group) has the code ``floor(w / s) + z + h`` with
``h = rectified_sigmoid(V)`` in [0, 1] (AdaRound's relaxation, :mod:`qcore_adaround.adaround`);
the fake-quantized weight is ``s * (clamp(code, 0, maxq) - z)``. With ``learn_scales`` the scale
is ``s0 * exp(t)`` with a learned ``t`` per group (the codes' integer part stays that of ``s0``).
Hardening replaces ``h`` by ``[h >= 1/2]``; :func:`fake_quant` with ``hard=True`` is exactly the
weight the stored codes dequantize to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from qcore_adaround.adaround import expand_groups, init_v, rectified_sigmoid


@dataclass
class RoundingVars:
    """One linear's learned rounding: fixed grid and integer part, free ``v`` (and ``log_scale``)."""

    base: Tensor
    """``floor(w / s0) + z`` [out, in]: the code when rounding down."""
    scales: Tensor
    """Initial scales ``s0`` [out, n_groups]."""
    zeros: Tensor
    """Zero points [out, n_groups] (code units)."""
    v: Tensor
    """Rounding variables [out, in] (a leaf that requires grad)."""
    log_scale: Tensor | None
    """Learned log-factor of each group's scale [out, n_groups], or None (scales fixed)."""
    bits: int
    group_size: int
    refit: Tensor | None = None
    """Scales [out, n_groups] refit to the hardened codes (``scale_refit``), as stored; None: the
    learned (or initial) scales are packed."""

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def current_scales(self) -> Tensor:
        """The scales [out, n_groups] now (``s0 * exp(t)`` when scales are learned), rounded as
        they will be stored (the rounding passed straight through for the gradient)."""
        if self.log_scale is None:
            return self.scales
        s = self.scales * torch.exp(self.log_scale)
        return s + (storage_round(s.detach(), self.bits) - s.detach())

    def parameters(self) -> list[Tensor]:
        return [self.v] if self.log_scale is None else [self.v, self.log_scale]


STORAGE_DTYPE_LOW_BITS = torch.bfloat16
"""dtype qcore's ``QuantLinear`` stores the scales of 1-4-bit weights with integer zero points in
(float16 above 4 bits); the fake-quantized weights use scales rounded the same way, so that the
stored layer computes what was trained."""


def storage_round(scales: Tensor, bits: int) -> Tensor:
    """``scales`` rounded to the dtype the packed layer stores them in (back in float32)."""
    dtype = STORAGE_DTYPE_LOW_BITS if bits <= 4 else torch.float16
    return scales.to(dtype).float()


def rounding_vars(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
                  learn_scales: bool = False) -> RoundingVars:
    """The variables of ``w`` [out, in] on the grid ``(scales, zeros)``, started so that the soft
    fake-quantized weight equals ``w`` wherever ``w`` lies inside the grid's range."""
    w = w.detach().float()
    scales = storage_round(scales, bits)
    s = expand_groups(scales, w.shape[1], group_size)
    z = expand_groups(zeros, w.shape[1], group_size)
    base = torch.floor(w / s) + z
    v = init_v((w / s + z - base).clamp(0.0, 1.0 - 1e-6)).requires_grad_(True)
    log_scale = torch.zeros_like(scales, requires_grad=True) if learn_scales else None
    return RoundingVars(base, scales, zeros.float(), v, log_scale, bits, group_size)


def fake_quant(rv: RoundingVars, hard: bool = False, h: Tensor | None = None) -> Tensor:
    """The fake-quantized weight [out, in]: soft (differentiable in ``v`` and the scales; ``h``:
    ``rectified_sigmoid(rv.v)`` when already computed) or hard (on the refit scales if any)."""
    scales = rv.current_scales()
    if hard:
        h = (rectified_sigmoid(rv.v) >= 0.5).to(rv.base.dtype)
        scales = rv.refit if rv.refit is not None else scales
    elif h is None:
        h = rectified_sigmoid(rv.v)
    in_f = rv.base.shape[1]
    s = expand_groups(scales, in_f, rv.group_size)
    z = expand_groups(rv.zeros, in_f, rv.group_size)
    return (torch.clamp(rv.base + h, 0, rv.maxq) - z) * s


def hard_codes(rv: RoundingVars) -> Tensor:
    """The final codes ``clamp(base + [h >= 1/2], 0, maxq)`` as uint8 [out, in]."""
    h = (rectified_sigmoid(rv.v) >= 0.5).to(rv.base.dtype)
    return torch.clamp(rv.base + h, 0, rv.maxq).to(torch.uint8)


def nearest_codes(w: Tensor, rv: RoundingVars) -> Tensor:
    """Round-to-nearest codes of ``w`` on ``rv``'s initial grid (float tensor of integers)."""
    in_f = w.shape[1]
    s = expand_groups(rv.scales, in_f, rv.group_size)
    z = expand_groups(rv.zeros, in_f, rv.group_size)
    return torch.clamp(torch.round(w.float() / s + z), 0, rv.maxq)


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """``(codes - zeros) * scales`` per group, float32 [out, in]."""
    in_f = codes.shape[1]
    return (codes.float() - expand_groups(zeros, in_f, group_size)) * expand_groups(scales, in_f, group_size)


def round_regularizer(hs: list[Tensor], beta: float) -> Tensor:
    """AdaRound's ``1 - |2 h - 1|^beta`` averaged over every weight of ``hs`` (differentiable)."""
    total = sum(h.numel() for h in hs)
    return sum((1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum() for h in hs) / total


def soft_fraction(rv: RoundingVars) -> float:
    """Fraction of ``h(V)`` strictly between 0 and 1 (not yet decided by the regularizer)."""
    h = rectified_sigmoid(rv.v.detach())
    return float(((h > 0) & (h < 1)).float().mean())


def reconstruction_error(out: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of ``weight * (out - target)^2`` (plain mean squared error without a weight)."""
    d = (out.float() - target.float()).pow(2)
    return (d * weight).mean() if weight is not None else d.mean()


def fisher_weight(grad: Tensor, scale: float) -> Tensor:
    """Diagonal Fisher weight of each output element: ``grad^2 / scale`` (``scale``: the mean
    squared gradient over the calibration set, so the weights average 1)."""
    return grad.float().pow(2) / scale


def slice_windows(obj: Any, idx: Tensor, batch: int) -> Any:
    """``obj`` (a block call's arguments: tensors inside tuples, lists, dicts) with every tensor
    whose first dimension is the batch's ``batch`` windows (and at least 2-D) reduced to windows
    ``idx``; tensors shared by all windows (first dimension 1, masks of None) stay as they are."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, idx.to(obj.device)) if batch > 1 and obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(slice_windows(o, idx, batch) for o in obj)
    if isinstance(obj, list):
        return [slice_windows(o, idx, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_windows(v, idx, batch) for k, v in obj.items()}
    return obj


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """A block call's arguments with the hidden states (first positional argument, else the
    ``hidden_states`` keyword) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": hidden}


def first_tensor(out: Any) -> Tensor:
    """The hidden states of a block's output (blocks may return tuples)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out
