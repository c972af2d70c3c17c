"""QuaRot's exact weight fusions (pure tensor functions).

A rotation is a function ``rot(x) = x @ R`` over the last dimension, R orthogonal. With
``nn.Linear`` weights ``W`` ``[out, in]`` (``y = x @ W.T + b``):

* a linear that now reads ``x @ R`` instead of ``x`` keeps its outputs with ``W' = W @ R``
  (:func:`rotate_inputs`: each row of W rotated like an input);
* a linear whose outputs must come out rotated, ``y @ R``, has ``W' = R.T @ W`` and ``b' = b @ R``
  (:func:`rotate_outputs`); an embedding table is rotated like outputs row by row.

Norms are folded first so that only a rotation-invariant normalization ``x / rms(x)`` stays
between the residual stream and its readers (:func:`fold_norm`). A LayerNorm model also keeps
its residual stream zero-mean (:func:`center_outputs`, :func:`center_rows`), so that LayerNorm
equals RMSNorm on it (QuaRot's LayerNorm -> RMSNorm step).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from qcore_quarot.hadamard import hadamard_transform

Rotation = Callable[[Tensor], Tensor]
"""``x -> x @ R`` over the last dimension for an orthogonal R."""


def hadamard_rotation(block: Tensor, signs: Tensor | None = None) -> Rotation:
    """``x -> x @ (H D).T`` (``H = kron(block, H_p / sqrt(p))``, D = diag(signs) or I)."""
    if signs is None:
        return lambda x: hadamard_transform(x, block)
    return lambda x: hadamard_transform(x * signs.to(device=x.device, dtype=x.dtype), block)


def per_head(rot: Rotation, head_dim: int) -> Rotation:
    """``rot`` (of size ``head_dim``) applied to each run of ``head_dim`` channels."""
    return lambda x: rot(x.unflatten(-1, (-1, head_dim))).flatten(-2)


def rotate_inputs(weight: Tensor, rot: Rotation) -> Tensor:
    """``W @ R``: the weight of a linear whose input is now ``x @ R``."""
    return rot(weight)


def rotate_outputs(weight: Tensor, bias: Tensor | None, rot: Rotation) -> tuple[Tensor, Tensor | None]:
    """``(R.T @ W, b @ R)``: a linear whose outputs come out rotated."""
    return rot(weight.t()).t(), None if bias is None else rot(bias)


def fold_norm(weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
              offset: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """A linear reading ``x_hat * (offset + norm_weight) + norm_bias`` rewritten to read ``x_hat``:
    ``(W * (offset + w), b + W @ norm_bias)``."""
    new_bias = bias
    if norm_bias is not None:
        shift = weight @ norm_bias
        new_bias = shift if bias is None else bias + shift
    if norm_weight is None:
        return weight, new_bias
    return weight * (offset + norm_weight)[None, :], new_bias


def center_outputs(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A linear whose output vectors have zero mean over their channels (the mean removed)."""
    return weight - weight.mean(0, keepdim=True), None if bias is None else bias - bias.mean()


def center_rows(table: Tensor) -> Tensor:
    """An embedding table whose rows have zero mean."""
    return table - table.mean(-1, keepdim=True)
