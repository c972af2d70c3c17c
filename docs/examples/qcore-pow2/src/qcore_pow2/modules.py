"""The observer and the online input transform (with its serializer)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Log2AbsMax:
    """Observer: log2 of max |x| per input channel over the calibration tokens."""

    def __init__(self, linear: nn.Module) -> None:
        self.m = torch.zeros(linear.in_features)

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        if x.shape[0]:
            self.m = torch.maximum(self.m, x.abs().amax(0).cpu())

    def result(self) -> Tensor:
        return torch.log2(self.m.clamp_min(1e-12))


class InputShift(nn.Module):
    """``x * 2**-shift`` per input channel (exact in floating point)."""

    def __init__(self, features: int, device: Any = None) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(features, dtype=torch.int8, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.exp2(-self.shift.to(x.dtype))


class InputShiftSerializer:
    type_name = "pow2.input_shift"
    module_type = InputShift

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"features": int(module.shift.numel())}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return InputShift(int(data["features"]), device=device)
