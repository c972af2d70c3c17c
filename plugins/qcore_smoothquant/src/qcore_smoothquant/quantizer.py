"""SmoothQuant glue to the qcore engine.

Per block:

1. gather max|x| per input channel of every quantizable linear on the calibration inputs
   (and, with ``alpha_grid``, a sample of each scale group's inputs);
2. for each scale group the introspection reports (``block.info.scale_groups``): skip it with a
   logged reason when it cannot be folded exactly (GELU between fc1 and fc2, fused producers,
   ...; GQA v->o is folded with scales tied across the query heads of each kv head); otherwise
   compute s with the fixed ``alpha`` or the best ``alpha_grid`` candidate (no smoothing
   included) and fold it exactly with :func:`qcore.arch.fold.fold_scale_group`;
3. ask for activation quantization on every quantizable linear
   (``block.request_activation_quant``: an :class:`~qcore.quant.act.ActQuant`, dynamic per token,
   or static per tensor with the scale calibrated from the smoothed range), which
   ``block.quantize_linear`` carries into the ``QuantLinear``;
4. ask to leave the weights to a later method of the chain (``["smoothquant", "gptq"]``: the
   smoothed float weights are its to quantize; an explicit ``w_bits`` becomes its ``bits``, see
   the spec's ``chain_options``); when none follows, quantize them per channel (symmetric RTN,
   ``w_bits``): 8-bit weights with dynamic int8 activations then run QuantLinear's ``w8a8``
   integer backend.

Folds are exact, so the inputs captured before any fold stay valid for every group.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qcore.plugin import fold_scale_group, group_tie, scale_columns
from qcore.plugin import BaseQuantizer, BlockContext
from qcore.plugin import get_logger
from qcore.plugin import ActQuant
from qcore.plugin import quantize_rtn
from qcore.plugin import ChannelScale
from qcore_smoothquant.smooth import sample_rows, search_alpha, smoothing_scales, static_act_scale, weight_absmax

if TYPE_CHECKING:
    from qcore_smoothquant.config import SmoothQuantConfig

log = get_logger("qcore.smoothquant")

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

    def process_block(self, block: BlockContext) -> None:
        start = time.perf_counter()
        cfg = self.config
        names = block.quantizable(cfg)
        groups = [g for g in block.info.scale_groups if cfg.smooth]
        needed = list(dict.fromkeys(names + [n for g in groups if g.scalable for n in g.linears]))
        absmax: dict[str, Tensor] = block.observe(needed, "absmax") if needed else {}
        inputs: dict[str, list[Tensor]] = {}
        if cfg.alpha_grid is not None and cfg.quantize:
            firsts = [self._targets(g, names)[0] for g in groups if g.scalable and self._targets(g, names)]
            if firsts:
                inputs = block.observe(firsts, "inputs")

        act_range = {n: absmax[n].clone() for n in names}  # max|x| per channel AFTER smoothing
        for g in groups:
            where = f"{block.name}[{g.role}]"
            targets = self._targets(g, names)
            online = not g.scalable and cfg.online_smoothing
            if not g.scalable and not online:
                self._skip(where, g.reason or "not scalable")
                continue
            if not targets:
                self._skip(where, "no quantizable linear in the group")
                continue
            # under GQA (v -> o) the maxima are taken over the query heads sharing a kv head, so
            # the scales are tied across them and fold into v exactly
            readers = targets if online else g.linears
            a_max = group_tie(g, torch.stack([absmax[n] for n in readers]).amax(dim=0), "max")
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
            why = self._smooth_online(block, targets, s) if online else fold_scale_group(block.module, g, s, block.linear)
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
    def _smooth_online(block: BlockContext, targets: list[str], s: Tensor) -> str | None:
        """Scale the targets' columns by ``s`` and divide their inputs by ``s`` at run time."""
        for n in targets:
            lin = block.linear(n)
            lin.weight.data = scale_columns(lin.weight.data, s)
            block.set_input_transform(n, ChannelScale.of(1.0 / s))
        return None

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
            block.request_activation_quant(n, act)
        if block.leave_weights_to_later():
            return  # a weight method follows: it quantizes the smoothed weights (keeping the requests)
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
