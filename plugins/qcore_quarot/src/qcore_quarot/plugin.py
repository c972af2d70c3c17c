"""Registers the ``quarot`` method and its module serializers (no torch import)."""
from __future__ import annotations

from typing import Any, Callable

from qcore.plugin import Capabilities, MethodSpec, hookimpl
from qcore_quarot.config import A_BITS, W_BITS, QuaRotConfig

QCORE_API = ">=1,<2"
"""The qcore.plugin contract versions this plugin is written against."""

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gpt2", "opt")
"""Families rotated exactly (checked on tiny models of each). Gemma 2 is not: its sandwich norms
normalize the attention and MLP outputs, and a rotation cannot pass through their weights; BERT
is post-norm."""

FOLLOWERS: tuple[str, ...] = ("gptq", "rtn", "hqq", "awq", "adaround", "brecq")
"""Weight methods that may follow quarot. AWQ folds its scales into the (folded, rotated) norms and
v -> o exactly; up -> down is skipped there, since R4's online Hadamard sits between them (set in
``prepare``, so the engine's inspection marks that group unscalable)."""

SPEC = MethodSpec(
    name="quarot",
    summary="QuaRot: exact Hadamard rotations (R1 residual, R2 per head, R4 online before down) then W/A quantization",
    config_cls=QuaRotConfig,
    quantizer="qcore_quarot.quantizer:QuaRotQuantizer",
    capabilities=Capabilities(
        kind="transform",
        weight_bits=W_BITS,
        activation_bits=A_BITS,
        composes_with=FOLLOWERS,
        architectures=ARCHITECTURES,
        group_sizes=(-1, 32, 64, 128),
        chain_options=(("w_bits", "bits"),),
        notes=(
            "R1 (random Hadamard) is fused into the embeddings and every linear reading or writing the residual "
            "stream, norms folded; R2 (per head, v -> o) where v is not fused; R4 runs online before every down "
            "projection and is saved with the checkpoint",
            "LayerNorm models (GPT-2, OPT): the residual stream is kept zero-mean and each LayerNorm becomes an "
            "RMSNorm; a tied LM head is untied when the folded final norm makes it differ from the embedding",
            "a_bits < 16 quantizes every quantizable linear's input per token (fake-quantized below 8 bits); "
            "followed by a weight method (e.g. gptq) the rotated float weights are left for it",
            "R3 (online Hadamard on queries and keys after RoPE) and kv_bits < 16 (keys and values fake-quantized "
            "per token and head, asymmetric) run through transformers' attention interface: a module attached "
            "to each attention module, saved with the checkpoint",
        ),
    ),
)


@hookimpl
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(SPEC)


@hookimpl
def qcore_register_serializers(register: Callable[[Any], None]) -> None:
    from qcore_quarot.modules import OnlineHadamardSerializer, QKVTransformSerializer, QuaRotRMSNormSerializer

    register(OnlineHadamardSerializer())
    register(QKVTransformSerializer())
    register(QuaRotRMSNormSerializer())
