"""QuaRot glue to the qcore engine.

``prepare`` (whole model, before calibration inputs are captured; refused before any change by
:func:`qcore_quarot.layout.plan_rotation` when it cannot be exact):

1. a LayerNorm model's residual stream is made zero-mean (every writer centred) so that its
   LayerNorms can become :class:`~qcore_quarot.modules.QuaRotRMSNorm`;
2. every norm's weight (and bias) is folded into the linears reading it, the norm left as a plain
   ``x / rms(x)``; a tied LM head is untied when the folds make it differ from the embedding;
3. R1, the random Hadamard ``H D`` of the residual width, is fused into the embeddings, every
   reader (q/k/v, gate/up, routers, LM head) and every writer (o, down, experts' down);
4. R2, a Hadamard of the head width, into v's output rows and o's input columns, per head
   (``r2``);
5. R4 (``r4``): each down projection's weight absorbs a Hadamard of its input width, and the
   same transform runs online on its input (:class:`~qcore_quarot.modules.OnlineHadamard`, saved
   with the checkpoint); the engine's inspection after ``prepare`` sees it, so a later AWQ
   does not fold a scale through up -> down.

``process_block`` (per block, before any forward of it):

6. R3 and the KV cache: with R3 (``r3``, by default when ``kv_bits`` < 16) or ``kv_bits`` < 16,
   a :class:`~qcore_quarot.modules.QKVTransform` is attached to each attention module
   (``BlockContext.set_attention_transform``): a Hadamard of the head width on queries and keys
   after RoPE, exact since ``(q H)(k H)^T = q k^T``, then keys and values fake-quantized;
7. with ``quantize``: per-token activation quantization on every quantizable linear when
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

from qcore.plugin import BaseQuantizer, BlockContext, CompatibilityError, ConfigError, RunContext
from qcore.plugin import get_logger
from qcore.plugin import ActQuant, quantize_rtn
from qcore.plugin import TransformedLinear
from qcore_quarot.hadamard import describe, hadamard_block, random_signs
from qcore_quarot.layout import (
    EXPERT_PREFIX,
    MLP_WRITE_ROLES,
    head_dim,
    NormSite,
    RotationPlan,
    has_bias,
    norm_width,
    plan_rotation,
)
from qcore_quarot.modules import OnlineHadamard, QKVTransform, QuaRotRMSNorm
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


def rotate_model(model: nn.Module, plan: RotationPlan, embed: str, seed: int, r2: bool = True) -> bool:
    """Steps 1-4 of the module docstring (4 with ``r2``); returns whether a tied LM head had to be untied."""
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
        if r2:
            _rotate_heads(model, plan, seed)
    for why in dict.fromkeys(why for _, why in plan.skipped_heads):
        log.info("quarot: no R2 where %s", why)
    return _retie(model, plan, embed) if plan.tied else False


class QuaRotQuantizer(BaseQuantizer):
    config: QuaRotConfig

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.seconds = 0.0
        self.rotation_seconds = 0.0
        self.sizes: dict[int, str] = {}
        self.summary: dict[str, Any] = {}
        self.online = 0
        self.attention = 0
        self.r4_sizes: set[int] = set()
        self.r3_sizes: set[int] = set()
        self.r2_sizes: set[int] = set()
        self.blocks: dict[tuple[int, str], tuple[Tensor, str]] = {}
        self.weights_quantized = False

    def prepare(self, run: RunContext) -> None:
        if not self.config.rotate:
            return
        start = time.perf_counter()
        seed = self.config.rotation_seed
        plan = plan_rotation(run.model, run.info)
        r2 = self.config.r2
        untied = rotate_model(run.model, plan, run.info.embed, seed, r2)
        self.sizes[plan.width] = describe(plan.width, seed)
        if r2:
            self.sizes.update({s.head_dim: describe(s.head_dim, seed) for s in plan.heads})
            self.r2_sizes = {s.head_dim for s in plan.heads}
        self.summary = {
            "width": plan.width, "lm_head_untied": untied,
            "layernorms_replaced": sum(s.layer_norm for s in plan.norms),
            "r2_heads": len(plan.heads) if r2 else 0,
            "r2_skipped": dict(Counter(why for _, why in plan.skipped_heads)) if r2 else {"r2=False": len(plan.heads)},
        }
        if self.config.r4:
            self._online_hadamards(run)
        self.seconds += time.perf_counter() - start
        self.rotation_seconds += time.perf_counter() - start

    def process_block(self, block: BlockContext) -> None:
        start = time.perf_counter()
        if self.config.use_r3 or (self.config.quantize and self.config.kv_bits < 16):
            self._attention_transforms(block)
            self.rotation_seconds += time.perf_counter() - start
        if self.config.quantize:
            self._quantize(block)
        self.seconds += time.perf_counter() - start

    def _online_hadamards(self, run: RunContext) -> None:
        """R4 on every down projection (MoE experts' included), in ``prepare``: the engine's
        inspection after ``prepare`` then sees the input transforms, so a later method (AWQ) does
        not fold a scale through up -> down."""
        for binfo in run.info.blocks:
            for name, info in binfo.linears.items():
                if info.role.removeprefix(EXPERT_PREFIX) not in MLP_WRITE_ROLES:
                    continue
                linear = binfo.module.get_submodule(name)
                shared, kind = self._block(info.in_features, linear.weight.device)
                with torch.no_grad():
                    _store(linear.weight, rotate_inputs(_f64(linear.weight), hadamard_rotation(shared.double())))
                if not isinstance(linear, TransformedLinear):
                    linear = TransformedLinear.wrap(linear)
                    binfo.module.set_submodule(name, linear)
                elif linear.input_transform is not None:
                    raise ConfigError(f"{binfo.name}.{name} already has an input transform, so R4 cannot run "
                                      "there; set r4=False or quantize the float model")
                linear.input_transform = OnlineHadamard.of(info.in_features, shared, kind)
                self.online += 1
                self.r4_sizes.add(info.in_features)

    def _attention_transforms(self, block: BlockContext) -> None:
        """R3 and KV quantization on every attention module (the parent of each o projection)."""
        cfg = self.config
        kv_bits = cfg.kv_bits if cfg.quantize else 16
        config = getattr(block.run.model, "config", None)
        for name, info in block.info.linears.items():
            if info.role != "o":
                continue
            width = head_dim(next((g for g in block.info.group("attn_out") if g.linears[0] == name), None), config)
            if not width:
                raise CompatibilityError(f"{block.name}.{name}: the head width is unknown, so R3 and the KV-cache "
                                         "quantization cannot be placed; set kv_bits=16 and r3=False")
            if cfg.kv_group_size != -1 and width % cfg.kv_group_size:
                raise ConfigError(f"kv_group_size={cfg.kv_group_size} does not divide the head width {width}; "
                                  "use a divisor of it or -1")
            shared, kind = self._block(width, block.linear(name).weight.device) if cfg.use_r3 else (None, "")
            transform = QKVTransform.of(width, shared, kind, kv_bits, cfg.kv_group_size, cfg.kv_clip)
            block.set_attention_transform(name.rpartition(".")[0], transform)
            self.attention += 1
            if shared is not None:
                self.r3_sizes.add(width)

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
                act = ActQuant(cfg.a_bits, dynamic=True, sym=cfg.a_sym, clip=cfg.act_clip)
                block.request_activation_quant(name, act)
        if block.leave_weights_to_later():
            return
        self.weights_quantized = True
        for name in names:
            weight = block.linear(name).weight.detach().float()
            block.quantize_linear(name, quantize_rtn(weight, cfg.w_bits, cfg.group_size, cfg.w_sym))

    def info_lines(self) -> list[str]:
        """What ``qcore info`` prints for this run: each rotation with its sizes, KV and activations."""
        cfg, summary = self.config, self.summary

        def sizes(values: Any) -> str:
            return ", ".join(f"{n} ({self.sizes.get(n, '?')})" for n in sorted(values)) or "-"

        if not cfg.rotate:
            lines = ["rotations: none (rotate=False)"]
        else:
            lines = [
                f"R1: random Hadamard {sizes([summary.get('width', 0)])} on the residual stream, fused"
                + ("; LM head untied" if summary.get("lm_head_untied") else ""),
                f"R2: Hadamard {sizes(self.r2_sizes)} per head on v -> o, {summary.get('r2_heads', 0)} attentions, fused"
                if summary.get("r2_heads") else "R2: off" + ("" if cfg.r2 else " (r2=False)"),
                f"R4: online Hadamard {sizes(self.r4_sizes)} before {self.online} down projections"
                if self.online else "R4: off" + ("" if cfg.r4 else " (r4=False)"),
                f"R3: online Hadamard {sizes(self.r3_sizes)} on queries and keys after RoPE, "
                f"{self.attention} attentions" if cfg.use_r3 else "R3: off",
            ]
        kv = cfg.kv_bits if cfg.quantize else 16
        group = "whole head" if cfg.kv_group_size == -1 else f"{cfg.kv_group_size} channels"
        lines.append(f"KV cache: {kv}-bit asymmetric per token and head, groups of {group}" if kv < 16
                     else "KV cache: float")
        a = cfg.a_bits if cfg.quantize else 16
        lines.append(f"activations: {a}-bit per token, {'symmetric' if cfg.a_sym else 'asymmetric'}" if a < 16
                     else "activations: float")
        return lines

    def record(self) -> dict[str, Any]:
        return {
            "info": self.info_lines(),
            "seconds": round(self.seconds, 3), "rotation_seconds": round(self.rotation_seconds, 3),
            "rotated": self.config.rotate,
            "hadamard": {str(n): kind for n, kind in sorted(self.sizes.items())},
            **self.summary, "r4_online": self.online, "r3_online": self.attention if self.config.use_r3 else 0,
            "kv_bits": self.config.kv_bits if self.config.quantize else 16, "kv_group_size": self.config.kv_group_size,
            "attention_transforms": self.attention, "weights_quantized": self.weights_quantized,
        }
