"""GPTQ quantizer: the glue between :mod:`qcore_gptq.gptq` and the core's block engine."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qcore.plugin import BaseQuantizer, BlockContext
from qcore.plugin import get_logger

if TYPE_CHECKING:
    from torch import Tensor

    from qcore_gptq.config import GPTQConfig

log = get_logger("qcore_gptq")


class GPTQQuantizer(BaseQuantizer):
    """For each subset of ``block.info.sequential`` (true-sequential order), collect the
    Hessians of its linears from the block's current inputs, quantize them with GPTQ and put
    the packed layers in place, so the next subset sees the quantized outputs."""

    config: GPTQConfig

    def __init__(self, config: GPTQConfig, spec: Any) -> None:
        super().__init__(config, spec)
        self.layers: dict[str, dict[str, Any]] = {}
        self.rtn_fallback: list[str] = []
        self.seconds = 0.0

    def process_block(self, block: BlockContext) -> None:
        start = time.perf_counter()
        names = block.quantizable(self.config)
        if not names:
            return
        if self.config.true_sequential:
            subsets = [[n for n in subset if n in names] for subset in block.info.sequential]
            covered = {n for s in subsets for n in s}
            rest = [n for n in names if n not in covered]
            subsets = [s for s in subsets if s] + ([rest] if rest else [])
        else:
            subsets = [names]
        shared = shared_inputs(block)
        for subset in subsets:
            # linears that read the same tensor (q/k/v, gate/up) share one Hessian
            reps = {n: next((m for m in subset if shared.get(m, m) == shared.get(n, n)), n) for n in subset}
            stats = block.observe(sorted(set(reps.values()), key=subset.index), "hessian")
            for name in subset:
                stat = stats[reps[name]]
                self._quantize_one(block, name, stat["hessian"], int(stat["nsamples"]))
            del stats
        self.seconds += time.perf_counter() - start

    def _quantize_one(self, block: BlockContext, name: str, hessian: Tensor, nsamples: int) -> None:
        from qcore.plugin import quantize_rtn
        from qcore_gptq.gptq import gptq_quantize

        cfg = self.config
        p = block.precision(name, cfg)
        full = f"{block.name}.{name}"
        weight = block.linear(name).weight.detach().float()
        info = block.info.linears.get(name)
        is_expert = info is not None and getattr(info, "expert", None) is not None
        entry: dict[str, Any] = {"nsamples": int(nsamples)}
        too_few = nsamples < cfg.min_expert_tokens if is_expert else nsamples == 0
        if too_few:
            reason = (f"expert saw {nsamples} calibration tokens (< min_expert_tokens={cfg.min_expert_tokens})"
                      if is_expert else "no calibration inputs reached it")
            log.warning("gptq: %s falls back to RTN: %s", full, reason)
            qw = quantize_rtn(weight, p.bits, p.group_size, p.sym)
            entry["fallback"] = f"rtn: {reason}"
            self.rtn_fallback.append(full)
        else:
            qw, stats = gptq_quantize(
                weight, hessian.to(weight.device), p.bits, p.group_size, p.sym,
                damp_percent=cfg.damp_percent, block_size=cfg.block_size, desc_act=cfg.desc_act,
                static_groups=cfg.static_groups, mse_clip=cfg.mse_clip,
                max_damp_retries=cfg.max_damp_retries, name=full,
            )
            entry.update(stats.as_dict())
            if stats.fallback:
                self.rtn_fallback.append(full)
        self.layers[full] = entry
        block.quantize_linear(name, qw)

    def record(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "rtn_fallback": self.rtn_fallback, "layers": self.layers}


def shared_inputs(block: BlockContext) -> dict[str, str]:
    """Linear name -> key; linears with the same key read the same input tensor.

    Linears of one scale group are fed by the same norm or linear; MoE experts of one group
    see different (routed) tokens, so the expert index is part of the key.
    """
    keys: dict[str, str] = {}
    for gi, group in enumerate(block.info.scale_groups):
        for name in group.linears:
            info = block.info.linears.get(name)
            if info is None:
                continue
            keys[name] = f"{gi}:{info.expert}"
    return keys
