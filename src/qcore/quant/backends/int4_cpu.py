"""``int4_cpu``: torch's packed int4 CPU kernel for 1- to 4-bit codes.

``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu`` (a 2- or 3-bit code is
a valid 4-bit code) with bf16 activations (cast in and out: fp32 activations make that kernel
~10x slower). The kernel's group must be 32/64/128/256, so a larger group (or per-channel) is
expressed with repeated scales (:func:`qcore.quant.backends._shared.int4_inputs`). Act-order
``g_idx`` whose groups each hold ``group_size`` columns is handled by permuting the weight columns
once and the activation columns per call. The pack holds the codes (and the scales and zeros when
they are bf16 with integer zero points), so the layer's buffers are released while it lives.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant.backends._shared import Int4Pack, Int4Recovery, cpu_only, int4_codes_reason, int4_inputs, unpermute

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

_INT4_ROW_BLOCK = 64
"""When out_features is a multiple of this, the kernel packs each block of rows independently."""


def has_int4_cpu() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_cpu_reason(in_features: int, out_features: int, bits: int, group_size: int,
                    g_idx: Tensor | None) -> str | None:
    """Why the int4 CPU kernel cannot run this layer (None when it can)."""
    if not has_int4_cpu():
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if in_features % 2 or out_features % 16:
        return "in_features must be even and out_features a multiple of 16"
    return int4_codes_reason(in_features, bits, group_size, g_idx)


class Int4CpuPack(Int4Pack):
    """The CPU kernel's pack: ``packed`` is uint8 ``[N, K/2]`` in the kernel's layout."""


def build_int4_cpu(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   g_idx: Tensor | None = None, bits: int = 4) -> Int4CpuPack:
    """The CPU kernel's pack (see :func:`qcore.quant.backends._shared.int4_inputs`)."""
    c, sz, kgroup, perm, shift = int4_inputs(codes, scales, zeros, group_size, g_idx, bits)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 2)
    return Int4CpuPack(packed, sz, kgroup, perm, shift)


def int4_cpu_mm(x: Tensor, pack: Int4CpuPack) -> Tensor:
    """``x [M, K] -> [M, N]`` in x's dtype."""
    xb = x if pack.perm is None else x.index_select(-1, pack.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb.to(torch.bfloat16).contiguous(), pack.packed, pack.kgroup, pack.scale_zeros)
    return y.to(x.dtype)


@functools.lru_cache(maxsize=8)
def _int4_cpu_slot_sources(n: int, k: int) -> Tensor:
    """For each 4-bit slot of the kernel's ``[n, k/2]`` uint8 pack, the flat index of its code.

    The layout is a fixed permutation of slots that depends only on the shape, so it is found
    by packing the bits of each position's index, 4 bits per probe.
    """
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    src = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while (1 << shift) < n * k:
        probe = ((idx >> shift) & 15).to(torch.int32)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2).reshape(-1)
        src |= torch.stack([p & 15, p >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
        shift += 4
    return src


def recover_int4_cpu_codes(pack: Int4CpuPack, n: int, k: int) -> Tensor:
    """The uint8 ``[N, K]`` codes held in a kernel pack (in the original column order)."""
    rows = _INT4_ROW_BLOCK if n % _INT4_ROW_BLOCK == 0 else n
    src = _int4_cpu_slot_sources(rows, k)
    flat = pack.packed.reshape(n // rows, rows * k // 2)
    vals = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(n // rows, rows * k)
    out = torch.empty_like(vals)
    out[:, src] = vals - pack.shift if pack.shift else vals
    return unpermute(out.reshape(n, k), pack.perm)


def int4_cpu_scales_zeros(pack: Int4Pack, group_size: int, k: int) -> tuple[Tensor, Tensor]:
    """float32 ``(scales, zeros)`` ``[N, n_groups]`` as the kernel sees them (bf16 scales; zeros
    rounded to integers: exact for integer zero points, which ``holds`` checks)."""
    gs = k if group_size == -1 else group_size
    sz = pack.scale_zeros[:: gs // pack.kgroup].float()
    s = sz[..., 0]
    z = (8.0 - pack.shift) - torch.round(sz[..., 1] / s)
    return s.t().contiguous(), z.t().contiguous()


class Int4CpuBackend(Int4Recovery):
    """torch's packed int4 CPU kernel (see the module docstring)."""

    name = "int4_cpu"
    devices: tuple[str, ...] = ("cpu",)
    priority = 30

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return cpu_only(self.name, device) or int4_cpu_reason(
            layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.g_idx)

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Int4CpuPack:
        return build_int4_cpu(layer.codes(), layer.scales, layer.qzeros, layer.group_size, layer.g_idx, layer.bits)

    def mm(self, x: Tensor, pack: Int4CpuPack, layer: QuantLinear) -> Tensor:
        return int4_cpu_mm(x, pack)

    def codes(self, pack: Int4CpuPack, layer: QuantLinear) -> Tensor:
        return recover_int4_cpu_codes(pack, layer.out_features, layer.in_features)

    def scales_zeros(self, pack: Int4CpuPack, layer: QuantLinear) -> tuple[Tensor, Tensor]:
        return int4_cpu_scales_zeros(pack, layer.group_size, layer.in_features)


BACKEND = Int4CpuBackend()
