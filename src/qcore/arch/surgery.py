"""Model surgery: rewrite the two layouts that hide linear layers, exactly, in place.

GPT-2's ``Conv1D`` becomes ``nn.Linear``; transformers 5's fused MoE experts (3D parameters)
become one ``nn.Linear`` per expert and projection (:class:`UnfusedExperts`). Introspection
(:func:`qcore.arch.introspect.inspect_model`) and loading call :func:`prepare_model` first.
"""
from __future__ import annotations

import inspect as _pyinspect

import torch
from torch import Tensor, nn

from qcore.arch import table as T
from qcore.plugin.errors import ArchitectureError
from qcore.progress import get_logger

log = get_logger("surgery")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------------------------
def _new_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` [out, in] and ``bias`` (device/dtype kept)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=bias.requires_grad)
    return lin


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (weight [in, out], ``x @ W + b``) as the equivalent ``nn.Linear``."""
    return _new_linear(conv.weight.t(), conv.bias)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``; ``down(act(up(x)))`` when ungated."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear,
                 act_fn: nn.Module) -> None:
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn  # shared by all experts; holds no parameters


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of a transformers 5 fused experts module: a list of :class:`ExpertMLP`.

    Module names are ``experts.<i>.gate_proj`` (the transformers 4 layout). Same ``forward(hidden_states, top_k_index, top_k_weights)`` as the eager reference: each
    expert's linears see exactly the tokens routed to it, outputs are weighted and summed.
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.has_gate = bool(getattr(fused, "has_gate", hasattr(fused, T.FUSED_EXPERT_GATE_UP)))
        self.has_bias = bool(getattr(fused, "has_bias", False))
        self.is_transposed = bool(getattr(fused, "is_transposed", False))
        self.is_concatenated = bool(getattr(fused, "is_concatenated", True))
        # keep the original's plain attributes (num_experts, act_fn, alpha/limit of custom gates)
        for key, value in vars(fused).items():
            if key.startswith("_") or key in ("training",) or isinstance(value, (Tensor, nn.Module)):
                continue
            setattr(self, key, value)
        act_fn = getattr(fused, "act_fn", None) or nn.SiLU()
        self._custom_gate = None
        apply_gate = getattr(type(fused), "_apply_gate", None)
        if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
            self._custom_gate = apply_gate

        w_in = getattr(fused, T.FUSED_EXPERT_GATE_UP if self.has_gate else T.FUSED_EXPERT_UP)
        w_out = getattr(fused, T.FUSED_EXPERT_DOWN)
        b_in = getattr(fused, (T.FUSED_EXPERT_GATE_UP if self.has_gate else T.FUSED_EXPERT_UP) + "_bias", None)
        b_out = getattr(fused, T.FUSED_EXPERT_DOWN + "_bias", None)
        if not self.has_bias:
            b_in = b_out = None
        self.num_experts = int(w_in.shape[0])
        experts = []
        for e in range(self.num_experts):
            wi = w_in[e].t() if self.is_transposed else w_in[e]          # [n_in_out, hidden]
            wo = w_out[e].t() if self.is_transposed else w_out[e]        # [hidden, inter]
            bi = b_in[e] if b_in is not None else None
            if self.has_gate:
                if self.is_concatenated:
                    wg, wu = wi.chunk(2, dim=0)
                    bg, bu = bi.chunk(2, dim=0) if bi is not None else (None, None)
                else:  # interleaved rows: gate0, up0, gate1, up1, ...
                    wg, wu = wi[0::2], wi[1::2]
                    bg, bu = (bi[0::2], bi[1::2]) if bi is not None else (None, None)
                gate = _new_linear(wg, bg)
            else:
                gate, wu, bu = None, wi, bi
            experts.append(ExpertMLP(gate, _new_linear(wu, bu),
                                     _new_linear(wo, b_out[e] if b_out is not None else None), act_fn))
        self.extend(experts)

    @property
    def act_fn(self) -> nn.Module:
        return self[0].act_fn

    def _gated(self, gate: Tensor, up: Tensor) -> Tensor:
        if self._custom_gate is None:
            return self.act_fn(gate) * up
        if self.is_concatenated:
            joined = torch.cat([gate, up], dim=-1)
        else:
            joined = torch.stack([gate, up], dim=-1).flatten(-2)
        return self._custom_gate(self, joined)

    def expert_forward(self, index: int, x: Tensor) -> Tensor:
        expert = self[index]
        if self.has_gate:
            hidden = self._gated(expert.gate_proj(x), expert.up_proj(x))
        else:
            hidden = self.act_fn(expert.up_proj(x))
        return expert.down_proj(hidden)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit:
            e = int(row[0])
            if e == self.num_experts:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            out = self.expert_forward(e, hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3D ``gate_up_proj``/``up_proj`` and ``down_proj`` Parameters."""
    down = module._parameters.get(T.FUSED_EXPERT_DOWN)
    first = module._parameters.get(T.FUSED_EXPERT_GATE_UP, module._parameters.get(T.FUSED_EXPERT_UP))
    return down is not None and first is not None and down.dim() == 3 and first.dim() == 3


def _check_fused_experts(name: str, module: nn.Module) -> None:
    params = list(_pyinspect.signature(type(module).forward).parameters)[1:]
    problems = []
    # transformers' @use_experts_implementation marks the interface (its kernels call positionally)
    declared = hasattr(module, "is_transposed") and hasattr(module, "has_gate")
    named = params[1:3] == ["top_k_index", "top_k_weights"]
    if len(params) < 3 or not (declared or named):
        problems.append(f"forward{tuple(params)} is not (hidden_states, top_k_index, top_k_weights)")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("it applies a post-expert norm")
    if problems:
        raise ArchitectureError(
            f"cannot unfuse the MoE experts {name} ({type(module).__name__}): {'; '.join(problems)}. "
            "qcore unfuses experts with the transformers 5 interface only; convert them to "
            "per-expert nn.Linear modules before quantizing, or open an issue with the model type"
        )


def prepare_model(model: nn.Module) -> nn.Module:
    """Rewrite ``Conv1D`` and fused MoE experts into ``nn.Linear`` modules, in place (exact).

    Idempotent: a prepared model has neither left. Returns ``model``.
    """
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_conv1d(module):
            replacements.append((name, conv1d_to_linear(module)))
        elif not isinstance(module, UnfusedExperts) and is_fused_experts(module):
            _check_fused_experts(name, module)
            replacements.append((name, UnfusedExperts(module)))
    for name, new in replacements:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new.train(parent.training)
        setattr(parent, leaf, new)
    if replacements:
        log.debug("prepare_model: rewrote %d module(s)", len(replacements))
    return model


