"""RTN quantizer: quantize every linear of every block to nearest."""
from __future__ import annotations

from typing import TYPE_CHECKING

from qcore.plugin.protocol import BaseQuantizer

if TYPE_CHECKING:
    from qcore.pipeline.engine import BlockContext


class RTNQuantizer(BaseQuantizer):
    def process_block(self, block: BlockContext) -> None:
        from qcore.quant.primitives import quantize_rtn

        cfg = self.config
        for name in block.quantizable(self.config):
            weight = block.linear(name).weight.detach().float()
            qw = quantize_rtn(weight, cfg.bits, cfg.group_size, cfg.sym)
            block.quantize_linear(name, qw)
