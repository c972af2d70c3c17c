"""Pure tensor functions for weight quantization: affine (RTN grid) and NF4.

Conventions (the contract every method shares, see ``docs/architecture.md``):

* A weight is ``[out_features, in_features]``; groups run along the input dimension.
  ``group_size=-1`` means one group per output channel (``n_groups == 1``).
* **Group sizes must divide** ``in_features``. Ragged last groups are *not* supported: a group
  size that does not divide raises :class:`qcore.plugin.errors.CompatibilityError` naming the group
  sizes that work (``group_size_divisors``). One rule everywhere keeps the packed format, the
  kernels and the compatibility check simple.
* Asymmetric (``sym=False``): the range is widened to include 0 (as GPTQ does), then
  ``scale = (max - min) / (2**bits - 1)`` and ``zero = round(-min / scale)``, so zero is an
  integer code in ``[0, 2**bits - 1]`` and 0.0 is exactly representable.
* Symmetric (``sym=True``): ``scale = absmax / (2**(bits-1) - 1/2)`` and ``zero = 2**(bits-1)``
  (GPTQ's symmetric grid: codes ``0 .. 2**bits-1`` cover ``[-absmax*(1+1/(2**bits-1)), absmax*(1-1/(2**bits-1))]``).
  Needs ``bits >= 2``.
* ``codes = clamp(round(w / scale + zero), 0, 2**bits - 1)`` (round half to even) and
  ``w_hat = (codes - zero) * scale``. Zeros are float32 in code units, so methods with float
  zero points (HQQ) use the same dequantization.
* ``clip`` shrinks the range before the scale is computed (a float, or a tensor broadcastable
  to ``[out, n_groups]``, as AWQ's clip search produces).
* Act-order: ``g_idx[j]`` is the group of input column ``j`` (GPTQ ``desc_act``). With ``g_idx``
  the group of a column is looked up instead of being ``j // group_size``.

NF4 (QLoRA) is blockwise absmax with the standard 16-value table :data:`NF4_TABLE`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qcore.plugin.errors import CompatibilityError

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
"""Bit widths the affine grid accepts (1 bit only asymmetric). Packing supports the same."""

NF4_TABLE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 levels (QLoRA, Dettmers et al. 2023; identical to bitsandbytes' table)."""


@dataclass
class QuantizedWeight:
    """A weight on an integer grid: ``w_hat = (codes - zeros[g]) * scales[g]``."""

    codes: Tensor
    """uint8 (or int32) ``[out, in]``, values in ``[0, 2**bits - 1]``."""
    scales: Tensor
    """float32 ``[out, n_groups]``."""
    zeros: Tensor
    """float32 ``[out, n_groups]``, zero point in code units."""
    bits: int
    group_size: int
    """Input columns per group; -1 = per output channel."""
    sym: bool
    g_idx: Tensor | None = None
    """int32 ``[in]``: group of each input column (act-order), or None for contiguous groups."""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> Tensor:
        """The float32 ``[out, in]`` weight these codes represent."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size, self.g_idx)


def group_size_divisors(in_features: int) -> list[int]:
    """Group sizes that work for ``in_features`` (multiples of 8 that divide it, plus -1)."""
    return [-1] + [d for d in range(8, in_features + 1, 8) if in_features % d == 0]


def check_group_size(in_features: int, group_size: int) -> int:
    """Return the number of groups, or raise CompatibilityError naming the sizes that work."""
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size != 0:
        ok = ", ".join(str(d) for d in group_size_divisors(in_features)[:12])
        raise CompatibilityError(
            f"group_size {group_size} does not divide in_features {in_features} (ragged groups are "
            f"not supported); use one of: {ok}"
        )
    return in_features // group_size


def check_bits(bits: int, sym: bool = False) -> None:
    if bits not in SUPPORTED_BITS:
        raise CompatibilityError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if sym and bits < 2:
        raise CompatibilityError("symmetric quantization needs bits >= 2; use sym=False for 1 bit")


def _group_index(in_features: int, group_size: int, g_idx: Tensor | None, device: torch.device) -> Tensor:
    if g_idx is not None:
        if g_idx.shape != (in_features,):
            raise CompatibilityError(
                f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},): one group per input column"
            )
        return g_idx.to(device=device, dtype=torch.long)
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // gs


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """``[out, in] -> [out, n_groups, gs]`` (a view when possible)."""
    n_groups = check_group_size(w.shape[1], group_size)
    return w.reshape(w.shape[0], n_groups, -1)


def quant_params(w: Tensor, bits: int, group_size: int, sym: bool,
                 clip: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Per-group ``(scales, zeros)``, each float32 ``[out, n_groups]`` (see module doc)."""
    check_bits(bits, sym)
    if w.dim() != 2:
        raise CompatibilityError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    g = _grouped(w.float(), group_size)
    maxq = 2**bits - 1
    if sym:
        absmax = g.abs().amax(dim=-1) * clip
        scales = absmax / (2 ** (bits - 1) - 0.5)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    else:
        wmin = g.amin(dim=-1).clamp(max=0) * clip
        wmax = g.amax(dim=-1).clamp(min=0) * clip
        scales = (wmax - wmin) / maxq
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.round(-wmin / scales).clamp(0, maxq)
    return scales.float().contiguous(), zeros.float().contiguous()


def quantize_codes(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
                   g_idx: Tensor | None = None) -> Tensor:
    """``clamp(round(w / scale + zero), 0, 2**bits - 1)`` as uint8 ``[out, in]``."""
    check_bits(bits)
    maxq = 2**bits - 1
    w = w.float()
    if g_idx is None:
        g = _grouped(w, group_size)
        q = torch.round(g / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp_(0, maxq)
        return q.reshape(w.shape).to(torch.uint8)
    idx = _group_index(w.shape[1], group_size, g_idx, w.device)
    q = torch.round(w / scales[:, idx] + zeros[:, idx]).clamp_(0, maxq)
    return q.to(torch.uint8)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                     g_idx: Tensor | None = None) -> Tensor:
    """``(codes - zeros[g]) * scales[g]`` as float32 ``[out, in]``."""
    c = codes.float()
    scales = scales.float()
    zeros = zeros.float()
    if g_idx is None:
        g = _grouped(c, group_size)
        return ((g - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(c.shape)
    idx = _group_index(c.shape[1], group_size, g_idx, c.device)
    return (c - zeros[:, idx]) * scales[:, idx]


def quantize_rtn(w: Tensor, bits: int, group_size: int, sym: bool,
                 clip: float | Tensor = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``[out, in]`` weight."""
    scales, zeros = quant_params(w, bits, group_size, sym, clip)
    codes = quantize_codes(w, scales, zeros, bits, group_size)
    return QuantizedWeight(codes, scales, zeros, bits, group_size, sym)


# -- NF4 -------------------------------------------------------------------------------------------
def nf4_table(device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)


def quantize_nf4(w: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """Blockwise-absmax NF4: ``(codes uint8 [out, in], absmax float32 [out, in/block_size])``.

    Blocks run along the last dimension; each value is mapped to the nearest NF4 level of
    ``w / absmax(block)``.
    """
    if w.dim() != 2:
        raise CompatibilityError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    g = _grouped(w.float(), block_size)
    absmax = g.abs().amax(dim=-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    x = g / absmax.unsqueeze(-1)
    table = nf4_table(w.device)
    mids = (table[1:] + table[:-1]) / 2
    codes = torch.bucketize(x.contiguous(), mids)  # index of the nearest level
    return codes.reshape(w.shape).to(torch.uint8), absmax.float()


def dequantize_nf4(codes: Tensor, absmax: Tensor, block_size: int = 64) -> Tensor:
    """Inverse of :func:`quantize_nf4`: float32 ``[out, in]``."""
    table = nf4_table(codes.device)
    vals = table[codes.long()]
    g = _grouped(vals, block_size)
    return (g * absmax.float().unsqueeze(-1)).reshape(codes.shape)
