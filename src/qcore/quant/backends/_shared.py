"""Helpers several backends share: act-order permutations, what the int4 kernels take, recovery."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

INT4_CPU_GROUPS: tuple[int, ...] = (256, 128, 64, 32)
"""Groups torch's int4 kernels (CPU and CUDA) take; larger groups are expressed by repeating scales."""


def cpu_only(name: str, device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"{name} runs on CPU only"


def act_order_perm(g_idx: Tensor, group_size: int, in_features: int) -> Tensor | None:
    """A column permutation making act-order groups contiguous, or None if groups are uneven."""
    gs = in_features if group_size == -1 else group_size
    counts = torch.bincount(g_idx.long().cpu(), minlength=in_features // gs)
    if counts.numel() != in_features // gs or bool((counts != gs).any()):
        return None
    return torch.argsort(g_idx.long(), stable=True)


def unpermute(codes: Tensor, perm: Tensor | None) -> Tensor:
    """Codes whose columns were gathered with ``perm``, back in the original column order."""
    if perm is None:
        return codes
    restored = torch.empty_like(codes)
    restored[:, perm] = codes
    return restored


def int4_codes_reason(in_features: int, bits: int, group_size: int, g_idx: Tensor | None) -> str | None:
    """What every int4 kernel (torch's CPU and CUDA ones, qcore's own) needs of the codes: <= 4
    bits, kernel-sized groups, act-order groups of equal size."""
    if bits > 4:
        return f"{bits}-bit weights (kernel takes codes of at most 4 bits)"
    gs = in_features if group_size == -1 else group_size
    if not any(gs % kg == 0 for kg in INT4_CPU_GROUPS):
        return f"group size {gs} is not a multiple of 32"
    if g_idx is not None and act_order_perm(g_idx, group_size, in_features) is None:
        return "act-order groups of unequal size"
    return None


@dataclass
class Int4Pack:
    """What torch's int4 kernels (CPU and CUDA) take, in the kernel's layout."""

    packed: Tensor          # the kernel's packed codes
    scale_zeros: Tensor     # bf16 [K/kgroup, N, 2]
    kgroup: int
    perm: Tensor | None     # activation column permutation (act-order) or None
    shift: int = 0          # added to codes of fewer than 4 bits (centres them on the kernel's 8)


def int4_inputs(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                g_idx: Tensor | None, bits: int) -> tuple[Tensor, Tensor, int, Tensor | None, int]:
    """What torch's int4 kernels take: shifted int32 codes (columns permuted for act-order), the
    bf16 ``[K/kgroup, N, 2]`` scale/offset table, the kernel group, the permutation and the shift.
    The kernels compute ``(q' - 8) * scale + offset`` per group, so ``(q - z) * s`` becomes
    ``q' = q + shift`` and ``offset = (8 - shift - z) * s``. Codes of fewer than 4 bits are
    shifted by ``8 - 2**(bits-1)`` so that ``q' - 8`` stays as small as ``q - z`` (the bf16
    offset then cancels less: 2-bit error ~4x lower)."""
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
        perm = act_order_perm(g_idx, group_size, k)
        assert perm is not None, "int4_codes_reason() must be checked first"
        c = codes[:, perm]
    sz = torch.stack([s.t(), ((8.0 - shift - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return (c.to(torch.int32) + shift).contiguous(), sz, kgroup, perm, shift


class Kernel:
    """What most backends are: a kernel without an autograd formula, taking float activations,
    one pack for every activation dtype (see :class:`qcore.plugin.kernel.KernelBackend`)."""

    autograd = False
    quantizes_act = False
    per_dtype = False


class Int4Recovery(Kernel, ABC):
    """``holds``/``recover`` of a pack that holds the codes, and the scales and zeros whenever
    they equal the stored ones (integer zero points stored in bf16)."""

    @abstractmethod
    def codes(self, pack: Any, layer: QuantLinear) -> Tensor:
        """The uint8 ``[out, in]`` codes of ``pack`` (original column order)."""

    @abstractmethod
    def scales_zeros(self, pack: Any, layer: QuantLinear) -> tuple[Tensor, Tensor]:
        """``(scales, zeros)`` ``[out, n_groups]`` as the kernel sees them."""

    def holds(self, pack: Any, layer: QuantLinear) -> tuple[str, ...]:
        s, z = self.scales_zeros(pack, layer)
        if torch.equal(s.to(layer.scale_dtype), layer.scales) and torch.equal(z.to(layer.scale_dtype), layer.qzeros):
            return ("codes", "scales", "zeros")
        return ("codes",)

    def recover(self, pack: Any, layer: QuantLinear, what: str) -> Tensor:
        if what == "codes":
            return self.codes(pack, layer)
        s, z = self.scales_zeros(pack, layer)
        return (s if what == "scales" else z).to(layer.scale_dtype)


class HoldsNothing(Kernel):
    """``holds``/``recover`` of a pack that stands in for none of the stored buffers."""

    def holds(self, pack: Any, layer: QuantLinear) -> tuple[str, ...]:
        return ()

    def recover(self, pack: Any, layer: QuantLinear, what: str) -> Tensor:
        raise ValueError(f"{type(self).__name__} holds no stored values (asked for {what!r})")
