"""The float backends: ``dense`` (``auto``'s fallback), ``dense_bf16`` (calibration), ``reference``.

* ``dense``: the weight dequantized ONCE and cached in the activation dtype; runs every layer on
  every device. Correct and fast, but it saves no memory at run time (the packed buffers stay the
  saved format); ``release_cache()`` frees it.
* ``dense_bf16``: the same with a bfloat16 weight and bf16 compute (the int4 kernel's precision,
  1.3-2.2x faster than the kernel at thousands of rows): what the calibration engine runs
  already-quantized layers with; ``auto`` never picks it.
* ``reference``: dequantize then matmul on EVERY call. Slow; only used when forced (tests).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcore.progress import get_logger
from qcore.quant.backends._shared import HoldsNothing

if TYPE_CHECKING:
    from qcore.quant.linear import QuantLinear

log = get_logger("qcore.quant.backends.dense")


class DenseBackend(HoldsNothing):
    """A dense weight cached in the activation dtype."""

    name = "dense"
    devices: tuple[str, ...] = ("*",)
    priority = 1
    autograd = True
    per_dtype = True

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return None

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Tensor:
        log.debug("%s: caching a dense %s weight (no run-time memory saving)", layer.extra_repr(), dtype)
        return layer.dequantize_weight().to(device=device, dtype=dtype)

    def mm(self, x: Tensor, pack: Tensor, layer: QuantLinear) -> Tensor:
        return x @ pack.t()


class DenseBf16Backend(DenseBackend):
    """A dense bf16 weight and bf16 compute."""

    name = "dense_bf16"
    priority = 0
    per_dtype = False

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Tensor:
        return super().build(layer, torch.bfloat16, device)

    def mm(self, x: Tensor, pack: Tensor, layer: QuantLinear) -> Tensor:
        return (x.to(torch.bfloat16) @ pack.t()).to(x.dtype)


class ReferenceBackend(DenseBackend):
    """Dequantize and matmul on every call (no pack)."""

    name = "reference"
    priority = 0
    per_dtype = False

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> None:
        return None

    def mm(self, x: Tensor, pack: None, layer: QuantLinear) -> Tensor:
        return x @ layer.dequantize_weight().to(x.dtype).t()


DENSE = DenseBackend()
DENSE_BF16 = DenseBf16Backend()
REFERENCE = ReferenceBackend()
