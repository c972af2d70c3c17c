"""Exact scale folding shared by transform methods (AWQ, SmoothQuant, ...).

A scale group's linears get their input columns multiplied by ``s``; the op that produces that
input is divided by ``s`` so that the block computes exactly the same function:

* a norm ``y = n(x) * (offset + w) + b``: ``w' = (offset + w) / s - offset``, ``b' = b / s``
  (``offset`` is 0 for LayerNorm/RMSNorm, 1 for Gemma-style ``(1 + w)`` norms);
* a previous linear: its output rows (and bias) divided by ``s`` (exact through an elementwise
  product such as ``act(gate) * up``, through attention's value mixing, and through
  positively homogeneous activations such as ReLU).

Under grouped-query attention o reads each run of ``head_dim`` v channels once per query head
of the kv group (``ScaleGroup.repeat`` times in a row): the scales over o's inputs must then be
equal across that repeat. :func:`tie_channels` makes any per-input statistic (hence any scale
computed from such statistics) tied; the fold divides v's rows by one copy of the repeat.

The tensor functions are pure; :func:`fold_scale_group` applies them to a block's modules.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

FOLD_CHECK_RTOL = 1e-4
"""Relative tolerance of the numeric check made after folding into a norm."""


def scale_columns(weight: Tensor, s: Tensor) -> Tensor:
    """Linear weight [out, in] with input column j multiplied by s[j]."""
    return (weight.float() * s.float()[None, :]).to(weight.dtype)


def fold_into_norm(weight: Tensor, bias: Tensor | None, s: Tensor,
                   offset: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Norm parameters whose output is the old output divided by ``s``."""
    w = ((offset + weight.float()) / s.float() - offset).to(weight.dtype)
    b = None if bias is None else (bias.float() / s.float()).to(bias.dtype)
    return w, b


def fold_into_linear_rows(weight: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Previous linear [out, in] whose output (row j) is the old output divided by s[j]."""
    w = (weight.float() / s.float()[:, None]).to(weight.dtype)
    b = None if bias is None else (bias.float() / s.float()).to(bias.dtype)
    return w, b


TieReduce = Literal["mean", "max"]


def tie_channels(v: Tensor, repeat: int, head_dim: int, reduce: TieReduce = "mean") -> Tensor:
    """``v`` over o's inputs ``[kv_heads * repeat * head_dim]`` with each channel replaced by its
    ``reduce`` across the ``repeat`` query heads sharing its kv head (identity for repeat 1)."""
    if repeat <= 1:
        return v
    if head_dim <= 0 or v.numel() % (repeat * head_dim):
        raise ValueError(f"{v.numel()} channels are not kv_heads x {repeat} x {head_dim}")
    runs = v.reshape(-1, repeat, head_dim)
    red = runs.mean(1, keepdim=True) if reduce == "mean" else runs.amax(1, keepdim=True)
    return red.expand_as(runs).reshape(v.shape)


def group_tie(group: Any, v: Tensor, reduce: TieReduce = "mean") -> Tensor:
    """:func:`tie_channels` with a scale group's ``repeat`` and ``head_dim`` (identity when untied)."""
    return tie_channels(v, getattr(group, "repeat", 1), getattr(group, "head_dim", 0), reduce)


def producer_scales(s: Tensor, repeat: int, head_dim: int) -> Tensor | None:
    """Scales of the producer's outputs for tied input scales ``s`` (one copy of each repeat);
    None when ``s`` is not tied."""
    if repeat <= 1:
        return s
    if head_dim <= 0 or s.numel() % (repeat * head_dim):
        return None
    runs = s.float().reshape(-1, repeat, head_dim)
    if not torch.allclose(runs, runs[:, :1].expand_as(runs), rtol=1e-6, atol=0.0):
        return None
    return s.reshape(-1, repeat, head_dim)[:, 0].reshape(-1)


def norm_offset(norm: nn.Module) -> float:
    """``c`` in ``y = n(x) * (c + w) + b``, probed numerically (0 plain, 1 Gemma-style)."""
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    saved_w = weight.data.clone()
    saved_b = None if bias is None else bias.data.clone()
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        if bias is not None:
            bias.data.zero_()
        weight.data.zero_()
        y0 = norm(x).float()
        weight.data.fill_(1.0)
        y1 = norm(x).float()
    finally:
        weight.data = saved_w
        if bias is not None:
            bias.data = saved_b
    n = y1 - y0
    return float((y0 * n).sum() / (n * n).sum().clamp_min(1e-30))


def fold_norm(norm: nn.Module, s: Tensor, offset: float | None = None) -> str | None:
    """Fold 1/s into a norm's weight (and bias); checks the result numerically, undoes on failure.

    ``offset``: the norm computes ``x_hat * (offset + weight)`` (from introspection); probed when
    None. Returns None, or why it could not fold (then nothing changed)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return f"norm {type(norm).__name__} has no per-channel weight to fold into"
    if weight.numel() != s.numel():
        return f"norm has {weight.numel()} channels but the group reads {s.numel()}"
    bias = getattr(norm, "bias", None)
    if offset is None:
        offset = norm_offset(norm)
        if abs(offset - round(offset)) > 1e-3:
            return f"norm {type(norm).__name__} is not of the form n(x) * (c + w) (probe gave c={offset:.4f})"
        offset = float(round(offset))
    x = torch.randn(4, s.numel(), generator=torch.Generator().manual_seed(1)).to(weight)
    before = norm(x).float()
    saved_w = weight.data.clone()
    saved_b = None if bias is None else bias.data.clone()
    w, b = fold_into_norm(weight.data, None if bias is None else bias.data, s, offset)
    weight.data = w
    if bias is not None and b is not None:
        bias.data = b
    after = norm(x).float()
    expect = before / s.to(before)
    if not torch.allclose(after, expect, rtol=FOLD_CHECK_RTOL, atol=FOLD_CHECK_RTOL * float(expect.abs().max())):
        weight.data = saved_w
        if bias is not None:
            bias.data = saved_b
        return f"folding into norm {type(norm).__name__} is not exact (output check failed)"
    return None


def fold_scale_group(root: nn.Module, group: Any, s: Tensor, linear: Callable[[str], nn.Module]) -> str | None:
    """Divide ``group``'s producer (``group.prev`` under ``root``) by ``s`` and scale its linears'
    input columns by ``s``, exactly. ``group`` is a :class:`qcore.arch.introspect.ScaleGroup`;
    ``linear(name)`` returns the block's linear of that name. Returns None, or why the group could
    not be folded (then nothing was changed). Under GQA (``group.repeat`` > 1) ``s`` must be tied
    (see :func:`tie_channels`)."""
    if group.prev is None:
        return "no producing op to fold into"
    prev = root.get_submodule(group.prev)
    repeat = getattr(group, "repeat", 1)
    s_prev = producer_scales(s, repeat, getattr(group, "head_dim", 0))
    if s_prev is None:
        return (f"the scales differ across the {repeat} query heads that share each kv head; "
                "tie them with qcore.arch.fold.group_tie before folding")
    with torch.no_grad():
        if group.prev_kind == "norm":
            why = fold_norm(prev, s_prev, getattr(group, "norm_offset", None))
            if why is not None:
                return why
        elif group.prev_kind == "linear":
            if prev.weight.shape[0] != s_prev.numel():
                return f"{group.prev} has {prev.weight.shape[0]} outputs but the group reads {s.numel()}"
            w, b = fold_into_linear_rows(prev.weight.data, None if prev.bias is None else prev.bias.data, s_prev)
            prev.weight.data = w
            if b is not None:
                prev.bias.data = b
        else:
            return f"unknown producer kind {group.prev_kind!r}"
        for n in group.linears:
            lin = linear(n)
            lin.weight.data = scale_columns(lin.weight.data, s)
    return None
