"""``int8_cpu``: ``_weight_int8pack_mm`` for 8-bit per-channel weights (bf16 compute).

An asymmetric zero point is a rank-1 correction ``rowsum(x) * (128 - z) * s``. The int8 copy of
the codes stands in for ``qweight`` while it lives. :class:`Int8Pack` is also ``w8a8``'s pack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant.backends._shared import Kernel, cpu_only

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

INT8_K_MULTIPLE = 16
"""``_weight_int8pack_mm`` (torch 2.13 CPU) segfaults for more than one row unless in_features is a
multiple of this (measured: K = 100, 164, 168, 172, 180 crash; 160, 176, 192 run)."""


def has_int8_cpu() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_reason(bits: int, group_size: int, in_features: int | None = None) -> str | None:
    if bits != 8:
        return f"{bits}-bit weights (kernel is 8-bit only)"
    if group_size != -1:
        return "grouped 8-bit weights (kernel is per-channel only)"
    if in_features is not None and in_features % INT8_K_MULTIPLE:
        return f"in_features {in_features} is not a multiple of {INT8_K_MULTIPLE} (the int8 kernel crashes)"
    if not has_int8_cpu():
        return "this torch has no _weight_int8pack_mm"
    return None


@dataclass
class Int8Pack:
    weight: Tensor          # int8 [N, K] = codes - 128
    scales: Tensor          # float32 [N]
    offset: Tensor | None   # float32 [N] = (128 - z) * s, None when all zero (symmetric)


def build_int8(codes: Tensor, scales: Tensor, zeros: Tensor) -> Int8Pack:
    """Per-channel 8-bit codes (one group, so act-order ``g_idx`` is irrelevant)."""
    w = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = scales.float().reshape(-1)
    off = (128.0 - zeros.float().reshape(-1)) * s
    return Int8Pack(w, s, None if bool((off == 0).all()) else off)


def int8_codes(pack: Int8Pack) -> Tensor:
    """The uint8 codes held in an :class:`Int8Pack`."""
    return (pack.weight.to(torch.int16) + 128).to(torch.uint8)


def int8_weight_mm(x: Tensor, pack: Int8Pack) -> Tensor:
    """``x [M, K] -> [M, N]`` with bf16 compute (fp32 activations make the kernel ~20x slower)."""
    xb = x.to(torch.bfloat16).contiguous()  # the kernel needs unit stride on K (e.g. a transposed input)
    y = torch.ops.aten._weight_int8pack_mm(xb, pack.weight, pack.scales.to(torch.bfloat16)).float()
    if pack.offset is not None:
        y = y + x.float().sum(-1, keepdim=True) * pack.offset
    return y.to(x.dtype)


class Int8CpuBackend(Kernel):
    """torch's int8 weight-only CPU kernel (see the module docstring)."""

    name = "int8_cpu"
    devices: tuple[str, ...] = ("cpu",)
    priority = 20

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return cpu_only(self.name, device) or int8_reason(layer.bits, layer.group_size, layer.in_features)

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Int8Pack:
        return build_int8(layer.codes(), layer.scales, layer.qzeros)

    def mm(self, x: Tensor, pack: Int8Pack, layer: QuantLinear) -> Tensor:
        return int8_weight_mm(x, pack)

    def holds(self, pack: Int8Pack, layer: QuantLinear) -> tuple[str, ...]:
        return ("codes",)

    def recover(self, pack: Int8Pack, layer: QuantLinear, what: str) -> Tensor:
        return int8_codes(pack)


BACKEND = Int8CpuBackend()
