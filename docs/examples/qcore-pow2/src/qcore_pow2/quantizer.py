"""The algorithm (small tensor functions) and the glue to the engine."""
from __future__ import annotations

import torch
from torch import Tensor

from qcore.plugin import BaseQuantizer, BlockContext
from qcore.plugin import QuantizedWeight, quant_params, quantize_codes
from qcore_pow2.modules import InputShift


def pow2_scales(scales: Tensor) -> Tensor:
    """Round each scale up to the next power of two (no value clips)."""
    return torch.exp2(torch.ceil(torch.log2(scales.clamp_min(1e-12))))


def input_shifts(log2_absmax: Tensor, max_shift: int) -> Tensor:
    """Per input channel, how many halvings bring its range to the median channel's."""
    return (log2_absmax - log2_absmax.median()).round().clamp(0, max_shift).to(torch.int8)


class Pow2Quantizer(BaseQuantizer):
    def process_block(self, block: BlockContext) -> None:
        cfg = self.config
        names = block.quantizable(cfg)
        ranges = block.observe(names, "pow2.log2_absmax")
        for name in names:
            p = block.precision(name, cfg)
            shift = input_shifts(ranges[name], cfg.max_shift)
            w = block.linear(name).weight.detach().float() * torch.exp2(shift.float())[None, :]
            if bool(shift.any()):
                transform = InputShift(shift.numel())
                transform.shift.copy_(shift)
                block.set_input_transform(name, transform)
            scales, zeros = quant_params(w, p.bits, p.group_size, p.sym)
            scales = pow2_scales(scales)
            codes = quantize_codes(w, scales, zeros, p.bits, p.group_size)
            block.quantize_linear(name, QuantizedWeight(codes, scales, zeros, p.bits, p.group_size, p.sym))
