"""GGUF (llama.cpp's single-file format): ``qcore.export(model, "model.gguf", format="gguf")``.

What is written (``KIND = "file"``, through the ``gguf`` package's ``GGUFWriter``): the model's
hyperparameters under llama.cpp's keys, its tokenizer (``tokenizer.ggml.*``) when one is given,
and one tensor per weight, named by ``gguf.get_tensor_name_map`` of the architecture.

Quantized linears keep qcore's integer codes exactly, in the 32-column block types whose grid is
qcore's (``d`` and ``m`` are float16, one per block of 32 columns; formulas as in ggml's dequantizers):

* 4-bit with every zero point 8 (symmetric) -> ``Q4_0`` (``x = d * (nibble - 8)``): ``d = scale``,
  nibble = code;
* 4-bit with other integer zero points (asymmetric) -> ``Q4_1`` (``x = d * nibble + m``):
  ``d = scale``, ``m = -scale * zero``, nibble = code;
* 8-bit with every zero point 128 (symmetric) -> ``Q8_0`` (``x = d * int8``): ``d = scale``,
  int8 = code - 128.

Groups of 64, 128 ... (multiples of 32) are re-blocked exactly: each 32-column block inherits its
group's scale and zero point. The only change is float16 rounding of ``d`` and ``m``
(:func:`fp16_rounding` measures it; bfloat16 scales convert exactly, so symmetric 4-bit layers are
unchanged, and ``m`` of Q4_1 rounds once). Everything else is written as float: 1-D tensors
(norms, biases) as F32, 2-D float tensors (embeddings, a float ``lm_head``, linears left in float)
as F32, or F16 / BF16 when the model holds them so. llama's ``q_proj`` / ``k_proj`` rows (weights,
scales, zero points, biases alike) are permuted into llama.cpp's rotary layout, as llama.cpp's own
converter does; Qwen2, Qwen3, Phi-3 and Gemma2 use the NeoX layout that transformers has and need
none. Gemma2's RMSNorm weights are written plus one (llama.cpp multiplies by the weight, Gemma by
one plus it).

Architectures (:data:`ARCHS`, a table of data): llama and mistral (llama.cpp's ``llama``; Llama 3.1's
``llama3`` rope scaling becomes llama.cpp's ``rope_freqs.weight``), qwen2, qwen3, phi3, gemma2;
gemma is refused (transformers' GGUF reader, which checks this writer, does not read it). Also
refused (:func:`check`), each reason naming the fix: other bits, 8-bit asymmetric layers,
per-channel or other group sizes, act-order groups, float zero points, online input transforms,
activation quantization, other rope scaling (yarn, longrope, ...), gemma2 attention settings
llama.cpp does not follow, and tensors llama.cpp has no name for (an untied gemma2 ``lm_head``).

Tokenizers (a transformers fast tokenizer): sentencepiece-style BPE with byte fallback (Llama 2,
Mistral, Phi-3, Gemma) -> ``tokenizer.ggml.model = "llama"`` with the pieces, scores and types of
the ``tokenizer.model`` beside it (scores ``-id`` without one); byte-level BPE (GPT-2, Llama 3,
Qwen) -> ``"gpt2"`` with its merges and ``tokenizer.ggml.pre`` when its split pattern is one
:data:`PRE_TOKENIZERS` names. The vocabulary is padded to the embedding rows with unused
``[PAD{i}]`` tokens; bos / eos / unk / pad ids, add-bos / add-eos and the chat template are kept.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.formats.packed import QCORE_HINT

KIND = "file"
FORMAT = "gguf"
BLOCK = 32
"""Columns per GGUF block of the Q4_0 / Q4_1 / Q8_0 types."""
FP16_MAX = 65504.0
FP16_UNIT = 2.0 ** -11
"""Unit roundoff of float16 (round to nearest): ``|fp16(x) - x| <= FP16_UNIT * |x|`` for normal x."""
FP16_TINY = 2.0 ** -25
"""Largest float16 rounding error of a subnormal value (half its spacing, 2**-24)."""
FIX_GROUP = "quantize with --group-size 32, 64 or 128 (group_size=32/64/128)"
FIX_BITS = "quantize with bits=4 (Q4_0 / Q4_1) or bits=8 --sym (Q8_0)"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` is written (a row of :data:`ARCHS`)."""

    gguf_arch: str
    """Name of the ``gguf.MODEL_ARCH`` member (llama.cpp's architecture)."""
    permute_qk: bool = False
    """llama.cpp rotates pairs of adjacent dimensions: HF q/k rows are permuted into that order."""
    rope_dims: bool = True
    """Write ``rope.dimension_count`` (head size times ``partial_rotary_factor``)."""
    norm_shift: float = 0.0
    """Added to every ``*norm.weight`` (Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp's by
    the weight)."""
    extra: tuple[tuple[str, str, Any], ...] = ()
    """``(GGUFWriter method, config attribute, value when the config has none)`` written besides the
    common hyperparameters; a None value is left out."""
    rope_types: tuple[str, ...] = ("default",)
    """``rope_type`` values written (``llama3``: its per-frequency factors as ``rope_freqs.weight``)."""
    checks: tuple[Callable[[Any], str | None], ...] = ()
    """Config checks: each returns why llama.cpp would run the model differently, or None."""
    refused: str = ""
    """Why the architecture is not written (empty: it is)."""


def gemma2_attention(config: Any) -> str | None:
    """llama.cpp scales gemma2 queries by ``head_dim ** -0.5`` (by ``(hidden / heads) ** -0.5`` for its
    46-layer 27B) and slides the window on even layers; transformers by ``query_pre_attn_scalar``
    and ``layer_types``."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    n_layers = int(config.num_hidden_layers)
    want = config.hidden_size // heads if n_layers == 46 else head_dim
    scalar = getattr(config, "query_pre_attn_scalar", want)
    if scalar != want:
        return (f"query_pre_attn_scalar {scalar}: llama.cpp scales gemma2 queries by {want} ** -0.5 for a "
                f"{n_layers}-layer model; {QCORE_HINT}")
    types = getattr(config, "layer_types", None)
    if types and list(types) != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]:
        return f"layer_types other than sliding/full alternating (llama.cpp's gemma2 pattern); {QCORE_HINT}"
    return None


ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", permute_qk=True, rope_types=("default", "llama3")),
    "mistral": Arch("LLAMA", permute_qk=True),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "phi3": Arch("PHI3", extra=(("add_rope_scaling_orig_ctx_len", "original_max_position_embeddings", None),
                                ("add_sliding_window", "sliding_window", 0))),
    "gemma2": Arch("GEMMA2", rope_dims=False, norm_shift=1.0,
                   extra=(("add_attn_logit_softcapping", "attn_logit_softcapping", None),
                          ("add_final_logit_softcapping", "final_logit_softcapping", None),
                          ("add_sliding_window", "sliding_window", None)),
                   checks=(gemma2_attention,)),
    "gemma": Arch("GEMMA", refused="llama.cpp's gemma layout (RMSNorm weights plus one) is written for gemma2 "
                                   "only: transformers' GGUF reader, which checks this writer, does not read gemma "
                                   "files, so the gemma conversion is unverified"),
}
"""Hugging Face ``model_type`` -> how it is written: llama.cpp's converter's conventions
(convert_hf_to_gguf.py), each checked in the tests against transformers' GGUF reader on a tiny
model (llama, mistral, qwen2, qwen3, phi3, gemma2). ``attention.key_length`` / ``value_length``
(the head size) are written for every architecture, as the converter does when the config names
a ``head_dim``."""

QUANT_TYPES: dict[tuple[int, bool], str] = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
"""``(bits, symmetric)`` -> the ``gguf.GGMLQuantizationType`` member that holds those codes exactly."""
FILE_TYPES: dict[str, str] = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}
"""Quant type -> ``gguf.LlamaFileType`` member written as ``general.file_type`` (the most common)."""

PRE_TOKENIZERS: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
"""Split regex of a byte-level BPE tokenizer -> llama.cpp's ``tokenizer.ggml.pre`` (plain ByteLevel
is ``gpt-2``; single digits then ByteLevel is ``smollm``; names as llama-vocab.cpp reads them)."""


# -- check ----------------------------------------------------------------------------------------
def check(model: nn.Module) -> list[str]:
    """Why GGUF cannot hold ``model`` (each reason names the fix); empty when it can."""
    from qcore.formats import compressed_tensors as ct

    if importlib.util.find_spec("gguf") is None:
        return ["GGUF export writes through the gguf package, which is not installed: pip install gguf"]
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):
        return [f"{type(model).__name__} has no Hugging Face config; GGUF export needs a transformers model"]
    model_type = str(getattr(config, "model_type", ""))
    arch = ARCHS.get(model_type)
    if arch is None:
        known = ", ".join(k for k, a in ARCHS.items() if not a.refused)
        return [f"architecture {model_type!r} is not written to GGUF (qcore writes {known}); {QCORE_HINT}, "
                "or export compressed-tensors / gptq"]
    if arch.refused:
        return [f"architecture {model_type!r}: {arch.refused}; {QCORE_HINT}, or export compressed-tensors / gptq"]
    layers = ct.quantized_layers(model)
    if not layers:
        return ["the model has no quantized linear layers (QuantLinear): quantize it with qcore.quantize first"]
    found: dict[str, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        for reason in layer_problems(layer):
            found[reason].append(name)
    for name, reason in ct.other_modules(model, layers):
        found[reason].append(name)
    for reason in config_problems(config):
        found[reason].append("")
    unnamed = [key for key in _tensor_keys(model, layers) if gguf_name(model, key) is None]
    if unnamed:
        found[f"tensors that llama.cpp's {model_type} layout has no name for (e.g. an lm_head not tied to the "
              f"embeddings where llama.cpp ties them); {QCORE_HINT}"] = unnamed
    return [f"{reason} ({ct._shown(names)})" if any(names) else reason for reason, names in found.items()]


def layer_problems(layer: Any) -> list[str]:
    """What of one ``QuantLinear`` no exact GGUF block type holds."""
    from qcore.formats import compressed_tensors as ct

    problems: list[str] = []
    if layer.bits not in (4, 8):
        problems.append(f"{layer.bits}-bit weights: GGUF's exact block types hold 4- and 8-bit codes; {FIX_BITS}")
    elif not ct._integer_zeros(layer):
        problems.append(f"float or out-of-range zero points (e.g. HQQ): GGUF blocks hold integer zero points; "
                        f"quantize with rtn or gptq, or {QCORE_HINT}")
    elif quant_type(layer) is None:
        problems.append(f"8-bit asymmetric weights: GGUF's Q8_0 has no zero point; quantize 8-bit with --sym "
                        f"(sym=True), or {QCORE_HINT}")
    if layer.group_size == -1 or layer.group_size % BLOCK:
        what = "per-channel scales" if layer.group_size == -1 else f"group size {layer.group_size}"
        problems.append(f"{what}: GGUF blocks are 32 columns, holding groups of a multiple of 32; {FIX_GROUP}")
    if layer.g_idx is not None and not ct._contiguous(layer):
        problems.append("act-order groups (a permuted g_idx): GGUF blocks are contiguous columns; quantize "
                        "without act-order or with static_groups=True")
    if layer.input_transform is not None:
        problems.append(f"an online input transform ({type(layer.input_transform).__name__}, e.g. a QuaRot "
                        f"rotation) that runs before the matmul; {QCORE_HINT}")
    if layer.act is not None:
        problems.append(f"activation quantization (A{layer.act.bits}): GGUF weights are weight-only; {QCORE_HINT}")
    if layer.bits in (4, 8):
        scales, zeros = layer.scales_zeros()
        if bool((scales.float().abs() * torch.clamp(zeros.float(), min=1) > FP16_MAX).any()):
            problems.append(f"scales beyond float16's range (GGUF stores float16 block scales); {QCORE_HINT}")
    return problems


def config_problems(config: Any) -> list[str]:
    """What of the model config llama.cpp's layout does not hold as written here."""
    arch = ARCHS[config.model_type]
    kind = rope_type(config)
    problems = [check(config) for check in arch.checks]
    if kind not in arch.rope_types:
        problems.append(f"rope scaling {kind!r}: qcore writes {config.model_type} with rope_type "
                        f"{' or '.join(arch.rope_types)}; {QCORE_HINT}")
    return [p for p in problems if p]


def rope_type(config: Any) -> str:
    """The config's ``rope_type`` (``default`` when it names none)."""
    rope = _rope(config)
    return str(rope.get("rope_type", rope.get("type", "default")) or "default")


def rope_freqs(model: nn.Module) -> Tensor | None:
    """llama.cpp's ``rope_freqs.weight`` of a ``llama3``-scaled model (None otherwise): per rotary
    frequency, the factor it is divided by, read off the model's own rotary embedding (unscaled
    ``theta ** (-2i / d)`` over the ``inv_freq`` transformers computes)."""
    if rope_type(model.config) != "llama3":
        return None
    inv_freq = next(m.inv_freq for m in model.modules() if isinstance(getattr(m, "inv_freq", None), Tensor))
    dim = 2 * inv_freq.numel()
    theta = float(_rope(model.config).get("rope_theta", getattr(model.config, "rope_theta", 10000.0)))
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (plain / inv_freq.detach().cpu().double()).float()


def quant_type(layer: Any) -> str | None:
    """The ``GGMLQuantizationType`` name holding ``layer``'s codes exactly, or None."""
    if layer.bits not in (4, 8):
        return None
    zeros = layer.scales_zeros()[1].float()
    sym = bool((zeros == 2 ** (layer.bits - 1)).all())
    return QUANT_TYPES.get((layer.bits, sym))


# -- names ----------------------------------------------------------------------------------------
def _tensor_keys(model: nn.Module, layers: dict[str, Any]) -> list[str]:
    """State-dict keys written, a quantized layer as ``NAME.weight`` (and ``NAME.bias``), a tied
    ``lm_head`` left out."""
    keys: dict[str, None] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key in model.state_dict():
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers:
            key = f"{prefix}.weight" if leaf != "bias" else key
        elif tied and prefix.endswith("lm_head"):
            continue
        keys[key] = None
    return list(keys)


def gguf_name(model: nn.Module, key: str) -> str | None:
    """llama.cpp's name of the state-dict tensor ``key`` (``blk.0.attn_q.weight``), or None."""
    name_map = _name_map(model)
    prefix, _, leaf = key.rpartition(".")
    mapped = name_map.get_name(prefix)
    return f"{mapped}.{leaf}" if mapped is not None else None


_NAME_MAPS: dict[tuple[str, int], Any] = {}


def _name_map(model: nn.Module) -> Any:
    import gguf

    arch = ARCHS[model.config.model_type].gguf_arch
    n_layers = int(model.config.num_hidden_layers)
    if (arch, n_layers) not in _NAME_MAPS:
        _NAME_MAPS[(arch, n_layers)] = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    return _NAME_MAPS[(arch, n_layers)]


# -- tensors --------------------------------------------------------------------------------------
def qk_permutation(model: nn.Module, key: str, rows: int) -> Tensor | None:
    """Row order llama.cpp's rotary layout wants for ``key`` (llama q/k projections), or None:
    within each head, rows ``0, d/2, 1, d/2 + 1, ...`` (pairs of rotated dimensions adjacent)."""
    if not ARCHS[model.config.model_type].permute_qk:
        return None
    config = model.config
    if ".q_proj." in f".{key}.":
        heads = int(config.num_attention_heads)
    elif ".k_proj." in f".{key}.":
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    else:
        return None
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def block_tensor(layer: Any, order: Tensor | None = None) -> tuple[Any, str]:
    """``(uint8 [out, in / 32 * block bytes], type name)``: ``layer``'s codes in GGUF blocks."""
    import numpy as np

    qtype = quant_type(layer)
    assert qtype is not None, "check() refuses layers without an exact GGUF type"
    codes, d, m = block_parts(layer, order)
    out, n_blocks = d.shape
    c = codes.reshape(out, n_blocks, BLOCK).to(torch.int16)
    d16 = d.to(torch.float16).view(torch.uint8).reshape(out, n_blocks, 2)
    if qtype == "Q8_0":
        qs = (c - 128).to(torch.int8).view(torch.uint8)
        parts = [d16, qs]
    else:
        c = c.to(torch.uint8)  # Q4_0 subtracts 8 itself: qcore's symmetric codes as they are
        qs = c[..., : BLOCK // 2] | (c[..., BLOCK // 2:] << 4)
        parts = [d16, m.to(torch.float16).view(torch.uint8).reshape(out, n_blocks, 2), qs] if qtype == "Q4_1" \
            else [d16, qs]
    data = torch.cat(parts, dim=-1).reshape(out, -1).contiguous().numpy()
    return np.ascontiguousarray(data), qtype


def block_parts(layer: Any, order: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes [out, in], d [out, in/32], m [out, in/32])`` in float64: each 32-column block's
    scale and offset (``m = -scale * zero``) before float16 rounding; rows in ``order``."""
    qw = layer.quantized_weight()
    codes, scales, zeros = qw.codes, qw.scales.double(), qw.zeros.double()
    if order is not None:
        codes, scales, zeros = codes[order], scales[order], zeros[order]
    rep = qw.group_size // BLOCK
    d = scales.repeat_interleave(rep, dim=1)
    m = -(scales * zeros).repeat_interleave(rep, dim=1)
    return codes, d, m


def fp16_rounding(layer: Any) -> float:
    """max |GGUF-dequantized - qcore-dequantized| / max |qcore-dequantized| of one layer: what
    float16 block scales (and Q4_1 offsets) change."""
    qtype = quant_type(layer)
    codes, d, m = block_parts(layer)
    out = codes.shape[0]
    c = codes.double().reshape(out, -1, BLOCK)
    d16 = d.to(torch.float16).double().unsqueeze(-1)
    if qtype == "Q4_1":
        got = d16 * c + m.to(torch.float16).double().unsqueeze(-1)
    else:
        got = d16 * (c - 2 ** (layer.bits - 1))
    ref = layer.dequantize_weight().double().reshape(out, -1, BLOCK)
    top = float(ref.abs().max())
    return float((got - ref).abs().max()) / top if top > 0 else 0.0


def float_array(tensor: Tensor) -> tuple[Any, Any]:
    """``(numpy array, raw GGML type or None)`` of a float tensor: 1-D ones as F32, others in
    their own float16 / bfloat16, anything else as F32."""
    import gguf

    t = tensor.detach().cpu()
    if t.dim() > 1 and t.dtype == torch.float16:
        return t.contiguous().numpy(), None
    if t.dim() > 1 and t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view("uint16"), gguf.GGMLQuantizationType.BF16
    return t.float().contiguous().numpy(), None


# -- metadata -------------------------------------------------------------------------------------
def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params) if isinstance(params, dict) else {}


def write_hparams(writer: Any, model: nn.Module) -> None:
    """The architecture's hyperparameters under llama.cpp's keys."""
    config = model.config
    arch = ARCHS[config.model_type]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    # a neutral default: llama.cpp and transformers special-case some names (phi3, mistral)
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or "qcore-export"
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(int(config.vocab_size))
    if arch.rope_dims:
        factor = _rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        writer.add_rope_dimension_count(int(head_dim * float(factor or 1.0)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = _rope(config)
    for method, attr, default in arch.extra:
        value = getattr(config, attr, None)
        value = rope.get(attr, default) if value is None else value
        if value is not None:
            getattr(writer, method)(value)


@dataclass
class Vocab:
    """A tokenizer in GGUF's terms (``tokenizer.ggml.*``)."""

    model: str
    """``llama`` (sentencepiece-style, scores) or ``gpt2`` (byte-level BPE, merges)."""
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)
    """``bos`` / ``eos`` / ``unk`` / ``pad`` -> token id."""
    add_bos: bool = False
    add_eos: bool = False
    space_prefix: bool | None = None
    """Whether a leading space is prepended (sentencepiece style; None: byte-level, not written)."""
    chat_template: str | None = None


def tokenizer_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """``tokenizer`` (a transformers fast tokenizer) as GGUF vocabulary, padded to ``vocab_size``
    rows with ``[PAD{i}]`` unused tokens as llama.cpp's converter does."""
    import gguf

    from qcore.formats import ExportError

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} has no tokenizers backend (tokenizer.json): "
                          "pass a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    data = json.loads(backend.to_str())
    model = data["model"]
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    if model.get("type") != "BPE":
        raise ExportError(f"{model.get('type')} tokenizers are not written to GGUF (qcore writes BPE ones: "
                          "sentencepiece-style with byte fallback, or byte-level)")
    by_id = {int(i): tok for tok, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if len(by_id) > vocab_size:
        raise ExportError(f"the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size} embedding "
                          "rows: pass the model's own tokenizer")
    T = gguf.TokenType
    tokens, types, scores = [], [], []
    spm = _spm_pieces(getattr(tokenizer, "vocab_file", None)) if model.get("byte_fallback") else None
    for i in range(vocab_size):
        tok = by_id.get(i)
        if spm is not None and i < len(spm):
            piece, score, kind = spm[i]
        elif tok is None:
            piece, score, kind = f"[PAD{i}]", -1000.0, int(T.UNUSED)
        else:
            piece, score = tok, (0.0 if i in added else -float(i))  # sentencepiece BPE scores fall with the id
            if i in added:
                kind = T.UNKNOWN if tok == model.get("unk_token") else \
                    T.CONTROL if added[i].get("special") else T.USER_DEFINED
            elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                kind = T.BYTE
            else:
                kind = T.NORMAL
        tokens.append(piece)
        scores.append(score)
        types.append(int(kind))
    if model.get("byte_fallback"):
        if spm is None:
            logger.info("gguf: no sentencepiece model file beside the tokenizer: token scores are -id "
                        "(sentencepiece BPE's merge order)")
        vocab = Vocab("llama", tokens, types, scores=scores, space_prefix=_space_prefix(data))
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        vocab = Vocab("gpt2", tokens, types, merges=merges, pre=_pre_tokenizer(data.get("pre_tokenizer")))
    vocab.special = {k: int(v) for k in ("bos", "eos", "unk", "pad")
                     if (v := getattr(tokenizer, f"{k}_token_id", None)) is not None}
    probe = tokenizer("a").input_ids
    vocab.add_bos = bool(probe) and "bos" in vocab.special and probe[0] == vocab.special["bos"]
    vocab.add_eos = len(probe) > 1 and "eos" in vocab.special and probe[-1] == vocab.special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _space_prefix(data: dict[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer.json prepends "▁" (a Prepend normalizer, or a
    Metaspace pre-tokenizer that prepends)."""
    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        return list((part or {}).get(key, [part] if part else []))

    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
                  for n in steps(data.get("normalizer"), "normalizers"))
    metaspace = any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                    and p.get("add_prefix_space", True) for p in steps(data.get("pre_tokenizer"), "pretokenizers"))
    return prepend or metaspace


def _pre_tokenizer(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` of a byte-level pre-tokenizer, or None when unknown."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    logger.warning("gguf: pre-tokenizer %s is not one llama.cpp names here: tokenizer.ggml.pre left out "
                   "(llama.cpp then splits text its default way)", kinds)
    return None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _protobuf_fields(buf: bytes) -> list[tuple[int, Any]]:
    """``(field number, value)`` of one protobuf message (bytes for length-delimited fields,
    raw 4 bytes for fixed32, int for varints)."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out.append((number, value))
    return out


def _spm_pieces(path: Any) -> list[tuple[str, float, int]] | None:
    """``(piece, score, type)`` of a sentencepiece ``.model`` file (its ``ModelProto.pieces``;
    sentencepiece's piece types are GGUF's token types), or None when there is none."""
    if not path or not str(path).endswith(".model") or not Path(path).is_file():
        return None
    try:
        pieces = []
        for number, raw in _protobuf_fields(Path(path).read_bytes()):
            if number != 1:
                continue
            piece, score, kind = "", 0.0, 1
            for sub, value in _protobuf_fields(raw):
                if sub == 1:
                    piece = value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", value)[0]
                elif sub == 3:
                    kind = int(value)
            pieces.append((piece, score, kind))
        return pieces or None
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        logger.warning("gguf: %s is not a readable sentencepiece model: token scores derived from ids", path)
        return None


def config_special_ids(config: Any) -> dict[str, int]:
    """``bos`` / ``eos`` / ``pad`` -> the token id the model config names (single ids only)."""
    found = {k: getattr(config, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return {k: int(v) for k, v in found.items() if isinstance(v, int) and 0 <= v < int(config.vocab_size)}


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """``tokenizer.ggml.*`` of ``vocab``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, idx in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.space_prefix is not None:
        writer.add_add_space_prefix(vocab.space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# -- write ----------------------------------------------------------------------------------------
def write(model: nn.Module, target: Path, tokenizer: Any = None) -> None:
    """Write ``model`` into the file ``target`` (see the module docstring)."""
    import gguf

    import qcore
    from qcore.formats import ExportError
    from qcore.formats import compressed_tensors as ct

    reasons = check(model)
    if reasons:
        raise ExportError(f"format {FORMAT!r} cannot hold this model: " + "; ".join(reasons))
    vocab = tokenizer_vocab(tokenizer, int(model.config.vocab_size)) if tokenizer is not None else None
    layers = ct.quantized_layers(model)
    state = model.state_dict()
    arch = ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    write_hparams(writer, model)
    writer.add_quantized_by(f"qcore {qcore.__version__}")
    counts: dict[str, int] = defaultdict(int)
    worst, worst_layer = 0.0, ""
    for key in _tensor_keys(model, layers):
        name = gguf_name(model, key)
        assert name is not None, key  # check() refuses unnamed tensors
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers and leaf == "weight":
            layer = layers[prefix]
            data, qtype = block_tensor(layer, qk_permutation(model, key, layer.out_features))
            writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
            counts[qtype] += 1
            err = fp16_rounding(layer)
            if err > worst:
                worst, worst_layer = err, prefix
            continue
        tensor = state[key].detach()
        order = qk_permutation(model, key, tensor.shape[0])
        if order is not None:
            tensor = tensor[order]
        if key.endswith("norm.weight") and arch.norm_shift:
            tensor = tensor.float() + arch.norm_shift
        array, raw = float_array(tensor)
        writer.add_tensor(name, array, raw_dtype=raw)
    factors = rope_freqs(model)
    if factors is not None:
        writer.add_tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors.numpy())
    main = max(counts, key=counts.__getitem__)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[main])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_float32("qcore.export.fp16_scale_max_rel_error", worst)
    if vocab is not None:
        write_vocab(writer, vocab)
    else:
        logger.warning("gguf: no tokenizer given: the file holds no token list and llama.cpp needs one to run "
                       "it; pass tokenizer= (the CLI exports the checkpoint's own)")
        for kind, idx in config_special_ids(model.config).items():
            getattr(writer, f"add_{kind}_token_id")(idx)
    write_file(writer)
    logger.info("gguf: wrote %s (%s); float16 block scales change the dequantized weights by at most %.3g "
                "of a layer's largest weight (%s)", target, ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())),
                worst, worst_layer or "no change")


def write_file(writer: Any) -> None:
    """Write a filled ``GGUFWriter``'s header, metadata and tensors to its file, and close it."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
