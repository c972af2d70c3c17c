"""RTN quantizer: quantize every linear of every block to nearest (per-layer precision honoured)."""
from __future__ import annotations

from qcore.plugin import BaseQuantizer, BlockContext


class RTNQuantizer(BaseQuantizer):
    def process_block(self, block: BlockContext) -> None:
        from qcore.quant.primitives import quantize_rtn

        for name in block.quantizable(self.config):
            p = block.precision(name, self.config)
            weight = block.linear(name).weight.detach().float()
            block.quantize_linear(name, quantize_rtn(weight, p.bits, p.group_size, p.sym))
