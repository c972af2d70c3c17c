"""AWQ glue to the qcore engine: scale search + exact fold, clip search, then RTN (or hand-off).

Per block, for each scale group the introspection reports (``block.info.scale_groups``):

1. capture, with the block as it is now (earlier groups already folded), the inputs of the
   group's *inspected module* (the smallest module containing every linear of the group:
   ``self_attn`` for q/k/v, ``mlp`` for gate/up or a MoE block with its router and experts,
   the linear itself for v->o and up->down; the whole block when the group spans it) and the
   mean |x| of the group's input;
2. search a over the grid: MSE between the inspected module's float output and its output with
   the group's quantizable weights replaced by Q(w * s) / s (RTN fake quantization at the
   configured bits/group size); unscaled is a candidate too, so a group whose scaling does not
   help is left alone;
3. fold: 1/s into the norm (``(offset + w) / s - offset``, offset probed, 1 for Gemma-style
   ``(1 + w)`` norms) or the previous linear's output rows, s into the group's columns. This is
   exact (a probe checks each norm fold). Groups the introspection marks unscalable (a fused
   qkv, GELU between fc1 and fc2, ...) are skipped and the reason is logged and recorded; so is
   v -> o under grouped-query attention unless ``scale_gqa_attn_out`` (then its scales are tied
   across the query heads sharing a kv head: both means averaged over them, an exact fold).

Then the clip search per linear (except q/k) on sampled inputs of the scaled block, and RTN
with the searched clip, unless a later method in the chain quantizes weights (GPTQ): then the
weights are left scaled in float for it (and, by default, unclipped: ``clip_search=None``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qcore.plugin import fold_scale_group, group_tie
from qcore.plugin import BaseQuantizer, BlockContext, CalibrationError
from qcore.plugin import get_logger
from qcore_awq.search import apply_clip, scaled_fake_quant, search_clip, search_scale, weight_mean

if TYPE_CHECKING:
    from qcore_awq.config import AWQConfig

log = get_logger("qcore.awq")


def common_prefix(names: list[str]) -> str:
    """Dotted path of the smallest module containing all ``names`` ("" = the block itself)."""
    parts = [n.split(".") for n in names]
    if len(parts) == 1:
        return names[0]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


class AWQQuantizer(BaseQuantizer):
    config: AWQConfig

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.blocks: list[dict[str, Any]] = []
        #: Test hook: stop after the exact fold (no clip, no quantization).
        self.fold_only = False

    # -- engine hooks --------------------------------------------------------------------------
    def process_block(self, block: BlockContext) -> None:
        if block.inputs is None:
            raise CalibrationError("awq needs calibration data: pass calibration=... (texts, a file or "
                                   "CalibrationData) and a tokenizer to qcore.quantize")
        cfg = self.config
        t0 = time.perf_counter()
        names = block.quantizable(cfg)
        groups = self.scale_block(block, names)
        t1 = time.perf_counter()
        rec: dict[str, Any] = {"block": block.index, "groups": groups, "scale_search_s": round(t1 - t0, 3)}
        if self.fold_only:
            self.blocks.append(rec)
            return
        defer = block.leave_weights_to_later()
        clip = (not defer) if cfg.clip_search is None else cfg.clip_search
        shrinks = self.clip_block(block, names) if clip else {}
        t2 = time.perf_counter()
        self.finish_block(block, names, shrinks, defer)
        t3 = time.perf_counter()
        rec.update({"clip_search_s": round(t2 - t1, 3), "quantize_s": round(t3 - t2, 3),
                    "search_s": round(t2 - t0, 3), "deferred_to_later_method": defer,
                    "clipped_fraction": {n: round(float((s < 1).float().mean()), 4) for n, s in shrinks.items()}})
        self.blocks.append(rec)
        log.info("awq block %d: scale search %.2f s, clip search %.2f s (%s)", block.index, t1 - t0, t2 - t1,
                 ", ".join(f"{g['role']}: {g['status']}" for g in groups))

    def record(self) -> dict[str, Any]:
        total = sum(b.get("search_s", b["scale_search_s"]) for b in self.blocks)
        return {"search_seconds_total": round(total, 3), "blocks": self.blocks}

    # -- steps ---------------------------------------------------------------------------------
    def _fake_quant(self, block: BlockContext, name: str) -> Callable[[Tensor], Tensor]:
        """RTN quantize-dequantize at linear ``name``'s precision."""
        from qcore.plugin import quantize_rtn

        p = block.precision(name, self.config)
        return lambda w: quantize_rtn(w, p.bits, p.group_size, p.sym).dequantize()

    def scale_block(self, block: BlockContext, quantizable: list[str]) -> list[dict[str, Any]]:
        """Search and fold every scale group of the block; returns one record per group."""
        out = []
        for group in block.info.scale_groups:
            rec: dict[str, Any] = {"role": group.role, "prev": group.prev, "linears": list(group.linears)}
            reason = self._skip_reason(group)
            if reason:
                rec["status"] = f"skipped: {reason}"
                log.info("awq block %d: skip scale group %s (%s -> %s): %s", block.index, group.role,
                         group.prev, ",".join(group.linears), reason)
            else:
                rec.update(self._scale_group(block, group, quantizable))
            out.append(rec)
        return out

    def _skip_reason(self, group: Any) -> str:
        """Why a scale group is not searched ("" = search it)."""
        if not group.scalable:
            return group.reason
        if getattr(group, "repeat", 1) > 1 and not self.config.scale_gqa_attn_out:
            return ("grouped-query attention: v -> o scales would be tied across query heads; off by "
                    "default (scale_gqa_attn_out=True turns it on)")
        return ""

    def _scale_group(self, block: BlockContext, group: Any, quantizable: list[str]) -> dict[str, Any]:
        cfg = self.config
        targets = [n for n in group.linears if n in quantizable]
        if not targets:
            return {"status": "skipped: no linear of the group is quantized"}
        span = "" if cfg.search_output == "block" else common_prefix(list(group.linears))
        calls = block.module_calls(span) if span else []
        x_mean = self._input_mean(block, group)
        if x_mean is None:
            return {"status": "skipped: no calibration token reaches this group"}
        linears = {n: block.linear(n) for n in group.linears}
        originals = {n: linears[n].weight.detach().clone() for n in targets}
        sizes = [block.precision(n, cfg).group_size for n in targets]
        # under GQA (v -> o) both means are averaged over the query heads sharing a kv head,
        # so every scale s = x^a / w^(1-a) is tied and folds into v exactly
        x_mean = group_tie(group, x_mean)
        w_mean = group_tie(group, weight_mean([originals[n] for n in targets], sizes))
        fq = {n: self._fake_quant(block, n) for n in targets}

        def run() -> list[Tensor]:
            if span == "":
                return [o.float() for o in block.forward()]
            return [o.float() for o in block.call_module(span, calls)]

        with torch.no_grad():
            ref = run()
            numel = sum(r.numel() for r in ref)

            def loss(s: Tensor) -> float:
                for n in targets:
                    w = originals[n]
                    linears[n].weight.data = scaled_fake_quant(w.float(), s, fq[n]).to(w.dtype)
                try:
                    outs = run()
                finally:
                    for n in targets:
                        linears[n].weight.data = originals[n]
                # summed over every process's windows when several share them (torchrun)
                sq = sum((o - r).double().pow(2).sum() for o, r in zip(outs, ref))
                err = block.all_reduce(torch.tensor([float(sq), float(numel)], dtype=torch.float64))
                return float(err[0]) / max(float(err[1]), 1.0)

            s, alpha, losses, base = search_scale(x_mean, w_mean, loss, cfg.n_grid, cfg.duo_scaling)
        rec: dict[str, Any] = {"alpha": alpha, "loss_unscaled": base,
                               "loss_best": min([base, *losses])}
        if alpha is None:
            rec["status"] = "kept unscaled (no scale beat it)"
            return rec
        why = self.fold(block, group, s)
        rec["status"] = "scaled" if why is None else f"skipped: {why}"
        return rec

    @staticmethod
    def _input_mean(block: BlockContext, group: Any) -> Tensor | None:
        """Mean |x| of the group's input, from the linear that sees the most tokens (an MoE
        group's router sees them all); None when no calibration token reaches the group."""
        means = block.observe(list(group.linears), "absmean")
        roles = {n: block.info.linears[n].role for n in group.linears}
        first = next((n for n in group.linears if roles[n] == "router"), group.linears[0])
        mean = means[first]
        return None if not bool(mean.any()) else mean

    def fold(self, block: BlockContext, group: Any, s: Tensor) -> str | None:
        """Divide the group's producer by ``s`` and scale its linears' columns by ``s`` (exactly).

        Returns None, or why the group could not be folded (then nothing was changed)."""
        return fold_scale_group(block.module, group, s, block.linear)

    def clip_block(self, block: BlockContext, names: list[str]) -> dict[str, Tensor]:
        """Per-(row, group) shrink for each quantizable linear except q/k, on sampled inputs."""
        cfg = self.config
        skip = set(cfg.clip_skip_roles)
        todo = [n for n in names if block.info.linears[n].role.split(".")[-1] not in skip]
        if not todo:
            return {}
        n_batches = max(1, len(block.inputs or []))
        per_batch = max(1, -(-cfg.n_clip_samples // n_batches))
        samples = block.observe(todo, "inputs", stop_early=False, max_rows=per_batch,
                                generator=torch.Generator().manual_seed(block.index), device="cpu")
        shrinks = {}
        for n in todo:
            if not samples[n] or sum(x.shape[0] for x in samples[n]) == 0:
                continue
            x = torch.cat(samples[n])[: cfg.n_clip_samples]
            w = block.linear(n).weight.detach().float().cpu()
            p = block.precision(n, cfg)
            shrinks[n], _ = search_clip(w, x, p.group_size, p.sym, self._fake_quant(block, n), cfg.clip_grid,
                                        cfg.clip_max_shrink)
        return shrinks

    def finish_block(self, block: BlockContext, names: list[str], shrinks: dict[str, Tensor], defer: bool) -> None:
        """RTN with the searched clip, or (a weight method follows) clamp in float and hand over."""
        from qcore.plugin import quantize_rtn

        for n in names:
            lin = block.linear(n)
            shrink = shrinks.get(n)
            p = block.precision(n, self.config)
            if defer:
                if shrink is not None:
                    w = lin.weight.data
                    lin.weight.data = apply_clip(w.float(), shrink.to(w.device), p.group_size, p.sym).to(w.dtype)
                continue
            w = lin.weight.detach().float()
            clip = 1.0 if shrink is None else shrink.to(w.device)
            block.quantize_linear(n, quantize_rtn(w, p.bits, p.group_size, p.sym, clip=clip))


