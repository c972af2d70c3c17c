"""Exact folding of AWQ scales: pure tensor functions.

A scale group's linears get their input columns multiplied by ``s``; the op that produces that
input is divided by ``s`` so that the block computes exactly the same function:

* a norm ``y = n(x) * (offset + w) + b``: ``w' = (offset + w) / s - offset``, ``b' = b / s``
  (``offset`` is 0 for LayerNorm/RMSNorm, 1 for Gemma-style ``(1 + w)`` norms);
* a previous linear: its output rows (and bias) divided by ``s`` (exact through an elementwise
  product such as ``act(gate) * up``, through attention's value mixing, and through
  positively homogeneous activations such as ReLU).
"""
from __future__ import annotations

from torch import Tensor


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
