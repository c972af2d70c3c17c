"""``int4_native``: qcore's own compiled 4-bit kernel (:mod:`qcore.quant.native`, AVX512-BF16).

Codes in a tiled layout that streams sequentially, bf16 scales/zeros (the stored values), bf16
activations with fp32 accumulation, output rows in the vector lanes; each unpacked weight vector
is used for up to 4 activation rows. On CPUs with AMX-BF16 a second kernel (:func:`qcore.quant.native.q4_amx`)
dequantizes the weight panel by panel into AMX tiles for batches. Which path a call takes is
measured per CPU, thread count and shape (:mod:`qcore.quant.backends._dispatch`): the kernel at
a few rows, the AMX kernel where it wins, and from the measured crossover on the weight
dequantized (C routine) into a per-thread scratch buffer reused by every layer, then the faster of
oneDNN's bf16 matmul and an fp32 matmul. The crossovers live in a JSON table beside the compiled
library. The pack holds the codes (and the scales and zeros
when they are bf16), so the layer's buffers are released while it lives, as with ``int4_cpu``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant import native
from qcore.quant.backends import _dispatch
from qcore.quant.backends._dispatch import Crossover, CrossoverTable
from qcore.quant.backends._shared import Int4Recovery, act_order_perm, cpu_only, int4_codes_reason, unpermute

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear


@dataclass
class NativeQ4Pack:
    words: Tensor           # int16, :func:`qcore.quant.native.pack_tiled`
    scales: Tensor          # bf16 [ceil(N / 64), K / group, 64], :func:`qcore.quant.native.transpose_groups`
    zeros: Tensor           # bf16, the same layout
    group: int              # the kernel's group (in_features for per-channel)
    perm: Tensor | None     # activation column permutation (act-order) or None
    n: int                  # out_features
    crossover: tuple[int, Crossover] | None = field(default=None, compare=False)  # (threads, found)


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

CROSSOVERS = CrossoverTable(native.dispatch_table_path)
"""Measured crossovers of this CPU's compiled kernel, by :func:`crossover_key`."""


def _scratch_buffer(n: int, k: int, dtype: torch.dtype) -> Tensor:
    """A per-thread ``[n, k]`` buffer of ``dtype`` reused across calls and layers (a fresh 32 MiB
    tensor costs ~10 ms of page faults, more than the dequantize itself). Allocated outside
    inference mode, so a buffer first made under ``torch.inference_mode`` is still writable after."""
    name = f"buf_{str(dtype).removeprefix('torch.')}"
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n * k:
        setattr(_scratch, name, None)  # free the smaller buffer before allocating the larger one
        with torch.inference_mode(False):
            buf = torch.empty(n * k, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[: n * k].view(n, k)


def dequantize_native(pack: NativeQ4Pack, k: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The ``[n, K]`` weight ``s * (q - z)`` (bf16-exact) in a reused scratch buffer of ``dtype``
    (bf16 or fp32; valid until this thread's next call)."""
    np_ = native.padded_rows(pack.n)
    w = native.q4_dequant_bf16(pack.words, pack.scales, pack.zeros, pack.group, pack.n, k,
                               out=_scratch_buffer(np_, k, torch.bfloat16))
    if dtype == torch.bfloat16:
        return w
    return _scratch_buffer(pack.n, k, dtype).copy_(w)


def crossover_key(n: int, k: int, group: int) -> str:
    """The dispatch table's key: shape, group and thread count (the library is per CPU)."""
    return f"{n}x{k}:g{group}:t{torch.get_num_threads()}"


def _run(x: Tensor, pack: NativeQ4Pack, path: str) -> Tensor:
    """``x [M, K] -> [M, N]`` (x already permuted) on ``path``; float32 or bf16 out."""
    if path == _dispatch.KERNEL:
        return native.q4_mm(x, pack.words, pack.scales, pack.zeros, pack.group, pack.n)
    if path == _dispatch.AMX:
        return native.q4_amx(x, pack.words, pack.scales, pack.zeros, pack.group, pack.n)
    dtype = torch.bfloat16 if path == _dispatch.DENSE_BF16 else torch.float32
    return torch.nn.functional.linear(x.to(dtype), dequantize_native(pack, x.shape[-1], dtype))


def native_crossover(pack: NativeQ4Pack, k: int) -> Crossover:
    """The measured crossover for this pack's shape and the current thread count (timed with the
    pack itself at first use)."""
    threads = torch.get_num_threads()
    if pack.crossover is None or pack.crossover[0] != threads:
        gen = torch.Generator().manual_seed(0)
        inputs: dict[int, Tensor] = {}

        def timer(path: str, rows: int) -> float:
            if rows not in inputs:
                inputs[rows] = torch.randn(rows, k, generator=gen)
            t = time.perf_counter()
            _run(inputs[rows], pack, path)
            return time.perf_counter() - t

        kernels = (_dispatch.KERNEL, _dispatch.AMX) if native.amx_available() else (_dispatch.KERNEL,)
        with torch.inference_mode():
            found = CROSSOVERS.get(crossover_key(pack.n, k, pack.group), timer, kernels)
        for dense, buffer in ((_dispatch.DENSE_BF16, "buf_bfloat16"), (_dispatch.DENSE_FP32, "buf_float32")):
            if all(path != dense for _, path in found.steps):
                setattr(_scratch, buffer, None)  # a scratch buffer only the timing used
        pack.crossover = (threads, found)
    return pack.crossover[1]


def native_path(pack: NativeQ4Pack, k: int, rows: int) -> str:
    """The path (:data:`qcore.quant.backends._dispatch.PATHS`) a call with ``rows`` rows takes."""
    forced = _dispatch.forced_path()
    return forced if forced is not None else native_crossover(pack, k).measured_path(rows)


def int4_native_mm(x: Tensor, pack: NativeQ4Pack) -> Tensor:
    """``x [M, K] -> [M, N]`` in x's dtype."""
    xp = x if pack.perm is None else x.index_select(-1, pack.perm)
    return _run(xp, pack, native_path(pack, x.shape[-1], x.shape[0])).to(x.dtype)


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

    def path_for(self, pack: NativeQ4Pack, layer: QuantLinear, rows: int) -> str:
        """Which path a call with ``rows`` activation rows takes (measured on first use)."""
        return native_path(pack, layer.in_features, rows)

    def codes(self, pack: NativeQ4Pack, layer: QuantLinear) -> Tensor:
        return recover_int4_native_codes(pack, layer.out_features, layer.in_features)

    def scales_zeros(self, pack: NativeQ4Pack, layer: QuantLinear) -> tuple[Tensor, Tensor]:
        return int4_native_scales_zeros(pack)


BACKEND = Int4NativeBackend()
