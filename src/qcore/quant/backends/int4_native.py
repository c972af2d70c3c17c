"""``int4_native``: qcore's own compiled 4-bit kernel (:mod:`qcore.quant.native`, AVX512-BF16).

Codes in a tiled layout that streams sequentially, bf16 scales/zeros (the stored values), bf16
activations with fp32 accumulation, output rows in the vector lanes. Up to
:data:`NATIVE_KERNEL_MAX_ROWS` rows it runs its GEMV/small-GEMM kernel (each unpacked weight
vector used for 4 activation rows); above, it dequantizes into a reused bf16 scratch weight and
runs a dense bf16 matmul. The pack holds the codes (and the scales and zeros when they are bf16),
so the layer's buffers are released while it lives, as with ``int4_cpu``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant import native
from qcore.quant.backends._shared import Int4Recovery, act_order_perm, cpu_only, int4_codes_reason, unpermute

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

NATIVE_KERNEL_MAX_ROWS = 256
"""Rows up to which ``int4_native`` runs its own kernel; above, dequantize + bf16 matmul.
Measured (4096x4096 g128, 2 threads, ms; own kernel / dequantize + bf16 / torch's int4 kernel /
bf16 dense): 32 rows 3.2 / 6.6 / 7.3 / 4.1; 128 rows 11.4 / 13.6 / 25.0 / 10.8; 256 rows 23.0 /
23.2 / 50.6 / 20.2; 512 rows 49.4 / 43.8 / 101.0 / 39.7."""


@dataclass
class NativeQ4Pack:
    words: Tensor           # int16, :func:`qcore.quant.native.pack_tiled`
    scales: Tensor          # bf16 [ceil(N / 64), K / group, 64], :func:`qcore.quant.native.transpose_groups`
    zeros: Tensor           # bf16, the same layout
    group: int              # the kernel's group (in_features for per-channel)
    perm: Tensor | None     # activation column permutation (act-order) or None
    n: int                  # out_features


def int4_native_shape_reason(in_features: int, bits: int, group_size: int, g_idx: Tensor | None) -> str | None:
    """Why qcore's native kernel cannot take a layer of this shape (any out_features: the pack
    pads rows); the codes must suit every int4 kernel
    (:func:`qcore.quant.backends._shared.int4_codes_reason`)."""
    if in_features % native.SLICE:
        return f"in_features must be a multiple of {native.SLICE}"
    return int4_codes_reason(in_features, bits, group_size, g_idx)


def int4_native_reason(in_features: int, bits: int, group_size: int, g_idx: Tensor | None) -> str | None:
    """Why qcore's native kernel cannot run this layer here (None when it can)."""
    # unavailable_reason() builds the library on first use
    return int4_native_shape_reason(in_features, bits, group_size, g_idx) or native.unavailable_reason()


def build_int4_native(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      g_idx: Tensor | None = None) -> NativeQ4Pack:
    n, k = codes.shape
    perm = None if g_idx is None else act_order_perm(g_idx, group_size, k)
    c = codes if perm is None else codes[:, perm]
    return NativeQ4Pack(native.pack_tiled(c.contiguous()), native.transpose_groups(scales),
                        native.transpose_groups(zeros), k if group_size == -1 else group_size, perm, n)


def int4_native_scales_zeros(pack: NativeQ4Pack) -> tuple[Tensor, Tensor]:
    """The bf16 ``(scales, zeros)`` ``[N, n_groups]`` a native pack holds."""
    return native.untranspose_groups(pack.scales, pack.n), native.untranspose_groups(pack.zeros, pack.n)


def recover_int4_native_codes(pack: NativeQ4Pack, n: int, k: int) -> Tensor:
    """The uint8 ``[N, K]`` codes of a native pack (in the original column order)."""
    return unpermute(native.unpack_tiled(pack.words, n, k), pack.perm)


_scratch = threading.local()


def _scratch_bf16(n: int, k: int) -> Tensor:
    """A per-thread bf16 ``[n, k]`` buffer reused across calls and layers (a fresh 32 MiB
    tensor costs ~10 ms of page faults here, far more than the dequantize itself)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n * k:
        buf = torch.empty(n * k, dtype=torch.bfloat16)
        _scratch.buf = buf
    return buf[: n * k].view(n, k)


def int4_native_mm(x: Tensor, pack: NativeQ4Pack) -> Tensor:
    """``x [M, K] -> [M, N]`` in x's dtype."""
    xp = x if pack.perm is None else x.index_select(-1, pack.perm)
    k = x.shape[-1]
    if x.shape[0] <= NATIVE_KERNEL_MAX_ROWS:
        y = native.q4_mm(xp, pack.words, pack.scales, pack.zeros, pack.group, pack.n)
    else:
        scratch = _scratch_bf16(native.padded_rows(pack.n), k)
        w = native.q4_dequant_bf16(pack.words, pack.scales, pack.zeros, pack.group, pack.n, k, out=scratch)
        y = torch.nn.functional.linear(xp.to(torch.bfloat16), w)
    return y.to(x.dtype)


class Int4NativeBackend(Int4Recovery):
    """qcore's own 4-bit CPU kernel (see the module docstring)."""

    name = "int4_native"
    devices: tuple[str, ...] = ("cpu",)
    priority = 40

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return cpu_only(self.name, device) or int4_native_reason(
            layer.in_features, layer.bits, layer.group_size, layer.g_idx)

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> NativeQ4Pack:
        return build_int4_native(layer.codes(), layer.scales, layer.qzeros, layer.group_size, layer.g_idx)

    def mm(self, x: Tensor, pack: NativeQ4Pack, layer: QuantLinear) -> Tensor:
        return int4_native_mm(x, pack)

    def codes(self, pack: NativeQ4Pack, layer: QuantLinear) -> Tensor:
        return recover_int4_native_codes(pack, layer.out_features, layer.in_features)

    def scales_zeros(self, pack: NativeQ4Pack, layer: QuantLinear) -> tuple[Tensor, Tensor]:
        return int4_native_scales_zeros(pack)


BACKEND = Int4NativeBackend()
