"""QuaRot glue to the qcore engine.

``prepare`` (whole model, before calibration inputs are captured; refused before any change by
:func:`qcore_quarot.layout.plan_rotation` when it cannot be exact):

1. a LayerNorm model's residual stream is made zero-mean (every writer centred) so that its
   LayerNorms can become :class:`~qcore_quarot.modules.QuaRotRMSNorm`;
2. every norm's weight (and bias) is folded into the linears reading it, the norm left as a plain
   ``x / rms(x)``; a tied LM head is untied when the folds make it differ from the embedding;
3. R1, the random Hadamard ``H D`` of the residual width, is fused into the embeddings, every
   reader (q/k/v, gate/up, routers, LM head) and every writer (o, down, experts' down);
4. R2, a Hadamard of the head width, into v's output rows and o's input columns, per head.

``process_block`` (per block, before any forward of it):

5. R4: each down projection's weight absorbs a Hadamard of its input width, and the same
   transform runs online on its input (:class:`~qcore_quarot.modules.OnlineHadamard`, saved with
   the checkpoint);
6. with ``quantize``: per-token activation quantization on every quantizable linear when
   ``a_bits`` < 16, then the weights: left in float for a later weight method of the chain
   (``["quarot", "gptq"]``), else RTN at ``w_bits``.

Fusions are computed in float64 and stored in each parameter's dtype.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.plugin import BaseQuantizer, BlockContext, RunContext
from qcore.plugin import get_logger
from qcore.plugin import ActQuant, quantize_rtn
from qcore.plugin import TransformedLinear
from qcore_quarot.hadamard import describe, hadamard_block, random_signs
from qcore_quarot.layout import (
    EXPERT_PREFIX,
    MLP_WRITE_ROLES,
    NormSite,
    RotationPlan,
    has_bias,
    norm_width,
    plan_rotation,
)
from qcore_quarot.modules import OnlineHadamard, QuaRotRMSNorm
from qcore_quarot.rotate import (
    Rotation,
    center_outputs,
    center_rows,
    fold_norm,
    hadamard_rotation,
    per_head,
    rotate_inputs,
    rotate_outputs,
)

if TYPE_CHECKING:
    from qcore_quarot.config import QuaRotConfig

log = get_logger("qcore.quarot")


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double()


def _store(param: Tensor, value: Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device)


def _with_bias(model: nn.Module, name: str) -> nn.Module:
    """The linear ``name``, given a zero bias if it had none (a ``TransformedLinear``, which a
    checkpoint rebuilds with its bias)."""
    linear = model.get_submodule(name)
    if linear.bias is not None:
        return linear
    new = TransformedLinear.wrap(linear)
    new.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))
    model.set_submodule(name, new)
    return new


def _fold_site(model: nn.Module, site: NormSite) -> None:
    """Fold a norm's weight and bias into its readers; the norm becomes ``x / rms(x)``."""
    norm = model.get_submodule(site.name)
    weight = _f64(getattr(norm, "weight", None))
    bias = _f64(norm.bias) if has_bias(norm) else None
    for name in site.readers:
        linear = model.get_submodule(name)
        w, b = fold_norm(_f64(linear.weight), _f64(getattr(linear, "bias", None)), weight, bias, site.offset)
        if b is not None:
            linear = _with_bias(model, name)
            _store(linear.bias, b)
        _store(linear.weight, w)
    if site.layer_norm:
        ref = norm.weight if norm.weight is not None else torch.empty(0)
        model.set_submodule(site.name, QuaRotRMSNorm(int(norm_width(norm)), norm.eps, ref.device, ref.dtype))
    else:
        norm.weight.data.fill_(1.0 - site.offset)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.zero_()


def _rotate_stream(model: nn.Module, plan: RotationPlan, rot: Rotation) -> None:
    """R1 (with a LayerNorm model's centring): embeddings, readers and writers."""
    for name in plan.embeddings:
        table = model.get_submodule(name).weight
        e = _f64(table)
        _store(table, rot(center_rows(e) if plan.layer_norm else e))
    for name in plan.writers:
        linear = model.get_submodule(name)
        w, b = _f64(linear.weight), _f64(linear.bias)
        if plan.layer_norm:
            w, b = center_outputs(w, b)
        w, b = rotate_outputs(w, b, rot)
        _store(linear.weight, w)
        if b is not None:
            _store(linear.bias, b)
    for name in plan.readers:
        linear = model.get_submodule(name)
        _store(linear.weight, rotate_inputs(_f64(linear.weight), rot))


def _rotate_heads(model: nn.Module, plan: RotationPlan, seed: int) -> None:
    """R2: a Hadamard of the head width on each head of v's outputs and of o's inputs."""
    for site in plan.heads:
        rot = per_head(hadamard_rotation(hadamard_block(site.head_dim, seed)[0]), site.head_dim)
        v, o = model.get_submodule(site.v), model.get_submodule(site.o)
        w, b = rotate_outputs(_f64(v.weight), _f64(v.bias), rot)
        _store(v.weight, w)
        if b is not None:
            _store(v.bias, b)
        _store(o.weight, rotate_inputs(_f64(o.weight), rot))


def _untie(model: nn.Module, plan: RotationPlan) -> None:
    """Give a tied LM head its own copy of the embedding (re-tied later when still equal)."""
    head = model.get_submodule(plan.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)


def _retie(model: nn.Module, plan: RotationPlan, embed: str) -> bool:
    """Tie the LM head to the embedding again when their rotated weights are equal; else record
    the untying in the config. Returns whether the head stays untied."""
    head, table = model.get_submodule(plan.lm_head), model.get_submodule(embed)
    if torch.equal(head.weight, table.weight) and getattr(head, "bias", None) is None:
        head.weight = table.weight
        return False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    log.info("quarot: %s untied from %s (the final norm folded into it differs from the embedding)",
             plan.lm_head, embed)
    return True


def rotate_model(model: nn.Module, plan: RotationPlan, embed: str, seed: int) -> bool:
    """Steps 1-4 of the module docstring; returns whether a tied LM head had to be untied."""
    if plan.tied:
        _untie(model, plan)
    if plan.layer_norm:
        log.info("quarot: centring the residual stream; %d LayerNorms become RMSNorms",
                 sum(s.layer_norm for s in plan.norms))
    with torch.no_grad():
        for site in plan.norms:
            _fold_site(model, site)
        r1 = hadamard_rotation(hadamard_block(plan.width, seed)[0], random_signs(plan.width, seed))
        _rotate_stream(model, plan, r1)
        _rotate_heads(model, plan, seed)
    for why in dict.fromkeys(why for _, why in plan.skipped_heads):
        log.info("quarot: no R2 where %s", why)
    return _retie(model, plan, embed) if plan.tied else False


class QuaRotQuantizer(BaseQuantizer):
    config: QuaRotConfig

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.seconds = 0.0
        self.sizes: dict[int, str] = {}
        self.summary: dict[str, Any] = {}
        self.online = 0
        self.blocks: dict[tuple[int, str], tuple[Tensor, str]] = {}
        self.weights_quantized = False

    def prepare(self, run: RunContext) -> None:
        if not self.config.rotate:
            return
        start = time.perf_counter()
        seed = self.config.rotation_seed
        plan = plan_rotation(run.model, run.info)
        untied = rotate_model(run.model, plan, run.info.embed, seed)
        self.sizes[plan.width] = describe(plan.width, seed)
        self.sizes.update({s.head_dim: describe(s.head_dim, seed) for s in plan.heads})
        self.summary = {
            "width": plan.width, "lm_head_untied": untied,
            "layernorms_replaced": sum(s.layer_norm for s in plan.norms),
            "r2_heads": len(plan.heads), "r2_skipped": dict(Counter(why for _, why in plan.skipped_heads)),
        }
        self.seconds += time.perf_counter() - start

    def process_block(self, block: BlockContext) -> None:
        start = time.perf_counter()
        if self.config.rotate:
            self._online_hadamards(block)
        if self.config.quantize:
            self._quantize(block)
        self.seconds += time.perf_counter() - start

    def _online_hadamards(self, block: BlockContext) -> None:
        """R4 on every down projection (MoE experts' included)."""
        for name, info in block.info.linears.items():
            if info.role.removeprefix(EXPERT_PREFIX) not in MLP_WRITE_ROLES:
                continue
            linear = block.linear(name)
            shared, kind = self._block(info.in_features, linear.weight.device)
            with torch.no_grad():
                _store(linear.weight, rotate_inputs(_f64(linear.weight), hadamard_rotation(shared.double())))
            block.set_input_transform(name, OnlineHadamard.of(info.in_features, shared, kind))
            self.online += 1

    def _block(self, size: int, device: torch.device) -> tuple[Tensor, str]:
        """The float32 block of R4's transform of ``size``: one tensor per size and device, shared."""
        key = (size, str(device))
        if key not in self.blocks:
            block, kind = hadamard_block(size, self.config.rotation_seed)
            self.blocks[key] = (block.to(device=device, dtype=torch.float32), kind)
            self.sizes[size] = describe(size, self.config.rotation_seed)
        return self.blocks[key]

    def _quantize(self, block: BlockContext) -> None:
        cfg = self.config
        names = block.quantizable(cfg)
        if cfg.a_bits < 16:
            for name in names:
                block.request_activation_quant(name, ActQuant(cfg.a_bits, dynamic=True, sym=cfg.a_sym))
        if block.leave_weights_to_later():
            return
        self.weights_quantized = True
        for name in names:
            weight = block.linear(name).weight.detach().float()
            block.quantize_linear(name, quantize_rtn(weight, cfg.w_bits, cfg.group_size, cfg.w_sym))

    def record(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3), "rotated": self.config.rotate,
            "hadamard": {str(n): kind for n, kind in sorted(self.sizes.items())},
            **self.summary, "r4_online": self.online, "weights_quantized": self.weights_quantized,
        }
