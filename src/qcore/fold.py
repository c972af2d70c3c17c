"""Exact scale folding shared by transform methods (AWQ, SmoothQuant, ...).

A scale group's linears get their input columns multiplied by ``s``; the op that produces that
input is divided by ``s`` so that the block computes exactly the same function:

* a norm ``y = n(x) * (offset + w) + b``: ``w' = (offset + w) / s - offset``, ``b' = b / s``
  (``offset`` is 0 for LayerNorm/RMSNorm, 1 for Gemma-style ``(1 + w)`` norms);
* a previous linear: its output rows (and bias) divided by ``s`` (exact through an elementwise
  product such as ``act(gate) * up``, through attention's value mixing, and through
  positively homogeneous activations such as ReLU).

The tensor functions are pure; :func:`fold_scale_group` applies them to a block's modules.
"""
from __future__ import annotations

from typing import Any, Callable

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
    input columns by ``s``, exactly. ``group`` is a :class:`qcore.introspect.ScaleGroup`;
    ``linear(name)`` returns the block's linear of that name. Returns None, or why the group could
    not be folded (then nothing was changed)."""
    if group.prev is None:
        return "no producing op to fold into"
    prev = root.get_submodule(group.prev)
    with torch.no_grad():
        if group.prev_kind == "norm":
            why = fold_norm(prev, s, getattr(group, "norm_offset", None))
            if why is not None:
                return why
        elif group.prev_kind == "linear":
            if prev.weight.shape[0] != s.numel():
                return f"{group.prev} has {prev.weight.shape[0]} outputs but the group reads {s.numel()}"
            w, b = fold_into_linear_rows(prev.weight.data, None if prev.bias is None else prev.bias.data, s)
            prev.weight.data = w
            if b is not None:
                prev.bias.data = b
        else:
            return f"unknown producer kind {group.prev_kind!r}"
        for n in group.linears:
            lin = linear(n)
            lin.weight.data = scale_columns(lin.weight.data, s)
    return None
