"""QuaRot's modules and their checkpoint serializers.

* :class:`OnlineHadamard`: R4, the Hadamard transform run on a down projection's input (set with
  ``BlockContext.set_input_transform``; the weight holds the inverse rotation). Its m x m block is
  a buffer, so a checkpoint reproduces it bit for bit whatever construction made it; the down
  projections of one model share one block per size.
* :class:`QKVTransform`: R3 and the KV-cache quantization, attached to each attention module
  (``BlockContext.set_attention_transform``): a Hadamard of the head width on queries and keys
  after RoPE (``q k^T`` unchanged), then keys and values fake-quantized per token, head and group
  of the head dimension, asymmetric, as the attention reads them from the cache.
* :class:`QuaRotRMSNorm`: what a LayerNorm becomes once the residual stream is kept zero-mean
  (QuaRot's LayerNorm -> RMSNorm step): ``x / rms(x) * weight``, no mean subtraction, so a
  rotation of its input passes through it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qcore_quarot.hadamard import hadamard_transform


def fake_quant_kv(x: Tensor, bits: int, group_size: int, clip: float = 1.0) -> Tensor:
    """Asymmetric min/max quantize-dequantize of ``x`` per token and head (``[..., head_dim]``)
    in groups of ``group_size`` channels of the head dimension (-1: the whole head), the range
    scaled by ``clip``, computed in float32; the range always holds zero (QuaRot's KV quantizer)."""
    from qcore.plugin import ActQuant, fake_quant_act

    d = x.shape[-1]
    g = d if group_size == -1 else group_size
    groups = x.float().unflatten(-1, (d // g, g))
    return fake_quant_act(groups, ActQuant(bits, dynamic=True, sym=False, clip=clip)).flatten(-2).to(x.dtype)


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


class QKVTransform(nn.Module):
    """R3 (``block`` given: a Hadamard of the head width on queries and keys) and KV quantization
    (``kv_bits`` < 16) on the ``[batch, heads, tokens, head_dim]`` tensors the attention reads."""

    def __init__(self, head_dim: int, block_size: int, kind: str, kv_bits: int, kv_group_size: int,
                 device: Any = None, kv_clip: float = 1.0) -> None:
        super().__init__()
        self.head_dim, self.kind = head_dim, kind
        self.kv_bits, self.kv_group_size, self.kv_clip = kv_bits, kv_group_size, kv_clip
        self.register_buffer("block", torch.eye(block_size, dtype=torch.float32, device=device) if block_size else None)

    @classmethod
    def of(cls, head_dim: int, block: Tensor | None, kind: str, kv_bits: int, kv_group_size: int,
           kv_clip: float = 1.0) -> QKVTransform:
        """With ``block`` as its buffer (shared, not copied; None: no R3)."""
        module = cls(head_dim, 0, kind, kv_bits, kv_group_size, kv_clip=kv_clip)
        module.block = block
        return module

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.block is not None:
            query = hadamard_transform(query.float(), self.block).to(query.dtype)
            key = hadamard_transform(key.float(), self.block).to(key.dtype)
        if self.kv_bits < 16:
            key = fake_quant_kv(key, self.kv_bits, self.kv_group_size, self.kv_clip)
            value = fake_quant_kv(value, self.kv_bits, self.kv_group_size, self.kv_clip)
        return query, key, value

    def post_load(self) -> None:
        """A fresh copy of the loaded block (see :meth:`OnlineHadamard.post_load`)."""
        if self.block is not None:
            self.block = self.block.clone()

    def extra_repr(self) -> str:
        r3 = f"r3={self.kind} {self.head_dim}" if self.block is not None else "r3=off"
        clip = f", kv_clip={self.kv_clip}" if self.kv_clip != 1.0 else ""
        return f"{r3}, kv_bits={self.kv_bits}, kv_group_size={self.kv_group_size}{clip}"


class QKVTransformSerializer:
    """Saves a :class:`QKVTransform` (its block, when R3 is on, is in the state dict)."""

    type_name = "quarot.qkv_transform"
    module_type = QKVTransform

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        block = module.block
        return {"head_dim": int(module.head_dim), "block_size": 0 if block is None else int(block.shape[0]),
                "kind": str(module.kind), "kv_bits": int(module.kv_bits), "kv_group_size": int(module.kv_group_size),
                "kv_clip": float(module.kv_clip)}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return QKVTransform(int(data["head_dim"]), int(data["block_size"]), str(data["kind"]), int(data["kv_bits"]),
                            int(data["kv_group_size"]), device=device, kv_clip=float(data.get("kv_clip", 1.0)))


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
