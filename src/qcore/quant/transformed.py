"""``TransformedLinear``: a float linear whose input is processed at run time.

What a transform method asks for on a linear that stays in float until a later method (or never)
quantizes it: an input transform (a module, e.g. an online rotation) and/or activation
quantization. It is an ``nn.Linear`` (same ``weight`` and ``bias`` parameters), so weight methods,
introspection and folds treat it as any linear; ``QuantLinear.from_quantized`` takes both requests
over when the weight is quantized.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qcore.quant.act import ActQuant, fake_quant_act


class TransformedLinear(nn.Linear):
    """``linear(fake_quant(transform(x)))`` with float weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 act: ActQuant | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act = act
        self.input_transform: nn.Module | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> TransformedLinear:
        """A ``TransformedLinear`` sharing ``linear``'s parameters (no copy)."""
        if isinstance(linear, cls):
            return linear
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act is not None:
            x = fake_quant_act(x, self.act)
        return F.linear(x, self.weight, self.bias)

    def to_json(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None, "act": self.act.to_dict() if self.act else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], device: Any = "meta") -> TransformedLinear:
        return cls(int(data["in_features"]), int(data["out_features"]), bool(data["has_bias"]), device=device,
                   act=ActQuant.from_dict(data.get("act")))

    def extra_repr(self) -> str:
        act = f", act=A{self.act.bits}" if self.act else ""
        return super().extra_repr() + act


class TransformedLinearSerializer:
    """Saves a :class:`TransformedLinear` (its weight and bias are in the state dict)."""

    type_name = "qcore.transformed_linear"
    module_type = TransformedLinear

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, TransformedLinear)
        return module.to_json()

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return TransformedLinear.from_json(data, device)
