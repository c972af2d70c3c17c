"""SmoothQuant glue to the qcore engine.

Per block:

1. gather max|x| per input channel of every quantizable linear on the calibration inputs
   (and, with ``alpha_grid``, a sample of each scale group's inputs);
2. for each scale group the introspection reports (``block.info.scale_groups``): skip it with a
   logged reason when it cannot be folded exactly (GELU between fc1 and fc2, fused producers,
   ...; GQA v->o is folded with scales tied across the query heads of each kv head); otherwise
   compute s with the fixed ``alpha`` or the best ``alpha_grid`` candidate (no smoothing
   included) and fold it exactly with :func:`qcore.arch.fold.fold_scale_group`;
3. ask for activation quantization on every quantizable linear (``qcore_act``: an
   :class:`~qcore.quant.act.ActQuant`, dynamic per token, or static per tensor with the scale
   calibrated from the smoothed range), which ``block.quantize_linear`` carries into the
   ``QuantLinear``;
4. when no weight method follows in the chain, quantize the weights per channel (symmetric RTN,
   ``w_bits``); 8-bit weights with dynamic int8 activations then run QuantLinear's ``w8a8``
   integer backend. When a weight method follows (``["smoothquant", "gptq"]``) the smoothed float
   weights are left for it.

Folds are exact, so the inputs captured before any fold stay valid for every group.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qcore.pipeline.engine import ACT_ATTR
from qcore.plugin.errors import ConfigError
from qcore.arch.fold import fold_scale_group, group_tie
from qcore.progress import get_logger
from qcore.plugin.protocol import BaseQuantizer
from qcore.quant.act import ActQuant
from qcore.quant.primitives import quantize_rtn
from qcore_smoothquant.smooth import sample_rows, search_alpha, smoothing_scales, static_act_scale, weight_absmax

if TYPE_CHECKING:
    from qcore.pipeline.engine import BlockContext, RunContext
    from qcore_smoothquant.config import SmoothQuantConfig

log = get_logger("qcore.smoothquant")

#: Kinds of later chain methods that quantize weights (SmoothQuant then leaves them float).
WEIGHT_KINDS: tuple[str, ...] = ("weight-only", "reconstruction")
#: Calibration rows per scale group the alpha search measures the output error on.
SEARCH_ROWS: int = 2048


class SmoothQuantQuantizer(BaseQuantizer):
    config: SmoothQuantConfig

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.groups: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()
        self.seconds = 0.0
        self.weights_quantized = False

    def prepare(self, run: RunContext) -> None:
        """``w_bits`` given explicitly reaches the weight method that follows (its ``bits``),
        so ``["smoothquant", "gptq"], w_bits=8, a_bits=8`` is W8A8; conflicting values are refused."""
        if "w_bits" not in self.config.model_fields_set:
            return
        for q in run.chain[run.position + 1:]:
            spec = getattr(q, "spec", None)
            cfg = getattr(q, "config", None)
            if spec is None or spec.capabilities.kind not in WEIGHT_KINDS:
                continue
            if cfg is None or "bits" not in type(cfg).model_fields:
                return
            if "bits" in cfg.model_fields_set and cfg.bits != self.config.w_bits:
                raise ConfigError(
                    f"smoothquant w_bits={self.config.w_bits} conflicts with {spec.name} bits={cfg.bits}; "
                    f"give only bits= (the weight method's width) or make them equal")
            if cfg.bits != self.config.w_bits:
                log.info("smoothquant: %s quantizes the weights with bits=%d (from w_bits)", spec.name,
                         self.config.w_bits)
                cfg.bits = self.config.w_bits
            return

    def process_block(self, block: BlockContext) -> None:
        start = time.perf_counter()
        cfg = self.config
        names = block.quantizable(cfg)
        groups = [g for g in block.info.scale_groups if cfg.smooth]
        needed = list(dict.fromkeys(names + [n for g in groups if g.scalable for n in g.linears]))
        absmax: dict[str, Tensor] = block.collect(needed, "absmax") if needed else {}
        inputs: dict[str, list[Tensor]] = {}
        if cfg.alpha_grid is not None and cfg.quantize:
            firsts = [self._targets(g, names)[0] for g in groups if g.scalable and self._targets(g, names)]
            if firsts:
                inputs = block.collect(firsts, "inputs")

        act_range = {n: absmax[n].clone() for n in names}  # max|x| per channel AFTER smoothing
        for g in groups:
            where = f"{block.name}[{g.role}]"
            targets = self._targets(g, names)
            if not g.scalable:
                self._skip(where, g.reason or "not scalable")
                continue
            if not targets:
                self._skip(where, "no quantizable linear in the group")
                continue
            # under GQA (v -> o) the maxima are taken over the query heads sharing a kv head, so
            # the scales are tied across them and fold into v exactly
            a_max = group_tie(g, torch.stack([absmax[n] for n in g.linears]).amax(dim=0), "max")
            weights = [block.linear(n).weight for n in targets]
            w_max = group_tie(g, weight_absmax(weights), "max")
            alpha: float | None = cfg.alpha
            errors: dict[str, float] = {}
            if cfg.alpha_grid is not None and cfg.quantize:
                x = sample_rows(inputs[targets[0]], SEARCH_ROWS) if inputs.get(targets[0]) else None
                if x is None or x.shape[0] == 0:
                    self._skip(where, "no calibration tokens reached the group")
                    continue
                alpha, s, errors = search_alpha(x, a_max, weights, cfg.alpha_grid, cfg.w_bits, cfg.a_bits,
                                                cfg.group_size, cfg.act_dynamic, w_absmax=w_max)
                if s is None:
                    self.groups.append({"group": where, "alpha": None, "errors": errors})
                    continue
            else:
                s = smoothing_scales(a_max, w_max, cfg.alpha)
            s = s.to(block.linear(g.linears[0]).weight.device)
            why = fold_scale_group(block.module, g, s, block.linear)
            if why is not None:
                self._skip(where, why)
                continue
            for n in g.linears:
                if n in act_range:
                    act_range[n] = act_range[n] / s.to(act_range[n].device)
            self.groups.append({"group": where, "alpha": alpha, "errors": errors})

        if cfg.quantize:
            self._quantize(block, names, act_range)
        self.seconds += time.perf_counter() - start

    @staticmethod
    def _targets(group: Any, names: list[str]) -> list[str]:
        """The group's linears that get quantized (routers and ignored linears excluded)."""
        return [n for n in group.linears if n in names]

    def _skip(self, where: str, why: str) -> None:
        log.info("smoothquant: not smoothing %s: %s", where, why)
        self.skipped[why] += 1

    def _quantize(self, block: BlockContext, names: list[str], act_range: dict[str, Tensor]) -> None:
        cfg = self.config
        for n in names:
            if cfg.act_dynamic:
                act = ActQuant(cfg.a_bits, dynamic=True)
            else:
                act = ActQuant(cfg.a_bits, dynamic=False, scale=static_act_scale(act_range[n], cfg.a_bits))
            setattr(block.linear(n), ACT_ATTR, act)
        if any(k in WEIGHT_KINDS for k in block.run.later_kinds()):
            return  # a weight method follows: it quantizes the smoothed weights (and carries qcore_act)
        self.weights_quantized = True
        for n in names:
            w = block.linear(n).weight.detach().float()
            block.quantize_linear(n, quantize_rtn(w, cfg.w_bits, cfg.group_size, True))

    def record(self) -> dict[str, Any]:
        alphas = Counter("none" if g["alpha"] is None else f"{g['alpha']:g}" for g in self.groups)
        return {
            "seconds": round(self.seconds, 3),
            "groups_smoothed": sum(1 for g in self.groups if g["alpha"] is not None),
            "groups_left_alone": sum(1 for g in self.groups if g["alpha"] is None),
            "alphas": dict(sorted(alphas.items())),
            "skipped": dict(self.skipped),
            "weights_quantized": self.weights_quantized,
        }
