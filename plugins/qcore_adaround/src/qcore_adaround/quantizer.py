"""AdaRound quantizer: the glue between :mod:`qcore_adaround.adaround` and the core's block engine."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qcore.plugin import BaseQuantizer, BlockContext, CalibrationError
from qcore.plugin import bar, get_logger

if TYPE_CHECKING:
    from torch import Tensor
    from tqdm import tqdm

    from qcore.plugin import LayerPrecision, MethodSpec
    from qcore_adaround.config import AdaRoundConfig

log = get_logger("qcore_adaround")


class AdaRoundQuantizer(BaseQuantizer):
    """For each subset of ``block.info.sequential`` (true-sequential order), collect the input
    Hessians of its linears from the block's current inputs (one per distinct input), learn each
    linear's rounding and put the packed layer in place, so the next subset sees its outputs."""

    config: AdaRoundConfig

    def __init__(self, config: AdaRoundConfig, spec: MethodSpec) -> None:
        super().__init__(config, spec)
        self.layers: dict[str, dict[str, Any]] = {}
        """Per linear (full name): calibration tokens, errors, flipped fraction, seconds, fallback."""

    def process_block(self, block: BlockContext) -> None:
        names = block.quantizable(self.config)
        progress = bar(len(names) * self.config.iterations, f"adaround {block.name}", unit="step")
        try:
            for subset in sequential_subsets(block, names):
                owner = hessian_owners(block, subset)
                stats = block.observe(sorted(set(owner.values()), key=subset.index), "hessian")
                for name in subset:
                    stat = stats[owner[name]]
                    self._quantize_one(block, name, stat["hessian"], int(stat["nsamples"]), progress)
                del stats
        finally:
            progress.close()

    def _quantize_one(self, block: BlockContext, name: str, hessian: Tensor, nsamples: int, progress: tqdm) -> None:
        import torch

        from qcore.plugin import QuantizedWeight, quantize_rtn
        from qcore_adaround.adaround import grid_error, learn_rounding, refit_scales, serial_if_small

        cfg = self.config
        p = block.precision(name, cfg)
        full = f"{block.name}.{name}"
        start = time.perf_counter()
        w = block.linear(name).weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise CalibrationError(f"weight of {full} contains NaN or inf; fix the model before quantizing")
        h = hessian.to(device=w.device, dtype=torch.float32) / 2  # the observer gives 2/n X^T X
        entry: dict[str, Any] = {"nsamples": nsamples}
        if nsamples == 0 or not bool(torch.isfinite(h).all()):
            reason = "no calibration inputs reached it" if nsamples == 0 else "non-finite input Hessian"
            log.warning("adaround: %s falls back to RTN: %s", full, reason)
            entry["fallback"] = f"rtn: {reason}"
            progress.update(cfg.iterations)
            qw = quantize_rtn(w, p.bits, p.group_size, p.sym)
        else:
            done = 0

            def report(steps: int, loss: float) -> None:
                nonlocal done
                progress.update(steps - done)
                progress.set_postfix(layer=name, loss=f"{loss:.4g}", refresh=False)
                done = steps

            with serial_if_small(w):
                scales, zeros = initial_grid(w, h, p, cfg)
            res = learn_rounding(w, h, scales, zeros, p.bits, p.group_size, iterations=cfg.iterations,
                                 lr=cfg.lr, reg_lambda=cfg.reg_lambda, warmup=cfg.warmup,
                                 beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                 product=None if cfg.product == "auto" else getattr(torch, cfg.product),
                                 on_report=report)
            entry.update(rtn_error=res.rtn_error, error=res.error, flipped=round(res.flipped, 4))
            if cfg.scale_refit:
                with serial_if_small(w):
                    scales = refit_scales(w, h, res.codes, scales, zeros, p.group_size)
                    entry["refit_error"] = grid_error(w, h, res.codes, scales, zeros, p.group_size)
            qw = QuantizedWeight(res.codes, scales, zeros, p.bits, p.group_size, p.sym)
        block.quantize_linear(name, qw)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        self.layers[full] = entry

    def record(self) -> dict[str, Any]:
        return {"seconds": round(sum(e["seconds"] for e in self.layers.values()), 3),
                "rtn_fallback": [name for name, e in self.layers.items() if "fallback" in e],
                "layers": self.layers}


def initial_grid(w: Tensor, h: Tensor, p: LayerPrecision, cfg: AdaRoundConfig) -> tuple[Tensor, Tensor]:
    """Scales and zeros [out, n_groups] of ``w``: from min/max or the clipping search (``scale_init``)."""
    from qcore.plugin import quant_params
    from qcore_adaround.adaround import search_scales

    if cfg.scale_init == "search":
        return search_scales(w, h, p.bits, p.group_size, p.sym, cfg.clip_min)
    return quant_params(w, p.bits, p.group_size, p.sym)


def sequential_subsets(block: BlockContext, names: list[str]) -> list[list[str]]:
    """``names`` split in the block's true-sequential order; linears it does not list come last."""
    subsets = [[n for n in subset if n in names] for subset in block.info.sequential]
    listed = {n for subset in subsets for n in subset}
    rest = [n for n in names if n not in listed]
    return [s for s in subsets + [rest] if s]


def hessian_owners(block: BlockContext, subset: list[str]) -> dict[str, str]:
    """Each linear of ``subset`` -> the first linear of ``subset`` reading the same input (same
    scale group and, for MoE experts, the same expert): their Hessians are equal."""
    source = {n: (i, block.info.linears[n].expert) for i, group in enumerate(block.info.scale_groups)
              for n in group.linears if n in block.info.linears}
    first: dict[Any, str] = {}
    return {n: first.setdefault(source.get(n, n), n) for n in subset}
