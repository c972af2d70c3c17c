"""Tiny random models built from configs (no download), for tests of every architecture family.

Every shape that a linear reads (hidden 64, MLP 128, expert MLP 64) is a multiple of 32, so
group sizes 32 and 64 work everywhere. Models are float32, seeded and in eval mode.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qcore.plugin.errors import ArchitectureError

TINY_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "gemma2", "gpt2", "opt", "bert",
)

_COMMON: dict[str, Any] = {"vocab_size": 128, "max_position_embeddings": 128}
_LLAMA_LIKE: dict[str, Any] = {
    **_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE),
    "qwen3_moe": {**_LLAMA_LIKE, "moe_intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True},
    "mistral": {**_LLAMA_LIKE, "sliding_window": 64},
    "phi3": {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}
    | {"original_max_position_embeddings": 128},
    "gemma2": {**_LLAMA_LIKE, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gpt2": {"vocab_size": 128, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "bos_token_id": 1, "eos_token_id": 2},
    "opt": {**_COMMON, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "word_embed_proj_dim": 64, "pad_token_id": 1,
            "bos_token_id": 2, "eos_token_id": 2, "enable_bias": True},
    "bert": {**_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "pad_token_id": 0, "type_vocab_size": 2},
}
"""Config keyword arguments of each tiny family (``transformers.AutoConfig.for_model``)."""

ENCODER_FAMILIES: frozenset[str] = frozenset({"bert"})


def tiny_config(family: str, **overrides: Any):  # noqa: ANN201 - a transformers PretrainedConfig
    """The config of :func:`tiny_model` (``overrides`` replace config fields)."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ArchitectureError(
            f"no tiny model for family '{family}'; available: {', '.join(TINY_FAMILIES)}"
        )
    return AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random ``PreTrainedModel`` of ``family`` (float32, eval mode, seeded).

    Decoders are ``AutoModelForCausalLM``; ``bert`` is ``BertForMaskedLM`` (set
    ``head=False`` for the bare ``BertModel``).
    """
    import transformers

    head = overrides.pop("head", True)
    config = tiny_config(family, **overrides)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if family in ENCODER_FAMILIES:
            cls = transformers.AutoModelForMaskedLM if head else transformers.AutoModel
        else:
            cls = transformers.AutoModelForCausalLM
        model = cls.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    return model.eval()


def tiny_inputs(model: nn.Module, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids for ``model`` (avoids the pad/special ids 0-2)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(3, vocab, (batch, seq_len), generator=gen)
