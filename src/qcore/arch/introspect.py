"""Generic architecture introspection: blocks, linears, roles, scale groups, MoE.

Everything is found by walking the module tree; :mod:`qcore.arch.table` only supplies names
(patterns and overrides). :func:`~qcore.arch.surgery.prepare_model` first rewrites the two layouts that hide linear
layers: GPT-2's ``Conv1D`` (becomes ``nn.Linear``) and transformers 5's fused MoE experts (3D
parameters, become one ``nn.Linear`` per expert and projection). Both rewrites are exact.

Decisions (documented in docs/architecture.md terms):

* Routers (role ``router``: an MoE's top-k gate, Qwen2-MoE's ``shared_expert_gate``) are listed
  in ``BlockInfo.linears`` with ``quantize=False``; they are never in ``sequential``. They do
  appear in scale groups, because folding a scale into the norm that feeds them must rescale
  their columns too.
* ``ScaleGroup.scalable`` is True only when folding ``s`` (the norm or linear ``prev`` divided
  by ``s``, the group's input columns multiplied by ``s``) leaves the block's output exactly
  unchanged; :func:`fold_scales` performs that fold. Not foldable, with a ``reason``:
  v -> o under grouped-query attention when the head width is unknown (o reads each v channel
  once per query head of its kv group; with the head width known the group is scalable with
  ``repeat`` > 1 and its scales must be tied across the repeat, see
  :func:`qcore.arch.fold.tie_channels`), a ``prev`` that is a
  fused projection (qkv, gate_up), fc1 -> fc2 through an activation that is not positively
  homogeneous (GELU), and every norm -> linear group of a post-norm model (the norm's output also
  feeds the residual stream). fc1 -> fc2 through ReLU is exact for positive scales only.
* Norms computing ``x_hat * (1 + weight)`` (Gemma) carry ``norm_offset = 1.0``: fold into
  ``weight' = (1 + weight) / s - 1``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qcore.arch import table as T
from qcore.arch.surgery import UnfusedExperts, is_conv1d, is_fused_experts, prepare_model
from qcore.plugin.errors import ArchitectureError
from qcore.progress import get_logger

log = get_logger("introspect")


# ----------------------------------------------------------------------------------------------
# Result types (the contract of docs/architecture.md)
# ----------------------------------------------------------------------------------------------
@dataclass
class LinearInfo:
    """One linear layer of a block. ``name`` is relative to the block (``self_attn.q_proj``)."""

    name: str
    role: str
    in_features: int
    out_features: int
    expert: int | None = None
    quantize: bool = True
    """False for routers: every method leaves them in float."""


@dataclass
class ScaleGroup:
    """Linears that read the same input, and the module (``prev``) whose output that is."""

    prev: str | None
    prev_kind: Literal["norm", "linear"] | None
    linears: list[str]
    role: str  # attn_in, attn_out, mlp_in, mlp_out, expert_in, expert_out
    scalable: bool
    reason: str = ""
    norm_offset: float = 0.0
    """For a norm ``prev``: it computes ``x_hat * (norm_offset + weight)`` (1.0 for Gemma)."""
    repeat: int = 1
    """> 1 under grouped-query attention (v -> o): the group reads ``prev``'s output with each
    run of ``head_dim`` channels repeated ``repeat`` times in a row (one per query head sharing
    that kv head), so its scales must be equal across the repeat (``qcore.arch.fold.tie_channels``)."""
    head_dim: int = 0
    """Width of one head when ``repeat`` > 1."""


@dataclass
class MoEInfo:
    """A sparse MoE module of a block (names relative to the block)."""

    name: str                 # "mlp"
    router: str               # "mlp.gate"
    experts: list[str]        # ["mlp.experts.0", ...]
    top_k: int | None = None
    shared: list[str] = field(default_factory=list)       # shared (always-on) experts
    shared_gate: str | None = None


@dataclass
class BlockInfo:
    """One decoder (or encoder) block."""

    index: int
    name: str
    module: nn.Module = field(repr=False)
    linears: dict[str, LinearInfo]
    sequential: list[list[str]]
    scale_groups: list[ScaleGroup]
    moe: MoEInfo | None = None

    def quantizable(self) -> list[str]:
        """Names of the linears a method may quantize, in module order (routers excluded)."""
        return [n for n, li in self.linears.items() if li.quantize]

    def group(self, role: str) -> list[ScaleGroup]:
        return [g for g in self.scale_groups if g.role == role]


@dataclass
class ModelInfo:
    """What :func:`inspect_model` found."""

    family: str
    blocks_path: str
    blocks: list[BlockInfo]
    embed: str
    lm_head: str | None
    final_norm: str | None
    is_decoder: bool
    post_norm: bool = False
    norm_offset: float = 0.0

    def quantizable(self) -> list[str]:
        """Full names of every quantizable linear of every block."""
        return [f"{b.name}.{n}" for b in self.blocks for n in b.quantizable()]

    def linear_infos(self) -> list[tuple[str, LinearInfo]]:
        """(full name, info) of every linear of every block, routers included."""
        return [(f"{b.name}.{n}", li) for b in self.blocks for n, li in b.linears.items()]


# ----------------------------------------------------------------------------------------------
# inspect_model
# ----------------------------------------------------------------------------------------------
def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # QuantLinear and other linear replacements: in/out features and a *Linear class name
    return (type(module).__name__.endswith("Linear") and hasattr(module, "in_features")
            and hasattr(module, "out_features"))


def _is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__
    return any(fnmatch.fnmatchcase(cls, p) for p in T.NORM_CLASS_PATTERNS)


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return int(weight.numel())
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def norm_offset(module: nn.Module) -> float:
    """The ``offset`` of a norm computing ``x_hat * (offset + weight)`` (0.0 for most)."""
    cls = type(module).__name__
    for pattern, offset in T.NORM_OFFSET_CLASSES:
        if fnmatch.fnmatchcase(cls, pattern):
            return offset
    return 0.0


def _contains_linear(module: nn.Module) -> bool:
    return any(_is_linear(m) or is_conv1d(m) or is_fused_experts(m) for m in module.modules())


def find_blocks(model: nn.Module, family: str = "") -> tuple[str, nn.ModuleList]:
    """The block list: the longest ``nn.ModuleList`` of same-class blocks holding linears.

    Lists nested inside another candidate (MoE experts) are ignored.
    """
    override = T.BLOCK_PATH_OVERRIDES.get(family)
    if override:
        try:
            blocks = model.get_submodule(override)
        except AttributeError:
            raise ArchitectureError(
                f"qcore.arch.table.BLOCK_PATH_OVERRIDES names '{override}' for '{family}', but "
                f"{type(model).__name__} has no such module; fix the table entry"
            ) from None
        return override, blocks  # type: ignore[return-value]
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0
                and len({type(child) for child in module}) == 1 and _contains_linear(module[0])):
            candidates.append((name, module))
    outer = [(n, m) for n, m in candidates
             if not any(n != o and n.startswith(o + ".") for o, _ in candidates)]
    if not outer:
        raise ArchitectureError(
            f"no block list found in {type(model).__name__} (model_type '{family or '?'}'): qcore "
            "looks for an nn.ModuleList of identical blocks that contain linear layers. Pass a "
            "transformers model, or add its block path to qcore.arch.table.BLOCK_PATH_OVERRIDES"
        )
    best = max(len(m) for _, m in outer)
    return next((n, m) for n, m in outer if len(m) == best)


def _role_of(rel: str, routers: set[str]) -> tuple[str, int | None]:
    """(role, expert index) of the linear at block-relative name ``rel``."""
    if rel in routers:
        return "router", None
    for pattern, role in T.PATH_ROLES:
        if fnmatch.fnmatchcase(rel, pattern):
            return role, None
    parts = rel.split(".")
    leaf = parts[-1]
    role = T.LEAF_ROLES.get(leaf, "other")
    for i in range(len(parts) - 2):
        if parts[i] in T.EXPERTS_CONTAINER_NAMES and parts[i + 1].isdigit():
            return T.EXPERT_PREFIX + role, int(parts[i + 1])
    return role, None


def _find_moe(block: nn.Module) -> tuple[MoEInfo | None, set[str]]:
    """The MoE module of a block (if any) and the names of its routers/shared gates."""
    for name, module in block.named_modules():
        children = dict(module.named_children())
        exp_name = next((c for c in T.EXPERTS_CONTAINER_NAMES if c in children), None)
        if exp_name is None:
            continue
        experts_mod = children[exp_name]
        if not isinstance(experts_mod, nn.ModuleList):
            continue
        experts_list, base = experts_mod, exp_name
        prefix = f"{name}." if name else ""
        router = next((c for c in T.ROUTER_NAMES if c in children
                       and isinstance(getattr(children[c], "weight", None), Tensor)), None)
        if router is None:
            continue
        shared = [f"{prefix}{c}" for c in T.SHARED_EXPERT_NAMES if c in children]
        shared_gate = next((f"{prefix}{c}" for c in T.SHARED_EXPERT_GATE_NAMES if c in children), None)
        router_mod = children[router]
        top_k = next((int(getattr(router_mod, a)) for a in T.MOE_TOP_K_ATTRS
                      if isinstance(getattr(router_mod, a, None), int)), None)
        if top_k is None:
            top_k = next((int(getattr(module, a)) for a in T.MOE_TOP_K_ATTRS
                          if isinstance(getattr(module, a, None), int)), None)
        info = MoEInfo(
            name=name, router=f"{prefix}{router}",
            experts=[f"{prefix}{base}.{i}" for i in range(len(experts_list))],
            top_k=top_k, shared=shared, shared_gate=shared_gate,
        )
        routers = {info.router} | ({shared_gate} if shared_gate else set())
        return info, routers
    return None, set()


def _block_linears(block: nn.Module, routers: set[str]) -> dict[str, LinearInfo]:
    linears: dict[str, LinearInfo] = {}
    for rel, module in block.named_modules():
        if rel in routers:
            weight = module.weight
            linears[rel] = LinearInfo(rel, "router", int(weight.shape[1]), int(weight.shape[0]),
                                      None, quantize=False)
        elif _is_linear(module):
            role, expert = _role_of(rel, routers)
            linears[rel] = LinearInfo(rel, role, int(module.in_features), int(module.out_features),
                                      expert, quantize=role not in T.NOT_QUANTIZED_ROLES)
    return linears


def _sequential(linears: dict[str, LinearInfo]) -> list[list[str]]:
    stages: dict[int, list[str]] = {}
    others: list[list[str]] = []
    for name, li in linears.items():
        if not li.quantize:
            continue
        base = li.role.removeprefix(T.EXPERT_PREFIX)
        if base in T.STAGE_OF_ROLE:
            stages.setdefault(T.STAGE_OF_ROLE[base], []).append(name)
        else:
            others.append([name])
    return [stages[k] for k in sorted(stages)] + others


def _is_post_norm(config: Any, family: str) -> bool:
    if family in T.POST_NORM_MODEL_TYPES:
        return True
    return any(getattr(config, attr, None) is value or getattr(config, attr, object()) == value
               for attr, value in T.POST_NORM_CONFIG_FLAGS if hasattr(config, attr))


def _activation(config: Any) -> str | None:
    for attr in T.ACT_CONFIG_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, str):
            return value.lower()
    return None


def _config_int(config: Any, attrs: tuple[str, ...]) -> int | None:
    for attr in attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _gqa_repeat(v_out: int, o_in: int, config: Any) -> tuple[int, int]:
    """``(repeat, head_dim)`` when o reads each run of ``head_dim`` v channels ``repeat`` times
    in a row (transformers' ``repeat_kv`` layout); ``(0, 0)`` when the config cannot say."""
    head_dim = _config_int(config, T.HEAD_DIM_ATTRS)
    if head_dim is None:
        hidden, heads = _config_int(config, T.HIDDEN_ATTRS), _config_int(config, T.N_HEADS_ATTRS)
        head_dim = hidden // heads if hidden and heads and hidden % heads == 0 else None
    if not head_dim or v_out % head_dim or o_in % v_out or o_in <= v_out:
        return 0, 0
    return o_in // v_out, head_dim


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _pick_norm(norms: dict[str, nn.Module], preferred: tuple[str, ...], width: int,
               exclude: set[str]) -> str | None:
    for cand in preferred:
        if cand in norms and cand not in exclude and _norm_width(norms[cand]) in (width, None):
            return cand
    return None


def _norm_group(norm_name: str | None, norms: dict[str, nn.Module], linears: list[str], role: str,
                post_norm: bool, what: str) -> ScaleGroup:
    if post_norm:
        return ScaleGroup(norm_name, "norm" if norm_name else None, linears, role, False,
                          f"post-norm architecture: the norm output feeding {what} also feeds the "
                          "residual stream, so a scale folded into it changes the block output")
    if norm_name is None:
        return ScaleGroup(None, None, linears, role, False,
                          f"no norm found feeding {what} (add its name to qcore.arch.table)")
    norm = norms[norm_name]
    if not isinstance(getattr(norm, "weight", None), Tensor):
        return ScaleGroup(norm_name, "norm", linears, role, False,
                          f"norm {norm_name} has no weight to fold a scale into")
    return ScaleGroup(norm_name, "norm", linears, role, True, "", norm_offset(norm))


def _pair(prev_roles: tuple[str, ...], target: str, linears: dict[str, LinearInfo]) -> str | None:
    """The linear with a role in ``prev_roles`` that feeds ``target``: a sibling, else the only one."""
    t = linears[target]
    same_expert = [n for n, li in linears.items() if li.role.removeprefix(T.EXPERT_PREFIX) in prev_roles
                   and li.expert == t.expert]
    siblings = [n for n in same_expert if _parent(n) == _parent(target)]
    if len(siblings) == 1:
        return siblings[0]
    return same_expert[0] if len(same_expert) == 1 else None


def _scale_groups(block: nn.Module, linears: dict[str, LinearInfo], moe: MoEInfo | None,
                  config: Any, post_norm: bool) -> list[ScaleGroup]:
    norms = {n: m for n, m in block.named_modules() if n and _is_norm(m)}
    groups: list[ScaleGroup] = []
    plain = {n: li for n, li in linears.items() if li.expert is None}
    by_role: dict[str, list[str]] = {}
    for n, li in plain.items():
        by_role.setdefault(li.role, []).append(n)

    # attention input
    attn_in = by_role.get("q", []) + by_role.get("k", []) + by_role.get("v", []) + by_role.get("qkv", [])
    attn_in = [n for n in plain if n in attn_in]  # module order
    used: set[str] = set()
    if attn_in:
        width = plain[attn_in[0]].in_features
        name = _pick_norm(norms, T.ATTN_IN_NORMS, width, used)
        if post_norm:
            name = None  # the previous block's (or the embeddings') output norm
        if name:
            used.add(name)
        groups.append(_norm_group(name, norms, attn_in, "attn_in", post_norm, "q/k/v"))

    # attention output: v (or fused qkv) -> o
    for o in by_role.get("o", []):
        prev = _pair(("v", "qkv"), o, plain)
        if prev is None:
            groups.append(ScaleGroup(None, None, [o], "attn_out", False,
                                     "could not tell which v projection feeds it"))
            continue
        pv, po = plain[prev], plain[o]
        reason = ""
        if pv.role == "qkv":
            reason = f"v is fused into {prev}: a fold would have to touch only its v rows"
        repeat, head_dim = 1, 0
        if not reason and pv.out_features != po.in_features:
            repeat, head_dim = _gqa_repeat(pv.out_features, po.in_features, config)
            if not repeat:
                reason = (f"grouped-query attention: {o} reads {po.in_features} inputs from {pv.out_features} "
                          "v channels and the config does not give a head width that maps one to the other")
        if not reason and any(n.rpartition(".")[2] in T.ATTN_VALUE_NORM_NAMES for n in norms):
            reason = "a norm on v sits between v and o"
        groups.append(ScaleGroup(prev, "linear", [o], "attn_out", not reason, reason,
                                 repeat=repeat or 1, head_dim=head_dim))

    # MLP / MoE input
    mlp_in = [n for n, li in linears.items()
              if li.role.removeprefix(T.EXPERT_PREFIX) in ("gate", "up", "gate_up", "fc1") or li.role == "router"]
    if mlp_in:
        width = linears[mlp_in[0]].in_features
        if post_norm:
            o_names = by_role.get("o", [])
            name = next((n for n in norms if o_names and _parent(n) == _parent(o_names[0])), None)
        else:
            output_norms = {out for marker, out in T.SANDWICH_NORMS if marker in norms}
            name = _pick_norm(norms, T.MLP_IN_NORMS, width, used | output_norms)
        role = "expert_in" if moe is not None else "mlp_in"
        groups.append(_norm_group(name, norms, mlp_in, role, post_norm, "the MLP"))

    # MLP output: up -> down (gated), gate_up -> down (fused), fc1 -> fc2
    act = _activation(config)
    for n, li in linears.items():
        base = li.role.removeprefix(T.EXPERT_PREFIX)
        if base not in ("down", "fc2"):
            continue
        role = "expert_out" if li.expert is not None else "mlp_out"
        prev = _pair(("up", "gate_up") if base == "down" else ("fc1",), n, linears)
        if prev is None:
            groups.append(ScaleGroup(None, None, [n], role, False, "could not tell which linear feeds it"))
            continue
        prev_role = linears[prev].role.removeprefix(T.EXPERT_PREFIX)
        reason = ""
        container = block.get_submodule(_parent(_parent(n))) if li.expert is not None else None
        if isinstance(container, UnfusedExperts) and container._custom_gate is not None:
            reason = (f"the experts' gating function ({container._custom_gate.__qualname__}) is not "
                      "known to be linear in up")
        elif prev_role == "gate_up":
            reason = f"up is fused into {prev}: a fold would have to touch only its up rows"
        elif prev_role == "fc1" and act not in T.POSITIVE_HOMOGENEOUS_ACTS:
            reason = f"activation '{act}' between {prev} and {n} is not scale-equivariant"
        elif linears[prev].out_features != li.in_features:
            reason = f"{prev} has {linears[prev].out_features} outputs but {n} reads {li.in_features}"
        group = ScaleGroup(prev, "linear", [n], role, not reason, reason)
        if not reason and prev_role == "fc1":
            group.reason = f"exact for positive scales only (activation '{act}')"
        groups.append(group)
    for group in groups:
        _mark_transformed_inputs(block, group)
    return groups


def _mark_transformed_inputs(block: nn.Module, group: ScaleGroup) -> None:
    """A linear carrying an input transform (an online rotation, a run-time scale) reads the
    transformed output of ``prev``: a per-channel fold into ``prev`` would not commute with it."""
    for name in group.linears:
        transform = getattr(block.get_submodule(name), "input_transform", None)
        if transform is not None and group.scalable:
            group.scalable = False
            group.reason = (f"{name} applies an input transform ({type(transform).__name__}) to what "
                            f"{group.prev or 'its producer'} outputs: a folded scale would not commute with it")


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def _final_norm(model: nn.Module, blocks_path: str) -> str | None:
    parent = _parent(blocks_path)
    scopes = [parent, _parent(parent)] if parent else [""]
    for scope in scopes:
        base = model.get_submodule(scope) if scope else model
        children = dict(base.named_children())
        for cand in T.FINAL_NORM_NAMES:
            if cand in children and _is_norm(children[cand]):
                return f"{scope}.{cand}" if scope else cand
    return None


def _is_decoder(block: nn.Module, config: Any, family: str) -> bool:
    flags = [m.is_causal for m in block.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    if getattr(config, "is_decoder", False):
        return True
    return family not in T.ENCODER_MODEL_TYPES


def inspect_model(model: nn.Module) -> ModelInfo:
    """Describe ``model``'s blocks, linears, roles, scale groups and parts (calls prepare_model)."""
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"inspect_model takes a torch.nn.Module, got {type(model).__name__}; load the model "
            "first (transformers.AutoModelForCausalLM.from_pretrained or qcore.models)"
        )
    prepare_model(model)
    config = getattr(model, "config", None)
    family = str(getattr(config, "model_type", "") or "")
    blocks_path, block_list = find_blocks(model, family)
    post_norm = _is_post_norm(config, family)
    blocks: list[BlockInfo] = []
    for i, block in enumerate(block_list):
        moe, routers = _find_moe(block)
        linears = _block_linears(block, routers)
        blocks.append(BlockInfo(
            index=i, name=f"{blocks_path}.{i}", module=block, linears=linears,
            sequential=_sequential(linears),
            scale_groups=_scale_groups(block, linears, moe, config, post_norm), moe=moe,
        ))
    get_in = getattr(model, "get_input_embeddings", None)
    embed = _module_name(model, get_in() if callable(get_in) else None)
    if embed is None:
        embed = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding)), "")
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head_mod = get_out() if callable(get_out) else None
    except (AttributeError, NotImplementedError):
        head_mod = None
    lm_head = _module_name(model, head_mod)
    offsets = [g.norm_offset for b in blocks[:1] for g in b.scale_groups if g.prev_kind == "norm"]
    return ModelInfo(
        family=family or type(model).__name__, blocks_path=blocks_path, blocks=blocks,
        embed=embed, lm_head=lm_head, final_norm=_final_norm(model, blocks_path),
        is_decoder=_is_decoder(block_list[0], config, family), post_norm=post_norm,
        norm_offset=offsets[0] if offsets else 0.0,
    )


# ----------------------------------------------------------------------------------------------
# folding a scale group (the exact transform that ``scalable`` promises)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, scales: Tensor) -> None:
    """Divide ``group.prev``'s output by ``scales`` and multiply the group's input columns by it.

    Exact (the block's output is unchanged up to rounding) when ``group.scalable``; for
    ReLU fc1 -> fc2 groups the scales must be positive. Raises ``ArchitectureError`` otherwise.
    """
    if not group.scalable or group.prev is None:
        raise ArchitectureError(
            f"scale group {group.role} ({', '.join(group.linears)}) cannot be folded exactly: "
            f"{group.reason}; skip this group"
        )
    from qcore.arch.fold import fold_scale_group

    why = fold_scale_group(block, group, scales.detach().to(torch.float32).flatten(), block.get_submodule)
    if why is not None:
        raise ArchitectureError(f"scale group {group.role} ({', '.join(group.linears)}) was not folded: {why}")
