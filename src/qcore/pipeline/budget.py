"""Mixed precision under a size budget: per-layer sensitivity, packed sizes, allocation.

``qcore.quantize(model, "gptq", budget_bits=3.5)`` (any weight method; ``budget_bytes=`` instead
of ``budget_bits=``) runs, before the method:

1. a **sensitivity pass** on the model as given (float weights, one pass over the calibration
   windows): for each quantizable linear ``l`` and each candidate width ``b``, the error of its
   weight quantized to ``b`` bits with the method's group size and symmetry. The proxy quantizer
   is qcore's round-to-nearest (:func:`qcore.quant.primitives.quantize_rtn`) whatever the method:
   a calibrated method lowers every width's error, the ranking of layers and widths is what the
   allocation needs. Criteria (``budget_criterion``):

   * ``"hessian"``: ``s_l(b) = tr(dW H dW^T)`` with ``H = 2/n sum x x^T`` of the linear's input
     (the ``hessian`` observer), i.e. twice the mean squared output error of the layer; run block
     by block on the float model (one block's activations alive at a time);
   * ``"fisher"``: the same output error with each output row ``o`` weighted by ``E[g_o^2]``, the
     mean squared gradient of the LM loss with respect to that output (the ``grad_sq`` observer of
     one gradient pass): ``s_l(b) = sum_o E[g_o^2] (dW H dW^T)_oo``, the second-order estimate of
     the loss increase when gradients and output errors are independent;
   * ``"fisher_diag"``: ``s_l(b) = sum_ij F_ij dW_ij^2`` with ``F`` the diagonal empirical Fisher
     of the weights (the ``fisher`` observer: squared gradient of the loss per calibration window,
     summed); no Hessian, input correlations ignored.

2. an **allocation**: one width per layer from the candidates minimizing the summed sensitivity
   with the packed bytes of the layers at most the budget (a multiple-choice knapsack, solved by
   dynamic programming over a byte grid, :func:`allocate`);

3. the method runs with ``bits`` set to the allocation, a per-layer map of full layer names
   (``{"default": 4, "model.layers.0.self_attn.q_proj": 3, ...}``), which the checkpoint keeps in
   the method's config; the record keeps a summary under ``"budget"`` (``qcore info`` shows it).

Sizes count what :class:`qcore.quant.linear.QuantLinear` stores for a layer: the codes packed at
``b`` bits (rows padded to 32 codes) plus one 2-byte scale and one 2-byte zero point per group and
output row (:func:`packed_bytes`); average bits per weight = 8 x bytes / weights over the layers the
budget covers. Not counted: biases (float, the same at every width), an act-order ``g_idx``
(GPTQ with ``desc_act=True, static_groups=False``), float32 scales (only where float16 would
lose them).

``bits`` and a budget: an int ``bits`` is refused (the budget chooses the widths); a per-layer
map pins the layers its patterns match (other than ``"default"``) to their width, and those
layers' bytes count against the budget. Ignored layers (``ignore=``) stay float and are outside
the budget.

Importing this module does not import torch.
"""
from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qcore.plugin.config import DEFAULT_KEY, WeightQuantConfig, layer_value
from qcore.plugin.errors import ConfigError
from qcore.progress import bar, get_logger

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from qcore.arch.introspect import ModelInfo
    from qcore.data import CalibrationData
    from qcore.pipeline.chain import Chain, Problem
    from qcore.plugin.spec import MethodSpec

log = get_logger("budget")

DEFAULT_CANDIDATES: tuple[int, ...] = (2, 3, 4, 6, 8)
"""Candidate widths when none are given (those the weight method supports)."""
CRITERIA: tuple[str, ...] = ("hessian", "fisher", "fisher_diag")
DEFAULT_CRITERION = "fisher"
"""Chosen by measurement: on stories260K at the size of uniform 3-bit g32 it gave the lowest
perplexity of the three for RTN and GPTQ (docs/results.md, "Mixed precision")."""
CODE_WORD_BITS = 32
"""Codes are packed into int32 words; each row is padded to a multiple of 32 codes."""
SCALE_BYTES = 2
"""Bytes of one stored scale and of one stored zero point (bfloat16 or float16)."""
GRID_CELLS = 1 << 17
"""Most cells of the allocation's byte grid (a grid of the sizes' common divisor is exact below it)."""
GRID_TOTAL = 1 << 26
"""Most (layers x cells) of the allocation's choice table (bytes of memory)."""
BUDGET_OPTIONS: tuple[str, ...] = ("budget_bits", "budget_bytes", "budget_candidates", "budget_criterion")
"""Keyword arguments of ``qcore.quantize`` and ``qcore.check`` that set a size budget."""


class BudgetConfig(BaseModel):
    """A size budget for mixed precision (``qcore.quantize(..., budget_bits=...)``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    bits: float | None = None
    """Average bits per weight over the quantized linears, scales and zero points included."""
    bytes: int | None = None
    """Packed bytes of the quantized linears (codes, scales and zero points)."""
    candidates: list[int] | None = None
    """Widths a layer may get; default: those of 2, 3, 4, 6, 8 the weight method supports."""
    criterion: Literal["hessian", "fisher", "fisher_diag"] = DEFAULT_CRITERION
    """Sensitivity: output error (hessian), output error weighted by the loss gradient (fisher), or
    diagonal-Fisher-weighted weight error (fisher_diag)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v <= 32):
            raise ValueError("budget_bits is an average width in bits per weight, e.g. 3.5")
        return v

    @field_validator("bytes")
    @classmethod
    def _bytes(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("budget_bytes must be a positive number of bytes")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(int(b) < 1 or int(b) > 8 for b in v):
            raise ValueError("budget_candidates must be a non-empty list of widths from 1 to 8, e.g. [2, 3, 4, 8]")
        return sorted({int(b) for b in v})


def split_budget(options: dict[str, Any]) -> BudgetConfig | None:
    """Remove the ``budget_*`` keywords from ``options``; their budget, or None when none given."""
    given = {k.removeprefix("budget_"): options.pop(k) for k in BUDGET_OPTIONS if k in options}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    try:
        budget = BudgetConfig(**given)
    except ValidationError as exc:
        msg = "; ".join(f"budget_{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid budget: {msg}") from None
    if (budget.bits is None) == (budget.bytes is None):
        raise ConfigError("a budget needs exactly one of budget_bits= (average bits per weight, e.g. 3.5) "
                          "or budget_bytes= (packed bytes of the quantized linears)")
    return budget


# -- sizes -----------------------------------------------------------------------------------------
def packed_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes a QuantLinear stores for its codes, scales and zero points (no bias, no g_idx)."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    words = -(-in_features // CODE_WORD_BITS) * bits
    return out_features * words * 4 + 2 * out_features * groups * SCALE_BYTES


def average_bits(nbytes: int, weights: int) -> float:
    """8 x bytes / weights."""
    return 8.0 * nbytes / weights if weights else 0.0


# -- allocation (multiple-choice knapsack) ---------------------------------------------------------
def allocate(sizes: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], budget: int,
             max_cells: int = GRID_CELLS) -> list[int]:
    """The option index of each layer minimizing ``sum(costs)`` with ``sum(sizes) <= budget``.

    Dynamic programming over the bytes each layer takes beyond its smallest option, on a grid
    of ``unit`` bytes: the greatest common divisor of those extra bytes when the grid then has at
    most ``max_cells`` cells (the result is optimal), else a coarser unit with sizes rounded up
    (the budget still holds; optimal up to one unit per layer). A greedy fill then spends the
    bytes the grid left over on the upgrades with the best cost decrease per byte.
    Raises ``ConfigError`` when even the smallest options exceed the budget.
    """
    import torch

    n = len(sizes)
    if n == 0:
        return []
    if any(len(s) != len(c) or not s for s, c in zip(sizes, costs)) or len(costs) != n:
        raise ValueError("sizes and costs need one non-empty list per layer, of equal lengths")
    base = []
    for sz, co in zip(sizes, costs):
        base.append(min(range(len(sz)), key=lambda k, sz=sz, co=co: (sz[k], float(co[k]))))
    floor_bytes = sum(sizes[i][base[i]] for i in range(n))
    if floor_bytes > budget:
        raise ConfigError(f"the budget of {budget:,} bytes is below the smallest allocation ({floor_bytes:,} bytes, "
                          "every layer at its narrowest width); raise the budget or add a narrower candidate")
    spare = budget - floor_bytes
    extra = [[max(0, int(s) - int(sz[base[i]])) for s in sz] for i, sz in enumerate(sizes)]
    unit = reduce(math.gcd, [e for ex in extra for e in ex if e > 0], 0) or 1
    cells_cap = max(1, min(max_cells, GRID_TOTAL // n))
    if spare // unit > cells_cap:
        unit = -(-spare // cells_cap)
    cap = spare // unit
    dp = torch.zeros(cap + 1, dtype=torch.float64)
    choice = torch.zeros(n, cap + 1, dtype=torch.int16)
    for i in range(n):
        new = torch.full((cap + 1,), math.inf, dtype=torch.float64)
        pick = torch.zeros(cap + 1, dtype=torch.int16)
        for k, e in enumerate(extra[i]):
            w = -(-e // unit)
            if w > cap:
                continue
            cand = dp[: cap + 1 - w] + float(costs[i][k])
            better = cand < new[w:]
            new[w:] = torch.where(better, cand, new[w:])
            pick[w:] = torch.where(better, torch.tensor(k, dtype=torch.int16), pick[w:])
        dp, choice[i] = new, pick
    picks = [0] * n
    c = cap
    for i in reversed(range(n)):
        k = int(choice[i, c])
        picks[i] = k
        c -= -(-extra[i][k] // unit)
    return _greedy_fill(sizes, costs, budget, picks)


def _greedy_fill(sizes: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], budget: int,
                 picks: list[int]) -> list[int]:
    """Spend left-over bytes on the cheapest-per-byte improvements that still fit."""
    left = budget - sum(sizes[i][k] for i, k in enumerate(picks))
    while True:
        best: tuple[float, int, int] | None = None
        for i, k in enumerate(picks):
            for j in range(len(sizes[i])):
                gain = float(costs[i][k]) - float(costs[i][j])
                more = sizes[i][j] - sizes[i][k]
                if gain <= 0 or more > left:
                    continue
                rate = gain / max(more, 1)
                if best is None or rate > best[0]:
                    best = (rate, i, j)
        if best is None:
            return picks
        _, i, j = best
        left -= sizes[i][j] - sizes[i][picks[i]]
        picks[i] = j


# -- sensitivity -----------------------------------------------------------------------------------
def rtn_error(weight: Tensor, bits: int, group_size: int, sym: bool) -> Tensor:
    """``dW = W - Q(W)``: the round-to-nearest error of ``weight`` at ``bits`` (float32)."""
    from qcore.quant.primitives import quantize_rtn

    w = weight.detach().float()
    return w - quantize_rtn(w, bits, group_size, sym).dequantize()


def hessian_sensitivity(weight: Tensor, hessian: Tensor, widths: Sequence[int], group_size: int,
                        sym: bool, row_weights: Tensor | None = None) -> list[float]:
    """``sum_o r_o (dW H dW^T)_oo`` for each width (``H``: 2/n sum x x^T of the layer's input;
    ``r``: per-output-row weights, all ones when None: then it is ``tr(dW H dW^T)``)."""
    import torch

    h = hessian.to(weight.device, torch.float32)
    r = None if row_weights is None else row_weights.to(weight.device, torch.float32)
    out = []
    for b in widths:
        dw = rtn_error(weight, b, group_size, sym)
        rows = ((dw @ h) * dw).sum(dim=1)
        out.append(float(rows.sum() if r is None else (rows * r).sum()))
    return out


def fisher_sensitivity(weight: Tensor, fisher: Tensor, widths: Sequence[int], group_size: int,
                       sym: bool) -> list[float]:
    """``sum(F * dW^2)`` for each width (``F``: diagonal empirical Fisher of the weight)."""
    import torch

    f = fisher.to(weight.device, torch.float32)
    return [float((f * rtn_error(weight, b, group_size, sym).pow(2)).sum()) for b in widths]


# -- the plan: layers, widths and sizes, before any slow work --------------------------------------
@dataclass
class Layer:
    """One linear the budget covers."""

    name: str
    out_features: int
    in_features: int
    group_size: int
    widths: list[int]
    """Widths it may take (one when a ``bits`` map pins it)."""

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    def sizes(self) -> list[int]:
        return [packed_bytes(self.out_features, self.in_features, b, self.group_size) for b in self.widths]


@dataclass
class Plan:
    """What the budget covers and how many bytes it allows."""

    budget: BudgetConfig
    method: str
    candidates: list[int]
    layers: list[Layer]
    limit: int
    """The budget in bytes."""
    sym: bool = False
    pinned: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)


def weight_position(chain: Chain) -> int | None:
    """Index of the chain's method that quantizes weights with a ``WeightQuantConfig`` (the last)."""
    found = None
    for i, (spec, cfg) in enumerate(zip(chain.specs, chain.configs)):
        if spec.capabilities.quantizes_weights and isinstance(cfg, WeightQuantConfig):
            found = i
    return found


def candidate_widths(spec: MethodSpec, cfg: WeightQuantConfig, budget: BudgetConfig) -> tuple[list[int], list[str]]:
    """(the candidate widths, problems): given candidates must all be valid for the method."""
    supported = [b for b in (spec.capabilities.weight_bits or DEFAULT_CANDIDATES) if _config_accepts(cfg, b)]
    if budget.candidates is None:
        widths = [b for b in DEFAULT_CANDIDATES if b in supported]
        if not widths:
            return [], [f"{spec.name} supports none of the default budget candidates "
                        f"{', '.join(map(str, DEFAULT_CANDIDATES))}: pass budget_candidates from "
                        f"{', '.join(map(str, supported))}"]
        return widths, []
    bad = [b for b in budget.candidates if b not in supported]
    if bad:
        return [], [f"{spec.name} supports weight bits {', '.join(map(str, supported))}; budget_candidates has "
                    f"{', '.join(map(str, bad))}: drop {'it' if len(bad) == 1 else 'them'}"]
    return list(budget.candidates), []


def _config_accepts(cfg: WeightQuantConfig, bits: int) -> bool:
    try:
        type(cfg).model_validate({**cfg.model_dump(), "bits": bits})
    except ValidationError:
        return False
    return True


def budget_problems(chain: Chain, budget: BudgetConfig) -> list[Problem]:
    """Why ``budget`` cannot apply to ``chain`` (options only: no model needed)."""
    from qcore.pipeline.chain import Problem

    if not chain.specs or len(chain.specs) != len(chain.names) or any(c is None for c in chain.configs):
        return []  # the chain's own problems come first
    pos = weight_position(chain)
    if pos is None:
        return [Problem(f"a size budget needs a method that quantizes weights with bits= (chain: "
                        f"{' + '.join(chain.names)})", "add a weight method such as 'rtn' or 'gptq'", option=True)]
    spec, cfg = chain.specs[pos], chain.configs[pos]
    assert isinstance(cfg, WeightQuantConfig)
    problems = []
    if "bits" in cfg.model_fields_set and not isinstance(cfg.bits, dict):
        problems.append(Problem(f"bits={cfg.bits} and a budget both set {spec.name}'s widths",
                                "pass either bits= or budget_bits=/budget_bytes= (a bits map such as "
                                '{"default": 4, "*.mlp.down_proj": 8} pins layers within a budget)', option=True))
    _, bad = candidate_widths(spec, cfg, budget)
    problems += [Problem(p, option=True) for p in bad]
    return problems


def make_plan(info: ModelInfo, chain: Chain, budget: BudgetConfig) -> Plan:
    """The layers the budget covers, their widths and the budget in bytes; raises ``ConfigError``
    when the options are invalid or the budget is outside what the candidates can reach."""
    problems = budget_problems(chain, budget)
    if problems:
        p = problems[0]
        raise ConfigError(p.reason + (f"; {p.fix}" if p.fix else ""))
    pos = weight_position(chain)
    assert pos is not None
    spec, cfg = chain.specs[pos], chain.configs[pos]
    assert isinstance(cfg, WeightQuantConfig)
    widths, _ = candidate_widths(spec, cfg, budget)
    pins = {p: int(v) for p, v in cfg.bits.items() if p != DEFAULT_KEY} if isinstance(cfg.bits, dict) else {}
    layers, pinned = [], {}
    for b in info.blocks:
        for rel, li in b.linears.items():
            full = f"{b.name}.{rel}"
            if not li.quantize or li.role.split(".")[-1] == "router" or cfg.ignores(full):
                continue
            own = widths
            if any(fnmatch.fnmatchcase(full, p) for p in pins):
                pinned[full] = layer_value({DEFAULT_KEY: 0, **pins}, full)
                own = [pinned[full]]
            layers.append(Layer(full, li.out_features, li.in_features, layer_value(cfg.group_size, full), own))
    if not layers:
        raise ConfigError("the budget covers no layer: every quantizable linear is ignored")
    weights = sum(layer.weights for layer in layers)
    limit = budget.bytes if budget.bytes is not None else int(math.floor(budget.bits * weights / 8))
    low = sum(min(layer.sizes()) for layer in layers)
    high = sum(max(layer.sizes()) for layer in layers)
    if limit < low:
        raise ConfigError(
            f"budget of {_describe_size(limit, weights)} is below the smallest allocation of {spec.name} with "
            f"widths {', '.join(map(str, widths))}{f' and {len(pinned)} pinned layers' if pinned else ''} "
            f"({_describe_size(low, weights)}, scales and zero points included); raise the budget to at least budget_bits={math.ceil(average_bits(low, weights) * 100) / 100}"
            ", add a narrower candidate, or use a larger group_size")
    if limit >= high:
        log.info("budget %s reaches the widest allocation (%s): every layer at its widest width",
                 _describe_size(limit, weights), _describe_size(high, weights))
    return Plan(budget, spec.name, widths, layers, limit, sym=bool(cfg.sym), pinned=pinned)


def _describe_size(nbytes: int, weights: int) -> str:
    return f"{nbytes:,} bytes ({average_bits(nbytes, weights):.3f} bits per weight)"


# -- the passes ------------------------------------------------------------------------------------
def hessian_pass(model: nn.Module, plan: Plan, calibration: CalibrationData,
                 device: torch.device | str | None = None, batch_size: int = 8,
                 row_weights: dict[str, Tensor] | None = None) -> dict[str, list[float]]:
    """Per layer, ``tr(dW H dW^T)`` (rows weighted by ``row_weights[name]`` where given) for each
    of its widths: block by block on the float model, one Hessian per set of linears that read
    the same input (q/k/v, gate/up)."""
    import torch

    from qcore.arch.introspect import inspect_model
    from qcore.pipeline.capture import block_inputs, capture_inputs, module_device
    from qcore.pipeline.engine import BlockContext, RunContext

    info = inspect_model(model)
    wanted = {layer.name: layer for layer in plan.layers}
    dev = torch.device(device) if device is not None else None
    run = RunContext(model=model, info=info, chain=[], calibration=calibration, device=dev, record={})
    out: dict[str, list[float]] = {}
    with _eval_mode(model), torch.no_grad():
        hidden, templates = capture_inputs(model, info, calibration, batch_size, store_device=dev)
        pbar = bar(len(info.blocks), desc="qcore sensitivity", unit="block")
        try:
            for i, binfo in enumerate(info.blocks):
                module = binfo.module
                home = module_device(module)
                if dev is not None and dev != home:
                    module.to(dev)
                try:
                    block = BlockContext(i, binfo, run, block_inputs(hidden, templates[i], dev))
                    names = [n for n in binfo.quantizable() if f"{binfo.name}.{n}" in wanted]
                    keys = _shared_input_keys(binfo)
                    reps = {n: next(m for m in names if keys.get(m, m) == keys.get(n, n)) for n in names}
                    stats = block.observe(sorted(set(reps.values()), key=names.index), "hessian",
                                          stop_early=False) if names else {}
                    for n in names:
                        layer = wanted[f"{binfo.name}.{n}"]
                        out[layer.name] = hessian_sensitivity(
                            block.linear(n).weight, stats[reps[n]]["hessian"], layer.widths, layer.group_size,
                            plan.sym, None if row_weights is None else row_weights.get(layer.name))
                    del stats
                    hidden = [h.detach() for h in block.forward()]
                    templates[i] = []
                finally:
                    if dev is not None and dev != home:
                        module.to(home)
                pbar.update(1)
        finally:
            pbar.close()
    return out


def gradient_stats(model: nn.Module, calibration: CalibrationData, observer: str,
                   batch_size: int = 8) -> dict[str, Tensor]:
    """Full linear name -> the gradient observer's result, from one gradient pass."""
    from qcore.arch.introspect import inspect_model
    from qcore.pipeline.gradients import gradient_pass

    with _eval_mode(model):
        grads, stats = gradient_pass(model, inspect_model(model), calibration, [observer], batch_size)
    del grads
    return {name: per[observer] for name, per in stats.items()}


def fisher_pass(model: nn.Module, plan: Plan, calibration: CalibrationData,
                batch_size: int = 8) -> dict[str, list[float]]:
    """Per layer, ``sum(F * dW^2)`` for each of its widths, ``F`` from one gradient pass."""
    stats = gradient_stats(model, calibration, "fisher", batch_size)
    modules = dict(model.named_modules())
    out: dict[str, list[float]] = {}
    for layer in plan.layers:
        fisher = stats.pop(layer.name, None)
        if fisher is None:  # not reached by the pass: no measured sensitivity
            out[layer.name] = [0.0] * len(layer.widths)
            continue
        out[layer.name] = fisher_sensitivity(modules[layer.name].weight, fisher, layer.widths, layer.group_size,
                                             plan.sym)
    return out


class _eval_mode:
    """Model in eval mode without its KV cache for the duration (restored after)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.model.eval()
        self.config = getattr(self.model, "config", None)
        self.cache = getattr(self.config, "use_cache", None)
        if self.config is not None and self.cache is not None:
            self.config.use_cache = False

    def __exit__(self, *exc: object) -> None:
        if self.config is not None and self.cache is not None:
            self.config.use_cache = self.cache
        self.model.train(self.training)


def _shared_input_keys(binfo: Any) -> dict[str, str]:
    """Linear -> key; linears with one key read the same tensor (one scale group, one expert)."""
    keys: dict[str, str] = {}
    for gi, group in enumerate(binfo.scale_groups):
        for name in group.linears:
            li = binfo.linears.get(name)
            if li is not None:
                keys[name] = f"{gi}:{li.expert}"
    return keys


# -- the whole step --------------------------------------------------------------------------------
@dataclass
class Allocation:
    """The result: a per-layer ``bits`` map and what it costs."""

    bits: dict[str, int]
    """``{"default": w, full layer name: width, ...}``: every covered layer named."""
    widths: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    record: dict[str, Any]


def measure_sensitivity(model: nn.Module, plan: Plan, calibration: CalibrationData,
                        device: torch.device | str | None = None, batch_size: int = 8) -> dict[str, list[float]]:
    """Per covered layer, its sensitivity at each of its widths (``plan.budget.criterion``)."""
    crit = plan.budget.criterion
    if crit == "fisher_diag":
        return fisher_pass(model, plan, calibration, batch_size)
    rows = gradient_stats(model, calibration, "grad_sq", batch_size) if crit == "fisher" else None
    return hessian_pass(model, plan, calibration, device, batch_size, row_weights=rows)


def allocation_for(plan: Plan, sensitivity: dict[str, list[float]], seconds: float = 0.0) -> Allocation:
    """The allocation under ``plan.limit`` for measured sensitivities (a layer without one costs 0)."""
    sizes = [layer.sizes() for layer in plan.layers]
    costs = [sensitivity.get(layer.name, [0.0] * len(layer.widths)) for layer in plan.layers]
    picks = allocate(sizes, costs, plan.limit)
    widths = {layer.name: layer.widths[k] for layer, k in zip(plan.layers, picks)}
    used = sum(s[k] for s, k in zip(sizes, picks))
    counts: dict[int, int] = {}
    for w in widths.values():
        counts[w] = counts.get(w, 0) + 1
    default = max(counts, key=lambda w: (counts[w], -w))
    weights = plan.weights
    record = {
        "criterion": plan.budget.criterion, "candidates": plan.candidates,
        "target_bits": plan.budget.bits, "target_bytes": plan.limit,
        "bytes": used, "avg_bits": round(average_bits(used, weights), 4), "weights": weights,
        "layers": len(plan.layers), "widths": {str(w): counts[w] for w in sorted(counts)},
        "pinned": len(plan.pinned), "predicted_error": float(sum(c[k] for c, k in zip(costs, picks))),
        "seconds": round(seconds, 3),
    }
    log.info("budget %s: %s, widths %s (%s sensitivity in %.1f s)", _describe_size(plan.limit, weights),
             _describe_size(used, weights), record["widths"], plan.budget.criterion, seconds)
    return Allocation(bits={DEFAULT_KEY: default, **widths}, widths=widths,
                      sensitivity={layer.name: dict(zip(layer.widths, c)) for layer, c in zip(plan.layers, costs)},
                      record=record)


def allocate_bits(model: nn.Module, plan: Plan, calibration: CalibrationData,
                  device: torch.device | str | None = None, batch_size: int = 8) -> Allocation:
    """Sensitivity pass, then the allocation under ``plan.limit`` (see the module docstring)."""
    start = time.perf_counter()
    sens = measure_sensitivity(model, plan, calibration, device, batch_size)
    return allocation_for(plan, sens, time.perf_counter() - start)


def apply_allocation(chain: Chain, allocation: Allocation) -> None:
    """Set the weight method's ``bits`` to the allocation (validated by its config)."""
    pos = weight_position(chain)
    assert pos is not None
    cfg = chain.configs[pos]
    try:
        setattr(cfg, "bits", dict(allocation.bits))
    except ValidationError as exc:  # candidates were checked before: a plugin validator disagrees
        raise ConfigError(f"{chain.names[pos]} refused the allocated bits map: {exc.errors()[0]['msg']}") from None


def format_budget(record: dict[str, Any]) -> str:
    """One line for ``qcore info``."""
    target = (f"{record['target_bits']} bits per weight" if record.get("target_bits") is not None
              else f"{record.get('target_bytes', 0):,} bytes")
    widths = ", ".join(f"{w}-bit x{n}" for w, n in record.get("widths", {}).items())
    pinned = f", {record['pinned']} pinned" if record.get("pinned") else ""
    return (f"mixed precision: budget {target} -> {record.get('avg_bits')} bits per weight "
            f"({record.get('bytes', 0):,} bytes) over {record.get('layers')} layers: {widths}{pinned} "
            f"({record.get('criterion')} sensitivity, candidates {', '.join(map(str, record.get('candidates', [])))})")
