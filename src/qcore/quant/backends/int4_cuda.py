"""``int4_cuda``: torch's CUDA int4 kernel (compute capability 8.0 or newer).

The same math as ``int4_cpu`` (:func:`qcore.quant.backends._shared.int4_inputs`) through
``_convert_weight_to_int4pack`` on two codes per byte + ``_weight_int4pack_mm``, bf16;
in_features a multiple of 32, out_features of 16 (see :func:`int4_cuda_reason`). Up to
:data:`INT4_CUDA_MAX_ROWS` rows; above, a per-call dequantize + dense matmul (faster there, no
cached dense weight). The pack is not read back: the packed buffers stay next to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant.backends._shared import HoldsNothing, Int4Pack, int4_codes_reason, int4_inputs

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

INT4_CUDA_MAX_ROWS = 256
"""Above this many rows ``int4_cuda`` dequantizes the weight per call and runs a dense matmul
(H200, bench/kernels_cuda.py: the int4 kernel wins up to 128 rows, the per-call dequantize at 512)."""
INT4_CUDA_INNER_K_TILES: tuple[int, ...] = (8, 4, 2)
"""Tilings the CUDA int4 kernel accepts; in_features must be a multiple of 16 x tiles."""


def has_int4_cuda() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack")


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in INT4_CUDA_INNER_K_TILES if in_features % (16 * t) == 0), None)


def int4_cuda_reason(in_features: int, out_features: int, bits: int, group_size: int,
                     g_idx: Tensor | None, device: torch.device) -> str | None:
    """Why the CUDA int4 kernel cannot run this layer on ``device`` (None when it can)."""
    if device.type != "cuda":
        return "int4_cuda runs on CUDA devices only"
    if not has_int4_cuda():
        return "this torch has no _weight_int4pack_mm"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the CUDA int4 kernel needs compute capability 8.0 or newer"
    if _inner_k_tiles(in_features) is None or out_features % 16:
        return "in_features must be a multiple of 32 and out_features of 16"
    return int4_codes_reason(in_features, bits, group_size, g_idx)


@dataclass
class Int4CudaPack(Int4Pack):
    """The CUDA kernel's pack: ``packed`` in the kernel's tiling of ``inner_k_tiles``."""

    inner_k_tiles: int = 8


def build_int4_cuda(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    g_idx: Tensor | None = None, bits: int = 4) -> Int4CudaPack:
    """The CUDA kernel's pack: two codes per byte (even column high nibble), then the kernel's tiling."""
    c, sz, kgroup, perm, shift = int4_inputs(codes, scales, zeros, group_size, g_idx, bits)
    tiles = _inner_k_tiles(c.shape[1])
    assert tiles is not None, "int4_cuda_reason() must be checked first"
    two = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(two, tiles)
    return Int4CudaPack(packed, sz, kgroup, perm, shift, tiles)


def int4_cuda_mm(x: Tensor, pack: Int4CudaPack) -> Tensor:
    """``x [M, K] -> [M, N]`` in x's dtype (bf16 inside the kernel)."""
    xb = x if pack.perm is None else x.index_select(-1, pack.perm)
    y = torch.ops.aten._weight_int4pack_mm(xb.to(torch.bfloat16).contiguous(), pack.packed, pack.kgroup,
                                           pack.scale_zeros)
    return y.to(x.dtype)


class Int4CudaBackend(HoldsNothing):
    """torch's CUDA int4 kernel (see the module docstring)."""

    name = "int4_cuda"
    devices: tuple[str, ...] = ("cuda",)
    priority = 30

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return int4_cuda_reason(layer.in_features, layer.out_features, layer.bits, layer.group_size,
                                layer.g_idx, device)

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Int4CudaPack:
        return build_int4_cuda(layer.codes(), layer.scales, layer.qzeros, layer.group_size, layer.g_idx, layer.bits)

    def mm(self, x: Tensor, pack: Int4CudaPack, layer: QuantLinear) -> Tensor:
        if x.shape[0] > INT4_CUDA_MAX_ROWS:  # prefill-sized: dequantize per call
            return x @ layer.dequantize_weight().to(x.dtype).t()
        return int4_cuda_mm(x, pack)


BACKEND = Int4CudaBackend()
