"""Input transforms qcore ships: modules a method puts in front of a linear
(``BlockContext.set_input_transform``), applied before its kernel and saved with the checkpoint.

``ChannelScale`` multiplies each input channel by a fixed factor: what a smoothing method uses
when the producer of a linear's input cannot absorb the scale exactly (a GELU between fc1 and
fc2, a fused qkv projection before o, the norms of a post-norm model).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ChannelScale(nn.Module):
    """``x * factor`` per input channel (``factor`` float32 ``[features]``)."""

    def __init__(self, features: int, device: Any = None) -> None:
        super().__init__()
        self.register_buffer("factor", torch.ones(features, dtype=torch.float32, device=device))

    @classmethod
    def of(cls, factor: Tensor) -> ChannelScale:
        mod = cls(factor.numel(), device=factor.device)
        mod.factor.copy_(factor.float())
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor.to(x.dtype)

    def extra_repr(self) -> str:
        return f"features={self.factor.numel()}"


class ChannelScaleSerializer:
    """Saves a :class:`ChannelScale` (its factors are in the state dict)."""

    type_name = "qcore.channel_scale"
    module_type = ChannelScale

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"features": int(module.factor.numel())}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return ChannelScale(int(data["features"]), device=device)
