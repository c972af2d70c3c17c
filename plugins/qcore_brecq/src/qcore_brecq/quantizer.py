"""BRECQ quantizer: the glue between :mod:`qcore_brecq.brecq` and the core's block engine."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qcore.plugin import BaseQuantizer, BlockContext, CalibrationError, Needs
from qcore.plugin import bar, get_logger

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet

    import torch
    from torch import Tensor, nn

    from qcore.plugin import MethodSpec
    from qcore_brecq.act import ActStep
    from qcore_brecq.brecq import RoundingVars
    from qcore_brecq.config import BrecqConfig

log = get_logger("qcore_brecq")

REPORT_EVERY = 10
"""Steps between two updates of the progress bar's loss."""
FUSED_ADAM_DEVICES = ("cpu", "cuda")
"""Devices where Adam runs as one fused kernel."""


class BrecqQuantizer(BaseQuantizer):
    """Per block: scales from the clipping search on each linear's input Hessian, then the rounding
    variables of every quantizable linear trained jointly on the block's reconstruction loss
    against the float block's outputs, hardened and packed."""

    config: BrecqConfig

    def __init__(self, config: BrecqConfig, spec: MethodSpec) -> None:
        super().__init__(config, spec)
        self.blocks: dict[str, dict[str, Any]] = {}
        """Per block: errors relative to round-to-nearest, flipped and undecided fractions, seconds."""

    def needs(self) -> Needs:
        return Needs(float_outputs=True, gradients=self.config.loss == "fisher")

    def process_block(self, block: BlockContext) -> None:
        cfg = self.config
        names = block.quantizable(cfg)
        if not names:
            return
        if block.inputs is None:
            raise CalibrationError("brecq needs calibration data: pass calibration= (texts, a file or a "
                                   "CalibrationData) or a tokenizer for the default text")
        start = time.perf_counter()
        targets = block.float_outputs or []
        weights = self._fisher_weights(block) if cfg.loss == "fisher" else None
        params = param_names(block.module, {n: block.linear(n) for n in names})
        rvs, hessians = self._init_vars(block, names)
        acts = self._init_acts(block, names)
        frozen = [(p, p.requires_grad) for p in block.module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        from qcore_brecq.act import input_hook

        hooks = [block.linear(n).register_forward_pre_hook(input_hook(a)) for n, a in acts.items()]
        try:
            rtn = self._error(block, rvs, params, targets, weights, nearest=set(rvs))
            norm = rtn if rtn > 0 else 1.0
            step_seconds = self._train(block, rvs, params, targets, weights, norm, acts)
            final = self._error(block, rvs, params, targets, weights)
            nearest: set[str] = set()
            if final >= rtn:
                nearest, final = self._revert(block, rvs, params, targets, weights, final, rtn)
            refit: list[str] = []
            hardened = final
            if cfg.scale_refit:
                refit, final = self._refit(block, rvs, hessians, params, targets, weights, final, nearest)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
            for hook in hooks:
                hook.remove()
        from qcore_brecq.brecq import soft_fraction

        undecided = sum(soft_fraction(rv) * rv.v.numel() for rv in rvs.values()) / sum(rv.v.numel() for rv in rvs.values())
        flipped = _flipped(block, rvs, nearest)
        self._pack(block, names, rvs, nearest)
        for name, step in acts.items():
            block.request_activation_quant(name, step.to_act())
        self.blocks[block.name] = {
            "linears": len(names),
            "iterations": cfg.iterations,
            "rtn_error": rtn,
            "error": final,
            "error_vs_rtn": round(final / norm, 4),
            "flipped": round(flipped, 4),
            "undecided": round(undecided, 4),
            "step_seconds": round(step_seconds, 4),
            "kept_nearest": sorted(nearest),
            "refit": refit,
            "error_before_refit": hardened,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if acts:
            self.blocks[block.name]["activation_grids"] = {n: _describe(a) for n, a in acts.items()}
        log.debug("brecq %s: error %.4g vs round-to-nearest %.4g", block.name, final, rtn)

    # -- the steps ---------------------------------------------------------------------------------
    def _fisher_weights(self, block: BlockContext) -> list[Tensor]:
        from qcore_brecq.brecq import fisher_weight

        grads = block.output_gradients()
        total = sum(float(g.float().pow(2).sum()) for g in grads)
        count = sum(g.numel() for g in grads)
        scale = total / count if total > 0 else 1.0
        return [fisher_weight(g, scale) for g in grads]

    def _init_vars(self, block: BlockContext,
                   names: list[str]) -> tuple[dict[str, RoundingVars], dict[str, Tensor]]:
        """Each linear's rounding variables on its initial grid, and its input Hessian ``X^T X / n``
        where one was observed (``scale_init="search"`` or ``scale_refit``)."""
        import torch

        from qcore.plugin import quant_params
        from qcore_adaround.adaround import search_scales, serial_if_small
        from qcore_brecq.brecq import rounding_vars

        cfg = self.config
        want = cfg.scale_init == "search" or cfg.scale_refit
        stats = block.observe(names, "hessian") if want else {}
        rvs, hessians = {}, {}
        for name in names:
            p = block.precision(name, cfg)
            w = block.linear(name).weight.detach().float()
            if not bool(torch.isfinite(w).all()):
                raise CalibrationError(f"weight of {block.name}.{name} contains NaN or inf; fix the model "
                                       "before quantizing")
            stat = stats.get(name)
            h = stat["hessian"].to(w.device, torch.float32) / 2 if stat is not None else None
            usable = h is not None and int(stat["nsamples"]) > 0 and bool(torch.isfinite(h).all())
            if usable:
                hessians[name] = h
            if usable and cfg.scale_init == "search":
                with serial_if_small(w):
                    scales, zeros = search_scales(w, h, p.bits, p.group_size, p.sym, cfg.clip_min)
            else:
                scales, zeros = quant_params(w, p.bits, p.group_size, p.sym)
            rvs[name] = rounding_vars(w, scales, zeros, p.bits, p.group_size, cfg.learn_scales)
        return rvs, hessians

    def _init_acts(self, block: BlockContext, names: list[str]) -> dict[str, ActStep]:
        """Each linear's activation grid (``a_bits``), searched on its sampled calibration inputs."""
        import torch

        from qcore_brecq.act import INIT_ROWS, init_step

        cfg = self.config
        if cfg.a_bits is None:
            return {}
        gen = torch.Generator().manual_seed(cfg.step_seed * 100_003 + block.index)
        seen = block.observe(names, "inputs", max_rows=INIT_ROWS, generator=gen)
        steps = {}
        for name in names:
            rows = [x for x in seen[name] if x.shape[0]]
            sample = torch.cat(rows) if rows else torch.zeros(1, 1)
            steps[name] = init_step(sample, cfg.a_bits, cfg.a_dynamic)
            if not cfg.learns_activation_steps:
                steps[name].param.requires_grad_(False)
        return steps

    def _run(self, block: BlockContext, params: dict[str, str], weights: dict[str, Tensor], i: int,
             idx: Tensor | None = None) -> Tensor:
        """The block on batch ``i`` (windows ``idx``) with its linears' weights replaced."""
        from torch.func import functional_call

        from qcore_brecq.brecq import first_tensor, slice_windows

        args, kwargs = block.inputs[i]
        if idx is not None:
            batch = _batch_of(args, kwargs)
            args, kwargs = slice_windows(args, idx, batch), slice_windows(kwargs, idx, batch)
        return first_tensor(functional_call(block.module, {params[n]: w for n, w in weights.items()},
                                            args, kwargs))

    def _error(self, block: BlockContext, rvs: dict[str, RoundingVars], params: dict[str, str],
               targets: list[Tensor], weights: list[Tensor] | None, nearest: AbstractSet[str] = frozenset()) -> float:
        """The reconstruction error over every calibration window with the hardened learned
        rounding, except the linears in ``nearest`` (round-to-nearest on their initial grid)."""
        import torch

        from qcore_brecq.brecq import dequantize, reconstruction_error

        with torch.no_grad():
            ws = {n: dequantize(*_final_codes(block, n, rv, n in nearest), rv.zeros, rv.group_size)
                  for n, rv in rvs.items()}
            total, count = 0.0, 0
            for i, target in enumerate(targets):
                out = self._run(block, params, ws, i)
                wt = weights[i].to(out.device) if weights is not None else None
                total += float(reconstruction_error(out, target, wt)) * target.numel()
                count += target.numel()
        return total / max(count, 1)

    def _revert(self, block: BlockContext, rvs: dict[str, RoundingVars], params: dict[str, str],
                targets: list[Tensor], weights: list[Tensor] | None, final: float,
                rtn: float) -> tuple[set[str], float]:
        """For a block whose learned rounding ended no better than round-to-nearest: revert its
        linears to round-to-nearest one at a time where that lowers the block's error (greedy,
        in block order); every linear reverted when nothing beats round-to-nearest."""
        nearest: set[str] = set()
        for name in rvs:
            err = self._error(block, rvs, params, targets, weights, nearest | {name})
            if err < final:
                nearest, final = nearest | {name}, err
        if final >= rtn:
            nearest, final = set(rvs), rtn
        log.warning("brecq %s: the learned rounding's output error was not below round-to-nearest's %.4g; "
                    "round-to-nearest kept for %s (error %.4g now; more iterations or a smaller lr may help)",
                    block.name, rtn, ", ".join(sorted(nearest)), final)
        return nearest, final

    def _refit(self, block: BlockContext, rvs: dict[str, RoundingVars], hessians: dict[str, Tensor],
               params: dict[str, str], targets: list[Tensor], weights: list[Tensor] | None, final: float,
               nearest: AbstractSet[str]) -> tuple[list[str], float]:
        """Refit each learned linear's group scales to its hardened codes (AdaRound's least-squares
        fit through the linear's input Hessian), in block order, keeping a refit only where it
        lowers the block's reconstruction error; returns the refit linears and the error."""
        import torch

        from qcore_adaround.adaround import refit_scales, serial_if_small
        from qcore_brecq.brecq import hard_codes, storage_round

        kept: list[str] = []
        for name, rv in rvs.items():
            h = hessians.get(name)
            if name in nearest or h is None:
                continue
            w = block.linear(name).weight.detach().float()
            with torch.no_grad(), serial_if_small(w):
                old = rv.current_scales().detach()
                new = refit_scales(w, h, hard_codes(rv), old, rv.zeros, rv.group_size)
            rv.refit = storage_round(new, rv.bits)
            err = self._error(block, rvs, params, targets, weights, nearest)
            if err < final:
                kept.append(name)
                final = err
            else:
                rv.refit = None
        return kept, final

    def _train(self, block: BlockContext, rvs: dict[str, RoundingVars], params: dict[str, str],
               targets: list[Tensor], weights: list[Tensor] | None, norm: float,
               acts: dict[str, ActStep]) -> float:
        """Adam on the rounding variables (and scales, activation steps); returns the mean seconds
        per step."""
        import torch

        from qcore_adaround.adaround import beta_at, rectified_sigmoid
        from qcore_brecq.brecq import fake_quant, round_regularizer

        cfg = self.config
        groups = [{"params": [rv.v for rv in rvs.values()], "lr": cfg.lr}]
        if cfg.learn_scales:
            groups.append({"params": [rv.log_scale for rv in rvs.values()], "lr": cfg.scale_lr})
        if acts and cfg.learns_activation_steps:
            groups.append({"params": [a.param for a in acts.values()], "lr": cfg.a_lr})
        opt = torch.optim.Adam(groups, fused=next(iter(rvs.values())).v.device.type in FUSED_ADAM_DEVICES)
        gen = torch.Generator().manual_seed(cfg.step_seed * 100_003 + block.index)
        sizes = [t.shape[0] for t in targets]
        seq_len = targets[0].shape[1] if targets[0].dim() > 2 else 1  # outputs are [windows, tokens, hidden]
        windows = max(1, cfg.batch_tokens // seq_len)
        device = next(iter(rvs.values())).v.device.type
        low = cfg.train_dtype == "bfloat16"
        progress = bar(cfg.iterations, f"brecq {block.name}", unit="step")
        start = time.perf_counter()
        try:
            for step in range(cfg.iterations):
                beta = beta_at(step, cfg.iterations, cfg.warmup, cfg.beta_start, cfg.beta_end)
                hs = {n: rectified_sigmoid(rv.v) for n, rv in rvs.items()}
                ws = {n: fake_quant(rv, h=hs[n]) for n, rv in rvs.items()}
                picks = _step_windows(sizes, windows, gen)
                drawn = sum(sizes[b] if idx is None else len(idx) for b, idx in picks)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
                    terms = [(sizes[b] if idx is None else len(idx)) / drawn
                             * self._window_error(block, params, ws, targets, weights, b, idx)
                             for b, idx in picks]
                loss = (terms[0] if len(terms) == 1 else torch.stack(terms).sum()) / norm
                rec = float(loss.detach())
                if beta is not None and cfg.reg_lambda > 0:
                    loss = loss + cfg.reg_lambda * round_regularizer(list(hs.values()), beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % REPORT_EVERY == 0 or step + 1 == cfg.iterations:
                    progress.update((step + 1) - progress.n)
                    progress.set_postfix(rec=f"{rec:.4g}", loss=f"{float(loss.detach()):.4g}", refresh=False)
        finally:
            progress.close()
        return (time.perf_counter() - start) / cfg.iterations

    def _window_error(self, block: BlockContext, params: dict[str, str], ws: dict[str, Tensor],
                      targets: list[Tensor], weights: list[Tensor] | None, b: int, idx: Tensor | None) -> Tensor:
        """The reconstruction error of batch ``b`` (windows ``idx``, None: all) with weights ``ws``."""
        from qcore_brecq.brecq import reconstruction_error

        out = self._run(block, params, ws, b, idx)
        target = targets[b] if idx is None else targets[b].index_select(0, idx.to(targets[b].device))
        wt = None
        if weights is not None:
            wt = (weights[b] if idx is None else weights[b].index_select(0, idx)).to(out.device)
        return reconstruction_error(out, target, wt)

    def _pack(self, block: BlockContext, names: list[str], rvs: dict[str, RoundingVars],
              nearest: AbstractSet[str] = frozenset()) -> None:
        """Pack each linear's hardened learned codes, or round-to-nearest's codes on the initial
        grid for the linears in ``nearest``."""
        from qcore.plugin import QuantizedWeight

        for name in names:
            rv = rvs[name]
            p = block.precision(name, self.config)
            codes, scales = _final_codes(block, name, rv, name in nearest)
            block.quantize_linear(name, QuantizedWeight(codes, scales, rv.zeros.clone(), p.bits, p.group_size,
                                                        p.sym))

    def record(self) -> dict[str, Any]:
        return {"seconds": round(sum(b["seconds"] for b in self.blocks.values()), 3),
                "blocks": self.blocks}


def param_names(module: nn.Module, linears: dict[str, nn.Module]) -> dict[str, str]:
    """Each linear's weight as the name of a parameter of ``module`` (for ``functional_call``)."""
    by_id = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    out = {}
    for name, lin in linears.items():
        weight = getattr(lin, "weight", None)
        if weight is None or id(weight) not in by_id:
            raise CalibrationError(f"linear {name} has no weight parameter inside its block; brecq can "
                                   "only quantize float linears (nn.Linear)")
        out[name] = by_id[id(weight)]
    return out


def _describe(step: ActStep) -> dict[str, Any]:
    """The learned activation grid of one linear, for the record."""
    act = step.to_act()
    return {"clip": round(act.clip, 4)} if act.dynamic else {"scale": float(f"{act.scale:.6g}")}


def _final_codes(block: BlockContext, name: str, rv: RoundingVars, nearest: bool) -> tuple[Tensor, Tensor]:
    """One linear's codes (uint8) and scales as they will be packed: the hardened learned rounding,
    or (``nearest``) round-to-nearest on its initial grid."""
    import torch

    from qcore_brecq.brecq import hard_codes, nearest_codes

    with torch.no_grad():
        if nearest:
            return nearest_codes(block.linear(name).weight.detach(), rv).to(torch.uint8), rv.scales.clone()
        scales = rv.refit if rv.refit is not None else rv.current_scales()
        return hard_codes(rv), scales.detach().clone()


def _flipped(block: BlockContext, rvs: dict[str, RoundingVars], nearest: AbstractSet[str]) -> float:
    """Fraction of weights whose packed code differs from round-to-nearest's on the initial grid
    (none in the linears of ``nearest``, which keep round-to-nearest)."""
    from qcore_brecq.brecq import hard_codes, nearest_codes

    diff = total = 0
    for name, rv in rvs.items():
        near = nearest_codes(block.linear(name).weight.detach(), rv)
        if name not in nearest:
            diff += int((hard_codes(rv).float() != near).sum())
        total += near.numel()
    return diff / max(total, 1)


def _step_windows(sizes: list[int], windows: int, gen: torch.Generator) -> list[tuple[int, Tensor | None]]:
    """The calibration windows of one step: a batch drawn at random, ``windows`` of its windows
    drawn at random (None: the whole batch); when ``windows`` exceeds that batch, further whole
    batches drawn at random until they hold ``windows`` windows (or every batch is taken)."""
    import torch

    first = int(torch.randint(len(sizes), (1,), generator=gen))
    idx = torch.randperm(sizes[first], generator=gen)[:windows]
    picks: list[tuple[int, Tensor | None]] = [(first, None if len(idx) == sizes[first] else idx.sort().values)]
    held = len(idx)
    if held < windows:
        for b in torch.randperm(len(sizes), generator=gen).tolist():
            if held >= windows:
                break
            if b != first:
                picks.append((b, None))
                held += sizes[b]
    return picks


def _batch_of(args: tuple, kwargs: dict) -> int:
    """Windows in a block call (the hidden states' first dimension)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return int(hidden.shape[0])
