"""Matmul backends for :class:`qcore.quant.linear.QuantLinear` (pure functions + small packs).

Every backend computes ``x @ w_hat.T`` for ``w_hat = (codes - zeros[g]) * scales[g]``:

* ``int4_cpu``: torch's packed int4 CPU kernel (``_convert_weight_to_int4pack_for_cpu`` +
  ``_weight_int4pack_mm_for_cpu``) for 1- to 4-bit codes (a 2- or 3-bit code is a valid 4-bit
  code), bf16 activations (cast in and out: fp32 activations make that kernel ~10x slower).
  The kernel computes ``(q' - 8) * scale + offset`` per group, so our ``(q - z) * s`` becomes
  ``q' = q + shift`` and ``offset = (8 - shift - z) * s``; its group must be 32/64/128/256, so a
  larger group (or per-channel) is expressed with repeated scales. Act-order ``g_idx`` whose
  groups each hold ``group_size`` columns is handled by permuting the weight columns once and
  the activation columns per call.
* ``int4_native``: qcore's own compiled kernel (:mod:`qcore.quant.native`, CPUs with
  AVX512-BF16): codes in a tiled layout that streams sequentially, bf16 scales/zeros (the stored
  values), bf16 activations with fp32 accumulation, output rows in the vector lanes. Up to
  :data:`NATIVE_KERNEL_MAX_ROWS` rows it runs its GEMV/small-GEMM kernel (each unpacked weight
  vector used for 4 activation rows); above, it dequantizes into a reused bf16 scratch weight
  and runs a dense bf16 matmul.
* ``int4_cuda``: the same math through torch's CUDA int4 kernel (``_convert_weight_to_int4pack``
  on two codes per byte + ``_weight_int4pack_mm``, bf16; compute capability 8.0 or newer;
  in_features a multiple of 32, out_features of 16; see :func:`int4_cuda_reason`).
* ``int8_cpu``: ``_weight_int8pack_mm`` (8 bits, per-channel); an asymmetric zero point is a
  rank-1 correction ``rowsum(x) * (128 - z) * s``.
* ``w8a8``: dynamic per-token int8 activations times int8 per-channel weights. Batches of 2 to 8
  rows use ``_weight_int8pack_mm`` on the (exactly representable) integer activation codes, one
  row and larger batches ``torch._int_mm`` with exact int32 accumulation; both rescale by the
  per-token scale.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

INT4_CPU_GROUPS: tuple[int, ...] = (256, 128, 64, 32)
INT4_CUDA_MAX_ROWS = 256
"""Above this many rows ``int4_cuda`` dequantizes the weight per call and runs a dense matmul
(H200, bench/kernels_cuda.py: the int4 kernel wins up to 128 rows, the per-call dequantize at 512)."""
INT4_CUDA_INNER_K_TILES: tuple[int, ...] = (8, 4, 2)
"""Tilings the CUDA int4 kernel accepts; in_features must be a multiple of 16 x tiles."""
NATIVE_KERNEL_MAX_ROWS = 256
"""Rows up to which ``int4_native`` runs its own kernel; above, dequantize + bf16 matmul.
Measured (4096x4096 g128, 2 threads, ms; own kernel / dequantize + bf16 / torch's int4 kernel /
bf16 dense): 32 rows 3.2 / 6.6 / 7.3 / 4.1; 128 rows 11.4 / 13.6 / 25.0 / 10.8; 256 rows 23.0 /
23.2 / 50.6 / 20.2; 512 rows 49.4 / 43.8 / 101.0 / 39.7."""
W8A8_SMALL_BATCH = 8
"""Rows (2 to this) for which the CPU w8a8 path uses ``_weight_int8pack_mm`` instead of
``torch._int_mm`` (4096x4096, 2 threads: ``_int_mm`` 0.27 ms at 1 row, 3.5 ms at 4 and 8 rows;
``_weight_int8pack_mm`` 0.66, 1.3 and 2.2 ms)."""


def has_int4_cpu() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def has_int8_cpu() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _act_order_perm(g_idx: Tensor, group_size: int, in_features: int) -> Tensor | None:
    """A column permutation making act-order groups contiguous, or None if groups are uneven."""
    gs = in_features if group_size == -1 else group_size
    counts = torch.bincount(g_idx.long().cpu(), minlength=in_features // gs)
    if counts.numel() != in_features // gs or bool((counts != gs).any()):
        return None
    return torch.argsort(g_idx.long(), stable=True)


def int4_cpu_reason(in_features: int, out_features: int, bits: int, group_size: int,
                    g_idx: Tensor | None) -> str | None:
    """Why the int4 CPU kernel cannot run this layer (None when it can)."""
    if not has_int4_cpu():
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if in_features % 2 or out_features % 16:
        return "in_features must be even and out_features a multiple of 16"
    return _int4_codes_reason(in_features, bits, group_size, g_idx)


def _int4_codes_reason(in_features: int, bits: int, group_size: int, g_idx: Tensor | None) -> str | None:
    """What both int4 kernels (CPU and CUDA) need of the codes: <= 4 bits, kernel-sized groups,
    act-order groups of equal size."""
    if bits > 4:
        return f"{bits}-bit weights (kernel takes codes of at most 4 bits)"
    gs = in_features if group_size == -1 else group_size
    if not any(gs % kg == 0 for kg in INT4_CPU_GROUPS):
        return f"group size {gs} is not a multiple of 32"
    if g_idx is not None and _act_order_perm(g_idx, group_size, in_features) is None:
        return "act-order groups of unequal size"
    return None


@dataclass
class Int4CpuPack:
    packed: Tensor          # uint8 [N, K/2], the kernel's layout
    scale_zeros: Tensor     # bf16 [K/kgroup, N, 2]
    kgroup: int
    perm: Tensor | None     # activation column permutation (act-order) or None
    shift: int = 0          # added to codes of fewer than 4 bits (centres them on the kernel's 8)


def _int4_inputs(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 g_idx: Tensor | None, bits: int) -> tuple[Tensor, Tensor, int, Tensor | None, int]:
    """What both int4 kernels take: shifted int32 codes (columns permuted for act-order), the bf16
    ``[K/kgroup, N, 2]`` scale/offset table, the kernel group, the permutation and the shift.
    Codes of fewer than 4 bits are shifted by ``8 - 2**(bits-1)`` so that ``q' - 8`` stays as
    small as ``q - z`` (the bf16 offset then cancels less: 2-bit error ~4x lower)."""
    n, k = codes.shape
    shift = 8 - 2 ** (bits - 1) if bits < 4 else 0
    gs = k if group_size == -1 else group_size
    kgroup = next(kg for kg in INT4_CPU_GROUPS if gs % kg == 0)
    rep = gs // kgroup
    s = scales.float().repeat_interleave(rep, dim=1)
    z = zeros.float().repeat_interleave(rep, dim=1)
    perm = None
    c = codes
    if g_idx is not None:
        perm = _act_order_perm(g_idx, group_size, k)
        assert perm is not None, "int4_cpu_reason() must be checked first"
        c = codes[:, perm]
    # kernel: (q' - 8) * s + offset == (q - z) * s  with  q' = q + shift
    sz = torch.stack([s.t(), ((8.0 - shift - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return (c.to(torch.int32) + shift).contiguous(), sz, kgroup, perm, shift


def build_int4_cpu(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   g_idx: Tensor | None = None, bits: int = 4) -> Int4CpuPack:
    """The CPU kernel's pack (see :func:`_int4_inputs`)."""
    c, sz, kgroup, perm, shift = _int4_inputs(codes, scales, zeros, group_size, g_idx, bits)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 2)
    return Int4CpuPack(packed, sz, kgroup, perm, shift)


def int4_cpu_mm(x: Tensor, pack: Int4CpuPack) -> Tensor:
    """``x [M, K] -> [M, N]`` in x's dtype."""
    xb = x if pack.perm is None else x.index_select(-1, pack.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb.to(torch.bfloat16).contiguous(), pack.packed, pack.kgroup, pack.scale_zeros)
    return y.to(x.dtype)


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
    pads rows); the codes must suit both int4 kernels (:func:`_int4_codes_reason`)."""
    from qcore.quant import native

    if in_features % native.SLICE:
        return f"in_features must be a multiple of {native.SLICE}"
    return _int4_codes_reason(in_features, bits, group_size, g_idx)


def int4_native_reason(in_features: int, out_features: int, bits: int, group_size: int,
                       g_idx: Tensor | None) -> str | None:
    """Why qcore's native kernel cannot run this layer here (None when it can)."""
    from qcore.quant import native

    # unavailable_reason() builds the library on first use
    return int4_native_shape_reason(in_features, bits, group_size, g_idx) or native.unavailable_reason()


def build_int4_native(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      g_idx: Tensor | None = None) -> NativeQ4Pack:
    from qcore.quant import native

    n, k = codes.shape
    perm = None if g_idx is None else _act_order_perm(g_idx, group_size, k)
    c = codes if perm is None else codes[:, perm]
    return NativeQ4Pack(native.pack_tiled(c.contiguous()), native.transpose_groups(scales),
                        native.transpose_groups(zeros), k if group_size == -1 else group_size, perm, n)


def int4_native_scales_zeros(pack: NativeQ4Pack) -> tuple[Tensor, Tensor]:
    """The bf16 ``(scales, zeros)`` ``[N, n_groups]`` a native pack holds."""
    from qcore.quant import native

    return native.untranspose_groups(pack.scales, pack.n), native.untranspose_groups(pack.zeros, pack.n)


def recover_int4_native_codes(pack: NativeQ4Pack, n: int, k: int) -> Tensor:
    """The uint8 ``[N, K]`` codes of a native pack (in the original column order)."""
    from qcore.quant import native

    out = native.unpack_tiled(pack.words, n, k)
    if pack.perm is not None:
        restored = torch.empty_like(out)
        restored[:, pack.perm] = out
        out = restored
    return out


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
    from qcore.quant import native

    xp = x if pack.perm is None else x.index_select(-1, pack.perm)
    k = x.shape[-1]
    if x.shape[0] <= NATIVE_KERNEL_MAX_ROWS:
        y = native.q4_mm(xp, pack.words, pack.scales, pack.zeros, pack.group, pack.n)
    else:
        scratch = _scratch_bf16(native.padded_rows(pack.n), k)
        w = native.q4_dequant_bf16(pack.words, pack.scales, pack.zeros, pack.group, pack.n, k, out=scratch)
        y = torch.nn.functional.linear(xp.to(torch.bfloat16), w)
    return y.to(x.dtype)


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
    return _int4_codes_reason(in_features, bits, group_size, g_idx)


@dataclass
class Int4CudaPack(Int4CpuPack):
    inner_k_tiles: int = 8


def build_int4_cuda(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    g_idx: Tensor | None = None, bits: int = 4) -> Int4CudaPack:
    """The CUDA kernel's pack: two codes per byte (even column high nibble), then the kernel's tiling."""
    c, sz, kgroup, perm, shift = _int4_inputs(codes, scales, zeros, group_size, g_idx, bits)
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


_INT4_ROW_BLOCK = 64
"""When out_features is a multiple of this, the kernel packs each block of rows independently."""


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
    out = out.reshape(n, k)
    if pack.perm is not None:
        restored = torch.empty_like(out)
        restored[:, pack.perm] = out
        out = restored
    return out


def int4_cpu_scales_zeros(pack: Int4CpuPack, group_size: int, k: int) -> tuple[Tensor, Tensor]:
    """float32 ``(scales, zeros)`` ``[N, n_groups]`` as the kernel sees them (bf16 scales; zeros
    rounded to integers: exact for integer zero points, which the caller checks)."""
    gs = k if group_size == -1 else group_size
    sz = pack.scale_zeros[:: gs // pack.kgroup].float()
    s = sz[..., 0]
    z = (8.0 - pack.shift) - torch.round(sz[..., 1] / s)
    return s.t().contiguous(), z.t().contiguous()


INT8_K_MULTIPLE = 16
"""``_weight_int8pack_mm`` (torch 2.13 CPU) segfaults for more than one row unless in_features is a
multiple of this (measured: K = 100, 164, 168, 172, 180 crash; 160, 176, 192 run)."""


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


def build_int8(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor | None = None) -> Int8Pack:
    """Per-channel 8-bit codes (``g_idx`` is irrelevant with one group)."""
    w = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = scales.float().reshape(-1)
    off = (128.0 - zeros.float().reshape(-1)) * s
    return Int8Pack(w, s, None if bool((off == 0).all()) else off)


def int8_codes(pack: Int8Pack) -> Tensor:
    """The uint8 codes held in an :class:`Int8Pack`."""
    return (pack.weight.to(torch.int16) + 128).to(torch.uint8)


def int8_weight_mm(x: Tensor, pack: Int8Pack) -> Tensor:
    """``x [M, K] -> [M, N]`` with bf16 compute (fp32 activations make the kernel ~20x slower)."""
    xb = x.to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(xb, pack.weight, pack.scales.to(torch.bfloat16)).float()
    if pack.offset is not None:
        y = y + x.float().sum(-1, keepdim=True) * pack.offset
    return y.to(x.dtype)


def w8a8_mm(xq: Tensor, sx: Tensor, pack: Int8Pack, out_dtype: torch.dtype,
            use_int_mm: bool | None = None) -> Tensor:
    """int8 activations ``xq [M, K]`` (per-token scale ``sx [M, 1]``) times int8 weights."""
    m = xq.shape[0]
    if use_int_mm is None:
        use_int_mm = xq.is_cuda or m == 1 or m > W8A8_SMALL_BATCH
    if use_int_mm:
        pad = 17 - m if (xq.is_cuda and m < 17) else 0  # CUDA _int_mm needs M > 16
        a = torch.nn.functional.pad(xq, (0, 0, 0, pad)) if pad else xq
        acc = torch._int_mm(a.contiguous(), pack.weight.t())[:m].float()
        y = acc * pack.scales
    else:
        y = torch.ops.aten._weight_int8pack_mm(
            xq.to(torch.bfloat16), pack.weight, pack.scales.to(torch.bfloat16)).float()
    if pack.offset is not None:
        y = y + xq.float().sum(-1, keepdim=True) * pack.offset
    return (y * sx).to(out_dtype)
