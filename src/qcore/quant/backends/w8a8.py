"""``w8a8``: dynamic per-token int8 activations times int8 per-channel weights (CPU and CUDA).

Batches of 2 to :data:`W8A8_SMALL_BATCH` rows use ``_weight_int8pack_mm`` on the (exactly
representable) integer activation codes; one row and larger batches ``torch._int_mm`` with exact
int32 accumulation (always on CUDA); both rescale by the per-token scale. The pack is
``int8_cpu``'s, which likewise stands in for ``qweight``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.quant.act import quantize_act_int8
from qcore.quant.backends.int8_cpu import Int8CpuBackend, Int8Pack, int8_reason

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

W8A8_SMALL_BATCH = 8
"""Rows (2 to this) for which the CPU w8a8 path uses ``_weight_int8pack_mm`` instead of
``torch._int_mm`` (4096x4096, 2 threads: ``_int_mm`` 0.27 ms at 1 row, 3.5 ms at 4 and 8 rows;
``_weight_int8pack_mm`` 0.66, 1.3 and 2.2 ms)."""


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


class W8A8Backend(Int8CpuBackend):
    """Integer activations and weights (see the module docstring)."""

    name = "w8a8"
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority = 50
    quantizes_act = True

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        act = layer.act
        if act is None or not act.integer_kernel or not act.dynamic:
            return "w8a8 needs act=ActQuant(bits=8, dynamic=True, sym=True)"
        if device.type != "cpu" and layer.out_features % 8:
            return "torch._int_mm on CUDA needs out_features a multiple of 8"
        return int8_reason(layer.bits, layer.group_size, layer.in_features)

    def mm(self, x: Tensor, pack: Int8Pack, layer: QuantLinear) -> Tensor:
        xq, sx = quantize_act_int8(x)
        return w8a8_mm(xq, sx, pack, x.dtype)


BACKEND = W8A8Backend()
