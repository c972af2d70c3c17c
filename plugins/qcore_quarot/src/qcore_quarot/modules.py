"""QuaRot's modules and their checkpoint serializers.

* :class:`OnlineHadamard`: R4, the Hadamard transform run on a down projection's input (set with
  ``BlockContext.set_input_transform``; the weight holds the inverse rotation). Its m x m block is
  a buffer, so a checkpoint reproduces it bit for bit whatever construction made it; the down
  projections of one model share one block per size.
* :class:`QuaRotRMSNorm`: what a LayerNorm becomes once the residual stream is kept zero-mean
  (QuaRot's LayerNorm -> RMSNorm step): ``x / rms(x) * weight``, no mean subtraction, so a
  rotation of its input passes through it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qcore_quarot.hadamard import hadamard_transform


class OnlineHadamard(nn.Module):
    """``x @ H.T`` over the last dimension, ``H = kron(block, H_p / sqrt(p))`` orthonormal of ``size``."""

    def __init__(self, size: int, block_size: int, kind: str, device: Any = None) -> None:
        super().__init__()
        self.size = size
        self.kind = kind
        self.register_buffer("block", torch.eye(block_size, dtype=torch.float32, device=device))

    @classmethod
    def of(cls, size: int, block: Tensor, kind: str) -> OnlineHadamard:
        """The transform with this ``block`` as its buffer, not a copy: modules given the same
        tensor share it in memory and a checkpoint stores it once (as tied tensors)."""
        module = cls(size, block.shape[0], kind, device="meta")
        module.block = block
        return module

    def forward(self, x: Tensor) -> Tensor:
        return hadamard_transform(x.float(), self.block).to(x.dtype)

    def post_load(self) -> None:
        """Called by ``qcore.load``: a tensor read from safetensors may start at any byte offset,
        and the matmul's rounding depends on the alignment; a fresh copy computes bit for bit as
        the block did before saving (loaded modules no longer share it)."""
        self.block = self.block.clone()

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block.shape[0]}, kind={self.kind}"


class OnlineHadamardSerializer:
    """Saves an :class:`OnlineHadamard` (its block is in the state dict)."""

    type_name = "quarot.online_hadamard"
    module_type = OnlineHadamard

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"size": int(module.size), "block_size": int(module.block.shape[0]), "kind": str(module.kind)}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return OnlineHadamard(int(data["size"]), int(data["block_size"]), str(data["kind"]), device=device)


class QuaRotRMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension, computed in float32."""

    def __init__(self, features: int, eps: float, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class QuaRotRMSNormSerializer:
    """Saves a :class:`QuaRotRMSNorm` (its weight is in the state dict)."""

    type_name = "quarot.rms_norm"
    module_type = QuaRotRMSNorm

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"features": int(module.weight.numel()), "eps": float(module.eps)}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return QuaRotRMSNorm(int(data["features"]), float(data["eps"]), device=device)
