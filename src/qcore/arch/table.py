"""The architecture data table used by :mod:`qcore.arch.introspect` (no torch import).

Introspection is generic: it walks the module tree. This table only names things the tree
cannot say by itself: which leaf names mean which role, which norm feeds which group of linears,
which architectures are post-norm, which norms use the ``(1 + weight)`` parameterization.
Patterns are ``fnmatch`` patterns. Add a row here to support a new naming scheme; never add a
class per architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- roles -------------------------------------------------------------------------------------
ROLES: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1", "fc2",
                          "router", "other")
"""Roles of a block's linears. MoE experts' linears get the prefix ``expert.`` (``expert.gate``)."""

EXPERT_PREFIX = "expert."

PATH_ROLES: tuple[tuple[str, str], ...] = (
    # (pattern on the name relative to the block, role); first match wins, checked before LEAF_ROLES.
    ("*attn.c_proj", "o"),            # GPT-2
    ("*mlp.c_proj", "fc2"),           # GPT-2
    ("attention.output.dense", "o"),  # BERT family (post-norm)
    ("intermediate.dense", "fc1"),    # BERT family
    ("output.dense", "fc2"),          # BERT family
    ("*self_attention.dense", "o"),   # BLOOM / Falcon style
    ("*attention.dense", "o"),
    ("*shared_expert_gate", "router"),  # Qwen2-MoE: sigmoid gate of the shared expert (kept float)
)

LEAF_ROLES: dict[str, str] = {
    # attention
    "q_proj": "q", "query": "q", "wq": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "W_pack": "qkv",
    "o_proj": "o", "out_proj": "o", "wo": "o", "dense": "o",
    # gated MLP
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "w2": "down",
    # plain MLP
    "fc1": "fc1", "c_fc": "fc1", "fc_in": "fc1", "dense_h_to_4h": "fc1",
    "fc2": "fc2", "fc_out": "fc2", "dense_4h_to_h": "fc2",
}
"""Routers are not found by leaf name but as the ``ROUTER_NAMES`` sibling of an experts module."""

STAGE_OF_ROLE: dict[str, int] = {
    # true-sequential order: inputs of a later stage depend on the outputs of an earlier one.
    "q": 0, "k": 0, "v": 0, "qkv": 0,
    "o": 1,
    "gate": 2, "up": 2, "gate_up": 2, "fc1": 2,
    "down": 3, "fc2": 3,
}
"""Linears with an unknown role (``other``) run after these, each in its own stage."""

NOT_QUANTIZED_ROLES: frozenset[str] = frozenset({"router"})
"""Roles kept in float by every method (a quantized router changes which experts run)."""

# --- MoE ---------------------------------------------------------------------------------------
EXPERTS_CONTAINER_NAMES: tuple[str, ...] = ("experts",)
ROUTER_NAMES: tuple[str, ...] = ("gate", "router")
SHARED_EXPERT_NAMES: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_EXPERT_GATE_NAMES: tuple[str, ...] = ("shared_expert_gate",)
FUSED_EXPERT_GATE_UP = "gate_up_proj"
FUSED_EXPERT_UP = "up_proj"
FUSED_EXPERT_DOWN = "down_proj"
MOE_TOP_K_ATTRS: tuple[str, ...] = ("top_k", "num_experts_per_tok")
ATTN_VALUE_NORM_NAMES: tuple[str, ...] = ("v_norm",)
"""A norm on v between v and o makes the v -> o fold inexact."""

# --- norms -------------------------------------------------------------------------------------
NORM_CLASS_PATTERNS: tuple[str, ...] = ("*LayerNorm", "*RMSNorm", "*Norm", "LayerNorm*", "RMSNorm*")
"""A module whose class name matches one of these (and that has a weight) is a norm."""

ATTN_IN_NORMS: tuple[str, ...] = (
    "input_layernorm", "ln_1", "self_attn_layer_norm", "attention_norm", "ln_attn", "norm1",
    "attn_norm", "pre_attention_layernorm",
)
"""Names (relative to the block, in preference order) of the pre-norm feeding q/k/v."""

MLP_IN_NORMS: tuple[str, ...] = (
    "pre_feedforward_layernorm",   # Gemma 2/3: post_attention_layernorm is a sandwich norm there
    "post_attention_layernorm", "ln_2", "final_layer_norm", "ffn_norm", "norm2", "ln_mlp",
    "pre_mlp_layernorm",
)
"""Names (in preference order) of the pre-norm feeding the MLP's input linears."""

SANDWICH_NORMS: tuple[tuple[str, str], ...] = (
    # (marker, name): when the block has ``marker`` (a norm on the MLP's output), ``name`` is the
    # matching norm on the attention's output, not the MLP's input (OLMo 2 has no pre-norms).
    ("post_feedforward_layernorm", "post_attention_layernorm"),
)
"""Norms with unknown names are never guessed: their groups are reported as not scalable."""

FINAL_NORM_NAMES: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f",
                                     "final_layernorm")

NORM_OFFSET_CLASSES: tuple[tuple[str, float], ...] = (
    # (class-name pattern, offset): the norm computes x_hat * (offset + weight).
    ("Gemma*RMSNorm", 1.0),
    ("Qwen3NextRMSNorm", 1.0),
)

# --- post-norm architectures -------------------------------------------------------------------
POST_NORM_MODEL_TYPES: frozenset[str] = frozenset({
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "ernie", "mpnet",
})
POST_NORM_CONFIG_FLAGS: tuple[tuple[str, object], ...] = (
    # (config attribute, value meaning post-norm)
    ("do_layer_norm_before", False),   # OPT-350m
)

# --- activations between fc1 and fc2 ----------------------------------------------------------
ACT_CONFIG_ATTRS: tuple[str, ...] = ("hidden_act", "activation_function", "hidden_activation")
POSITIVE_HOMOGENEOUS_ACTS: frozenset[str] = frozenset({"relu", "identity", "linear"})
"""act(x / s) * s == act(x) for s > 0: fc1 -> fc2 scaling is exact only through these."""

# --- attention geometry (for tying v -> o scales under grouped-query attention) ----------------
HEAD_DIM_ATTRS: tuple[str, ...] = ("head_dim",)
N_HEADS_ATTRS: tuple[str, ...] = ("num_attention_heads", "n_head", "num_heads")
HIDDEN_ATTRS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model")
"""Config fields read, in order, for the head width (``head_dim``, else hidden / heads)."""

# --- model-level parts -------------------------------------------------------------------------
BLOCK_PATH_OVERRIDES: dict[str, str] = {}
"""model_type -> path of the block ModuleList, for models where the largest list is wrong."""

ENCODER_MODEL_TYPES: frozenset[str] = POST_NORM_MODEL_TYPES
"""Families that are encoders even when no attention module exposes ``is_causal``."""

# --- families shown in the compatibility matrix ----------------------------------------------


@dataclass(frozen=True)
class Family:
    """One architecture family of the compatibility matrix."""

    model_type: str
    display: str
    notes: str


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama", "pre-norm RMSNorm, GQA, gated MLP"),
    Family("mistral", "Mistral", "as Llama (sliding-window attention)"),
    Family("qwen2", "Qwen2", "as Llama, q/k/v with bias"),
    Family("qwen3", "Qwen3", "as Llama plus per-head q_norm/k_norm after q/k (norm -> qkv scaling still exact)"),
    Family("qwen3_moe", "Qwen3-MoE", "fused experts unfused into per-expert Linears; router kept in float"),
    Family("phi3", "Phi-3", "fused qkv_proj and gate_up_proj (v -> o and up -> down not foldable)"),
    Family("gemma2", "Gemma 2", "RMSNorm computes x * (1 + weight): folds use norm_offset 1.0; sandwich norms"),
    Family("gpt2", "GPT-2", "Conv1D converted to Linear; fused c_attn; GELU between fc1 and fc2"),
    Family("opt", "OPT", "pre-norm LayerNorm (post-norm when do_layer_norm_before=False), ReLU MLP"),
    Family("bert", "BERT (encoder)", "post-norm: only v -> o is foldable; not a decoder"),
)

KNOWN_SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    # (model, distinct in_features of its quantizable linears): for the group-size table of the docs
    ("stories260K", (64, 172)),
    ("SmolLM2-135M", (576, 1536)),
    ("Llama-2-7B", (4096, 11008)),
    ("Llama-3-8B", (4096, 14336)),
    ("Qwen2.5-0.5B", (896, 4864)),
)
