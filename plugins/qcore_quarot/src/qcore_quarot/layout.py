"""Where the residual stream is read and written: what the rotations touch, from introspection.

R1 rotates the residual stream, so it is exact only when every module that writes it (embeddings,
o and down projections, MoE experts' down projections) and every one that reads it (the norms
feeding q/k/v, the MLP and the router, the final norm feeding the LM head) is known and can take
the rotation. :func:`plan_rotation` finds them in a ``ModelInfo`` and raises
:class:`~qcore.plugin.CompatibilityError`, before anything changes, when something else touches
the stream: a norm on a block's output (Gemma 2's sandwich norms), a post-norm model, a linear
outside the blocks, an unknown norm type. R2 sites (v -> o per attention head) that cannot be
rotated exactly (v fused into qkv, a norm on v, an unknown head width) are listed with the reason
and left alone; R2 is an extra, not needed for exactness.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from qcore.plugin import BlockInfo, ModelInfo, ScaleGroup, norm_offset
from qcore.plugin import CompatibilityError

READ_GROUPS: tuple[str, ...] = ("attn_in", "mlp_in", "expert_in")
"""Scale-group roles whose linears read a norm of the residual stream."""
MLP_WRITE_ROLES: tuple[str, ...] = ("down", "fc2")
"""Roles of an MLP's (or MoE expert's) output projection: R4 runs before each."""
WRITE_ROLES: tuple[str, ...] = ("o", *MLP_WRITE_ROLES)
"""Linear roles (MoE experts' included) whose outputs are added to the residual stream."""
EXPERT_PREFIX = "expert."


@dataclass
class NormSite:
    """A norm of the residual stream and the linears reading its output (full names)."""

    name: str
    readers: list[str]
    offset: float
    layer_norm: bool
    """An ``nn.LayerNorm`` (subtracts the mean): replaced by an RMSNorm on a zero-mean stream."""


@dataclass
class HeadSite:
    """An attention whose v output rows and o input columns get R2, per head of ``head_dim``."""

    v: str
    o: str
    head_dim: int


@dataclass
class RotationPlan:
    """Everything R1 and R2 change, by full module name."""

    width: int
    embeddings: list[str]
    norms: list[NormSite]
    writers: list[str]
    lm_head: str | None
    tied: bool
    readers: list[str] = field(default_factory=list)
    """Every linear reading the residual stream (through a norm or, without a final norm, the LM head)."""
    heads: list[HeadSite] = field(default_factory=list)
    skipped_heads: list[tuple[str, str]] = field(default_factory=list)
    """(o's full name, why R2 is not applied there)."""

    @property
    def layer_norm(self) -> bool:
        return any(site.layer_norm for site in self.norms)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def norm_problem(module: nn.Module) -> str | None:
    """Why a rotation cannot pass through this norm once its weight is folded, or None."""
    if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
        return None
    return f"{type(module).__name__} is neither an RMSNorm nor a torch LayerNorm"


def norm_width(module: nn.Module) -> int | None:
    """The number of channels a norm normalizes (None when it does not say)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[-1])
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def _float_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.is_floating_point()


def has_bias(module: nn.Module) -> bool:
    """Whether the module has a bias that is not all zeros."""
    bias = getattr(module, "bias", None)
    return isinstance(bias, Tensor) and bool(bias.detach().abs().max() > 0)


def head_dim(group: ScaleGroup | None, config: Any) -> int:
    """The head width of an attention's v -> o group (the group's, else the config's), 0 if unknown."""
    if group is not None and group.head_dim:
        return group.head_dim
    width = getattr(config, "head_dim", None)
    if isinstance(width, int) and width > 0:
        return width
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return 0


def _norm_site(model: nn.Module, name: str, readers: list[str], offset: float,
               problems: list[str]) -> NormSite:
    norm = model.get_submodule(name)
    why = norm_problem(norm)
    if why:
        problems.append(f"{name}: {why}")
    if has_bias(norm):
        problems += [f"{r} reads the biased norm {name} but has no bias to absorb it"
                     for r in readers if getattr(model.get_submodule(r), "bias", None) is None
                     and not isinstance(model.get_submodule(r), nn.Linear)]
    return NormSite(name, readers, offset, isinstance(norm, nn.LayerNorm))


def _full(block: BlockInfo, rel: str) -> str:
    return f"{block.name}.{rel}"


def _read_sites(model: nn.Module, block: BlockInfo, plan: RotationPlan, problems: list[str]) -> set[str]:
    """Add the block's norms (with their readers) to ``plan``; returns the norms' relative names."""
    prevs: set[str] = set()
    for group in block.scale_groups:
        if group.role not in READ_GROUPS:
            continue
        if group.prev_kind != "norm" or group.prev is None:
            problems.append(f"{block.name}: {', '.join(group.linears)} read the residual stream through no known "
                            f"norm ({group.reason or 'none found'})")
            continue
        prevs.add(group.prev)
        plan.norms.append(_norm_site(model, _full(block, group.prev), [_full(block, n) for n in group.linears],
                                     group.norm_offset, problems))
    return prevs


def _writers(block: BlockInfo, width: int, plan: RotationPlan, problems: list[str]) -> None:
    """Add the block's writers to ``plan``; every linear must be a float reader or writer of width ``width``."""
    readers = {n for g in block.scale_groups if g.role in READ_GROUPS and g.prev_kind == "norm" for n in g.linears}
    for rel, info in block.linears.items():
        name = _full(block, rel)
        if not _float_weight(block.module.get_submodule(rel)):
            problems.append(f"{name} has no float weight (already quantized?): rotate the float model")
        elif rel in readers:
            if info.in_features != width:
                problems.append(f"{name} reads {info.in_features} channels, not the residual width {width}")
        elif info.role.removeprefix(EXPERT_PREFIX) not in WRITE_ROLES:
            problems.append(f"{name} (role {info.role}) neither reads a norm of the residual stream nor writes it")
        elif info.out_features != width:
            problems.append(f"{name} writes {info.out_features} channels, not the residual width {width}")
        else:
            plan.writers.append(name)


def _stray_norms(block: BlockInfo, prevs: set[str], width: int, problems: list[str]) -> None:
    """Residual-width norms that feed no input group (norms on a block's outputs) break R1."""
    for rel, module in block.module.named_modules():
        if rel and rel not in prevs and is_norm(module) and norm_width(module) == width:
            problems.append(f"{_full(block, rel)} normalizes a residual-width tensor but feeds no q/k/v or MLP "
                            "input (a norm on a block output, e.g. a sandwich norm): a rotation cannot pass "
                            "through its weight")


def _head_site(block: BlockInfo, group: ScaleGroup, config: Any, plan: RotationPlan) -> None:
    o = _full(block, group.linears[0])
    v_info = block.linears.get(group.prev or "")
    width = head_dim(group, config)
    if not group.scalable or v_info is None or v_info.role != "v":
        plan.skipped_heads.append((o, group.reason or "no v projection feeds it"))
    elif not width or v_info.out_features % width or block.linears[group.linears[0]].in_features % width:
        plan.skipped_heads.append((o, "the head width is unknown or does not divide v and o"))
    else:
        plan.heads.append(HeadSite(_full(block, v_info.name), o, width))


def _outside_blocks(model: nn.Module, info: ModelInfo, width: int, plan: RotationPlan,
                    problems: list[str]) -> None:
    """Embeddings, the final norm and the LM head; anything else outside the blocks is refused."""
    inside = info.blocks_path + "."
    for name, module in model.named_modules():
        if name == info.blocks_path or name.startswith(inside):
            continue
        if isinstance(module, nn.Embedding):
            if module.embedding_dim != width:
                problems.append(f"embedding {name} has width {module.embedding_dim}, not {width}")
            plan.embeddings.append(name)
        elif is_norm(module) and name != info.final_norm:
            problems.append(f"norm {name} outside the blocks is not the final norm")
        elif isinstance(module, nn.Linear) and name != info.lm_head:
            problems.append(f"linear {name} outside the blocks touches the residual stream")
    if info.lm_head is not None:
        head = model.get_submodule(info.lm_head)
        if not _float_weight(head) or head.weight.shape[-1] != width:
            problems.append(f"{info.lm_head} does not read the {width} residual channels with a float weight")
    if info.final_norm is not None:
        readers = [info.lm_head] if info.lm_head else []
        plan.norms.append(_norm_site(model, info.final_norm, readers,
                                     norm_offset(model.get_submodule(info.final_norm)), problems))


def plan_rotation(model: nn.Module, info: ModelInfo) -> RotationPlan:
    """What R1 and R2 change in ``model``; raises ``CompatibilityError`` listing every problem."""
    if info.post_norm or not info.is_decoder:
        raise CompatibilityError(
            f"quarot needs a pre-norm decoder; {info.family} is "
            f"{'post-norm (a norm output is the residual stream itself)' if info.post_norm else 'not a decoder'}")
    embed = model.get_submodule(info.embed)
    width = int(embed.weight.shape[-1])
    head = model.get_submodule(info.lm_head) if info.lm_head else None
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    plan = RotationPlan(width, [], [], [], info.lm_head, tied)
    problems: list[str] = []
    config = getattr(model, "config", None)
    for block in info.blocks:
        prevs = _read_sites(model, block, plan, problems)
        _writers(block, width, plan, problems)
        _stray_norms(block, prevs, width, problems)
        for group in block.group("attn_out"):
            _head_site(block, group, config, plan)
    _outside_blocks(model, info, width, plan, problems)
    plan.readers = list(dict.fromkeys([r for site in plan.norms for r in site.readers]
                                      + ([info.lm_head] if info.lm_head else [])))
    if problems:
        shown = "; ".join(dict.fromkeys(problems[:6]))
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise CompatibilityError(f"quarot cannot rotate this {info.family} exactly: {shown}{more}")
    return plan
