"""HQQ quantizer: the glue between :mod:`qcore_hqq.hqq` and the core's block engine."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qcore.plugin import BaseQuantizer, BlockContext
from qcore.plugin import get_logger

if TYPE_CHECKING:
    from qcore_hqq.config import HQQConfig

log = get_logger("qcore_hqq")


class HQQQuantizer(BaseQuantizer):
    """Calibration-free: for each quantizable linear of a block, solve HQQ on its weight and
    put the packed :class:`~qcore.quant.linear.QuantLinear` in its place."""

    config: HQQConfig

    def __init__(self, config: HQQConfig, spec: Any) -> None:
        super().__init__(config, spec)
        self.layers: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0

    def process_block(self, block: BlockContext) -> None:
        from torch import no_grad

        from qcore_hqq.hqq import quantize_hqq

        cfg = self.config
        start = time.perf_counter()
        with no_grad():
            for name in block.quantizable(cfg):
                p = block.precision(name, cfg)
                weight = block.linear(name).weight.detach().float()
                qw, stats = quantize_hqq(
                    weight, p.bits, p.group_size, lp_norm=cfg.lp_norm, beta=cfg.beta,
                    kappa=cfg.kappa, iters=cfg.iters, early_stop=cfg.early_stop,
                    optimize_scale=cfg.scale_optimized(p.bits), round_zero=cfg.zero_rounded(p.bits),
                )
                block.quantize_linear(name, qw)
                self.layers[f"{block.name}.{name}"] = stats.as_dict()
        self.seconds += time.perf_counter() - start

    def record(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "optimize_scale": self.config.scale_optimized(),
                "round_zero": self.config.zero_rounded(),
                "layers": self.layers}
