"""Pack integer codes (1..8 bits) into int32 words along the input dimension.

Layout (the on-disk ``qweight`` format): each row is a little-endian **bit stream**. Code ``j``
of a row occupies bits ``[j*bits, (j+1)*bits)`` of the stream; stream bit ``b`` is bit
``b % 32`` of word ``b // 32``. For 2, 4 and 8 bits this is the usual "``32/bits`` codes per
word, lowest code in the lowest bits"; for 3 bits (and 5, 6, 7) codes cross word boundaries:
32 codes fill exactly ``bits`` words. Rows are padded with zero codes to a multiple of 32
codes, so ``qweight`` is ``[out, ceil(in/32) * bits]`` int32 (``in * bits / 32`` words when
``in`` is a multiple of 32). Unpacking needs ``in_features`` to drop the padding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qcore.plugin.errors import CompatibilityError

PACK_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)


def _check(bits: int) -> None:
    if bits not in PACK_BITS:
        raise CompatibilityError(f"cannot pack {bits}-bit codes; supported bit widths: {PACK_BITS}")


def packed_words(in_features: int, bits: int) -> int:
    """Number of int32 words per row for ``in_features`` codes of ``bits`` bits."""
    _check(bits)
    return -(-in_features // 32) * bits


def _layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For the 32 codes of a chunk: word index, bit offset, and whether they spill into the next word."""
    pos = torch.arange(32, device=device, dtype=torch.int64) * bits
    word = pos // 32
    off = pos % 32
    spill = off + bits > 32
    return word, off, spill


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``[rows, in]`` integer codes in ``[0, 2**bits)`` -> int32 ``[rows, packed_words(in, bits)]``."""
    _check(bits)
    if codes.dim() != 2:
        raise CompatibilityError(f"pack_codes expects a 2-D [rows, in] tensor, got {tuple(codes.shape)}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise CompatibilityError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    chunks = -(-n // 32)
    if chunks * 32 != n:
        c = torch.nn.functional.pad(c, (0, chunks * 32 - n))
    c = c.reshape(rows, chunks, 32)
    word, off, spill = _layout(bits, c.device)
    out = torch.zeros(rows, chunks, bits + 1, dtype=torch.int64, device=c.device)
    low = (c << off) & 0xFFFFFFFF
    out.scatter_add_(2, word.expand(rows, chunks, 32), low)
    if bool(spill.any()):
        high = torch.where(spill, c >> (32 - off).clamp(max=63), torch.zeros_like(c))
        out.scatter_add_(2, (word + 1).expand(rows, chunks, 32), high)
    out = out[..., :bits]  # disjoint bits: the sum is an OR; the extra slot only ever holds 0
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.reshape(rows, chunks * bits).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[rows, in_features]``."""
    _check(bits)
    rows, words = packed.shape
    chunks = -(-in_features // 32)
    if words != chunks * bits:
        raise CompatibilityError(
            f"packed tensor has {words} words per row, expected {chunks * bits} for "
            f"{in_features} {bits}-bit codes; the checkpoint does not match its metadata"
        )
    if 32 % bits == 0:  # no code crosses a word: shift each word in place (fast, int32)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
        return vals.reshape(rows, chunks * 32)[:, :in_features].to(torch.uint8)
    w = packed.to(torch.int64).reshape(rows, chunks, bits) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))  # a zero word after each chunk for spills
    word, off, spill = _layout(bits, w.device)
    lo = torch.gather(w, 2, word.expand(rows, chunks, 32)) >> off
    hi = torch.gather(w, 2, (word + 1).expand(rows, chunks, 32)) << (32 - off)
    vals = torch.where(spill, lo | hi, lo) & (2**bits - 1)
    return vals.reshape(rows, chunks * 32)[:, :in_features].to(torch.uint8)
