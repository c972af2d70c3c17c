"""ONNX for onnxruntime: ``qcore.export(model, OUT, format="onnx")`` (``qcore export DIR --format onnx
--out OUT``).

What is written (``KIND = "dir"``)::

    model.onnx          # the decoder graph (opset 23 + com.microsoft contrib ops)
    model.onnx.data     # its tensors (ONNX external data, one file; tensors under 1 KiB stay inline)
    genai_config.json   # what onnxruntime-genai's generation loop reads (model.type, heads, names)
    tokenizer files     # when a tokenizer is given (tokenizer.json ...)

The graph is built with the ``onnx`` package's helpers, its inputs and outputs named as
onnxruntime-genai's model builder names them, so that its generation loop can drive it:

* inputs ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64 ``[batch, past + seq]`` and
  per layer ``past_key_values.{i}.key`` / ``.value`` float32 ``[batch, kv_heads, past, head_dim]``
  (``past`` 0 on the first call);
* outputs ``logits`` float32 ``[batch, seq, vocab]`` and ``present.{i}.key`` / ``.value``
  ``[batch, kv_heads, past + seq, head_dim]`` (the past with this call's keys appended).

Per layer: ``RMSNormalization`` (ONNX opset 23), the q/k/v projections (plus their biases, Qwen2;
plus the per-head q/k ``RMSNormalization``, Qwen3), attention with the KV cache, ``o_proj``, the
residual ``Add``, and the SiLU-gated MLP. Attention is ``com.microsoft::GroupQueryAttention`` (as
onnxruntime-genai writes it: rotary embedding from the model's own cos/sin tables, NeoX layout;
positions and lengths from the attention mask; Mistral's and Qwen's sliding windows as
``local_window_size``) when the head size is a multiple of 16, which its CPU kernel requires; other
head sizes (stories260K's 8) get the same computation in plain ONNX ops (rotary embedding, cache
``Concat``, repeated key/value heads, an additive causal / window / padding mask, ``Softmax``). The
attention mask is read as per-row lengths (GroupQueryAttention) or per-key padding (plain path);
positions run on from the past's length, so rows are unpadded or right-padded (the tests run
unpadded rows).

Quantized linears (``QuantLinear``) become ``com.microsoft::MatMulNBits`` with qcore's integer codes,
scales and zero points carried exactly (``w = (code - zero) * scale``, float32 compute,
``accuracy_level`` 0): ``B`` uint8 ``[N, k_blocks, block * bits / 8]`` (codes along the input, the
first in the lowest bits), ``scales`` float32 ``[N, k_blocks]`` (qcore's bfloat16 / float16 scales
convert exactly), ``zero_points`` uint8 ``[N, ceil(k_blocks * bits / 8)]`` packed the same way for
asymmetric layers (symmetric layers, every zero ``2**(bits-1)``, use MatMulNBits' default and carry
none). Bits 2, 4 and 8; ``block_size`` = qcore's group size when it is a power of two from 16 (at most
256 for 2 bits), per-channel layers as one block of the next power of two (checked in onnxruntime up
to 4096); a ragged last group (e.g.
576 columns in groups of 128) is MatMulNBits' ragged last block. Act-order layers (a permuted
``g_idx`` whose sorted columns form whole groups, as GPTQ writes them) are written with their columns
sorted by group and a ``Gather`` of the input columns in the same order before the matmul
(MatMulNBits' own ``g_idx`` input is deprecated). Float linears (a float ``lm_head``, ignored
layers) are ``com.microsoft::FusedMatMul`` with ``transB`` on the ``[out, in]`` weight, so a tied
``lm_head`` reads the embedding table itself. Every float tensor is written as float32 (bfloat16
and float16 values convert exactly).

W8A8 layers (a ``QuantLinear`` whose ``act`` is dynamic per-token symmetric int8, SmoothQuant's
output) compute what qcore's ``w8a8`` kernel computes: the input's per-row grid in ONNX ops
(``s = max(ReduceMax(Abs(x)) / 127, 1e-30)``, ``q = Clip(Round(x / s), -127, 127)``; Round is
half-to-even, as torch's), computed once per input (q/k/v and gate/up share it); with 8-bit
per-channel weights, ``MatMulInteger`` of the int8 codes and the weight codes minus 128 (int8
``[K, N]``; an asymmetric layer's zero points minus 128 as its int8 ``b_zero_point``), exact int32,
then ``Cast`` to float32, times the weight's per-channel scale, times ``s``, plus the bias; with
grouped or 2/4-bit weights (e.g. SmoothQuant's ``group_size=32``), ``q * s`` into MatMulNBits, as
qcore's float backends read a fake-quantized input.

``write(..., lm_head_bits=8 or 4)`` quantizes a float LM head at export (symmetric RTN: 8 bits per
channel, 4 bits in blocks of 32; float32 scales) and writes it as MatMulNBits; the embedding's
``Gather`` still reads the float table. The logits are then no longer qcore's (the head's rounding
error); the default (None) writes the float head.

Refused (:func:`check`), each reason naming the fix or the format that holds it: architectures other
than :data:`ARCHS` (naming the export formats whose check passes), activations other than SiLU, rope
scaling other than :data:`STATIC_ROPE`, partial rotary embeddings, 3-bit and other widths, group
sizes that are not a power of two from 16, float zero points (HQQ), act-order groups of uneven size,
online input transforms (QuaRot rotations), activation grids other than dynamic per-token symmetric
int8 (static per-tensor scales, 4/6-bit, clipped or asymmetric activations), modules qcore saves that
are not a plain ``QuantLinear``, and an ``lm_head_bits`` other than 4 or 8 or on a quantized head.

Measured (2026-12-07, Intel Xeon Processor, 2 cores, onnx 1.23.2, onnxruntime 1.32.0,
tests/test_onnx_export.py): onnxruntime's logits of every tiny case (llama, tied llama, llama3 rope,
mistral with and without a window, qwen2, qwen3; 2/4/8 bits, groups 32/64/128 and per channel,
symmetric and asymmetric, act-order, float; both attention paths), prefill and decode through the
cache, within 1.3e-7 to 6.0e-7 of qcore's ``reference`` backend; stories260K's perplexity within
0.02% of qcore's own model (which runs its bf16 int4 kernel); onnxruntime-genai 0.18.0 generates
qcore's greedy tokens from the folder. W8A8: one layer's output equals qcore's ``w8a8`` kernel's
bit for bit at 1, 9 and 33 rows (symmetric weights; asymmetric within 6e-8 relative), where that
kernel accumulates in int32; at 2 to 8 rows qcore runs ``_weight_int8pack_mm`` in bfloat16 (0.4%
relative apart). Whole tiny models (SmoothQuant W8A8 llama and qwen2: 1.2e-7; w8 g32: 4.6e-4) differ
where an activation within float32 rounding of a rounding boundary of its grid takes the
neighbouring code (one step, ``max|x_row| / 127``; the float parts between layers differ by
summation order); stories260K W8A8 perplexity 5.51429 against qcore's 5.51462 (-0.006%). A tiny
tied llama with ``lm_head_bits`` 8 / 4: logits within 4.2e-3 / 6.0e-2 of the float head (random
weights), 2.4e-7 of the same quantized head run by qcore. SmolLM2-135M GPTQ w4 g32 (bench/onnx_runtime.py,
9 x 512 WikiText-2 tokens, one thread, load average 4-5; qcore's own model 39.51): float head 39.50,
40.7 tokens/s; ``lm_head_bits=4`` 44.78 (+13%: the int4 head is most of onnxruntime-genai's builder's
loss), 53.6 tokens/s; ``lm_head_bits=8`` 39.61 (+0.24%) but 9.0 tokens/s: onnxruntime's CPU
MatMulNBits has no fast 8-bit kernel at ``accuracy_level`` 0 (49152 x 576, one row: 96 ms, the float
matmul 7.5 ms, 8 bits at level 4 1.5 ms, 4 bits at level 0 2.7 ms); with level 4 on the head alone,
39.78 (+0.68%) at 51.3 tokens/s.
"""
from __future__ import annotations

import importlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcore.formats.packed import QCORE_HINT

KIND = "dir"
FORMAT = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG_FILE = "genai_config.json"
OPSET = 23
"""ONNX opset of the default domain (23: ``RMSNormalization``)."""
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
INLINE_BYTES = 1024
"""Tensors smaller than this stay inside ``model.onnx``; the rest go to :data:`DATA_FILE`."""
ACCURACY_LEVEL = 0
"""MatMulNBits ``accuracy_level``: 0 computes in float32 from the dequantized weights (exact up to
summation order); 4 would quantize activations to int8 (faster on CPU, not qcore's numbers)."""
NBITS: tuple[int, ...] = (2, 4, 8)
"""Widths MatMulNBits runs on onnxruntime's CPU provider (checked in the tests)."""
MIN_BLOCK = 16
MAX_BLOCK_2BIT = 256
"""onnxruntime's CPU MatMulNBits refuses 2-bit blocks larger than this."""
STATIC_ROPE: tuple[str, ...] = ("default", "linear", "llama3")
"""``rope_type`` values whose cos/sin depend on the position only: their tables are computed once by
the model's own rotary embedding and stored."""
SILU: tuple[str, ...] = ("silu", "swish")
ACT_INT8_RANGE: tuple[int, int] = (-127, 127)
"""Codes of the dynamic per-token int8 activation grid (qcore's ``act_qrange(8, sym=True)``)."""
ACT_SCALE_FLOOR = 1e-30
"""Smallest activation scale (``quantize_act_int8``'s clamp: an all-zero row gets zero codes)."""
LM_HEAD_BITS: tuple[int, ...] = (4, 8)
"""``lm_head_bits`` values :func:`write` takes (a float LM head quantized at export, RTN)."""
LM_HEAD_BLOCK_4BIT = 32
"""Group size of a 4-bit exported LM head (8 bits: per channel)."""
GQA_HEAD_MULTIPLE = 16
"""GroupQueryAttention's CPU kernel needs a head size that is a multiple of this; other head sizes
(stories260K's 8) get attention in plain ONNX ops."""
MASKED = float(np.finfo(np.float32).min)
"""Additive mask of a key a query does not see (plain attention; as transformers masks)."""
INPUT_NAMES = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
LOGITS = "logits"
OTHER_FORMATS = f"compressed-tensors (any transformers architecture) or {QCORE_HINT}"
FIX_GROUP = "quantize with --group-size 32, 64 or 128 (a power of two from 16)"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` is written (a row of :data:`ARCHS`)."""

    genai_type: str
    """``model.type`` of genai_config.json (onnxruntime-genai's name of the architecture)."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys after their projections (Qwen3)."""


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama"),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", qk_norm=True),
}
"""Hugging Face ``model_type`` -> how it is written. Each is checked against qcore's forward on a tiny
model (biases of any projection are written when the layer has one: Qwen2's q/k/v)."""

ATTN_PROJ: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
LAYER_NORMS: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")


# -- check ----------------------------------------------------------------------------------------
def check(model: nn.Module, *, lm_head_bits: int | None = None) -> list[str]:
    """Why this format cannot hold ``model`` (each reason names the fix); empty when it can.
    ``lm_head_bits``: see :func:`write`."""
    from qcore.formats import compressed_tensors as ct

    if not _importable("onnx"):
        return ["ONNX export builds the graph with the onnx package, which is not installed: pip install onnx "
                "(and onnxruntime to run it)"]
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):
        return [f"{type(model).__name__} has no Hugging Face config; ONNX export needs a transformers causal LM"]
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in ARCHS:
        return [f"architecture {model_type!r} is not written to ONNX (qcore writes {', '.join(ARCHS)}); "
                f"{other_formats(model)}"]
    found: dict[str, list[str]] = defaultdict(list)
    for reason in config_problems(config) + structure_problems(model) + lm_head_problems(model, lm_head_bits):
        found[reason].append("")
    layers = ct.quantized_layers(model)
    for name, layer in layers.items():
        for reason in layer_problems(layer):
            found[reason].append(name)
    for name, reason in ct.other_modules(model, layers):
        found[reason].append(name)
    return [f"{reason} ({ct._shown(names)})" if any(names) else reason for reason, names in found.items()]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def other_formats(model: nn.Module) -> str:
    """Where ``model`` can go instead: the export formats whose check passes, and qcore's own."""
    from qcore.formats import FORMATS, check_export

    able = []
    for name in FORMATS:
        try:
            if name != FORMAT and not check_export(model, name):
                able.append(name)
        except Exception:  # noqa: BLE001 - a format that cannot even check the model does not hold it
            logger.debug("onnx: format %s could not check the model", name, exc_info=True)
    where = f"export {' or '.join(able)}, or use " if able else "use "
    return where + "qcore's own format (qcore.save)"


def config_problems(config: Any) -> list[str]:
    """What of the model config the graph written here does not compute."""
    problems = []
    act = str(getattr(config, "hidden_act", "silu"))
    if act not in SILU:
        problems.append(f"MLP activation {act!r}: the graph computes SiLU-gated MLPs; {OTHER_FORMATS}")
    kind = rope_type(config)
    if kind not in STATIC_ROPE:
        problems.append(f"rope scaling {kind!r}: qcore writes the rotary tables of rope_type "
                        f"{', '.join(STATIC_ROPE)}; {OTHER_FORMATS}")
    factor = _rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if factor not in (None, 1, 1.0):
        problems.append(f"partial rotary embeddings (partial_rotary_factor {factor}); {OTHER_FORMATS}")
    heads, kv_heads = int(config.num_attention_heads), _kv_heads(config)
    if heads % kv_heads:
        problems.append(f"{heads} query heads over {kv_heads} key/value heads (not a multiple); {QCORE_HINT}")
    if head_dim(config) % 2:
        problems.append(f"an odd head size {head_dim(config)}: rotary embeddings rotate pairs; {QCORE_HINT}")
    return problems


def lm_head_problems(model: nn.Module, lm_head_bits: int | None) -> list[str]:
    """Why ``lm_head_bits`` cannot apply to ``model``'s LM head (empty when it can or is None)."""
    if lm_head_bits is None:
        return []
    if lm_head_bits not in LM_HEAD_BITS:
        return [f"lm_head_bits={lm_head_bits}: use 8 (symmetric per-channel RTN), 4 (symmetric RTN, block "
                f"{LM_HEAD_BLOCK_4BIT}) or None (the float LM head)"]
    head = getattr(model, "lm_head", None)
    if _is_quantized(head):
        return [f"lm_head_bits={lm_head_bits}: the LM head is already quantized (its own codes are written); "
                "leave lm_head_bits unset"]
    if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        return [f"lm_head_bits={lm_head_bits}: the LM head has no 2-D weight to quantize; leave lm_head_bits unset"]
    return []


def structure_problems(model: nn.Module) -> list[str]:
    """Modules of the Llama-style layout the graph reads, where missing."""
    inner = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, n)]
    if getattr(model, "lm_head", None) is None:
        missing.append("lm_head")
    if not missing:
        for i, block in enumerate(inner.layers):
            names = [f"self_attn.{p}" for p in ATTN_PROJ] + [f"mlp.{p}" for p in MLP_PROJ] + list(LAYER_NORMS)
            missing += [f"layers.{i}.{n}" for n in names if _get(block, n) is None]
    if missing:
        return [f"modules the Llama-style graph reads are missing ({', '.join(missing[:3])}); {QCORE_HINT}"]
    return []


def layer_problems(layer: Any) -> list[str]:
    """What of one ``QuantLinear`` MatMulNBits does not hold exactly."""
    from qcore.formats import compressed_tensors as ct

    problems: list[str] = []
    if layer.bits not in NBITS:
        problems.append(f"{layer.bits}-bit weights: onnxruntime's MatMulNBits runs {', '.join(map(str, NBITS))} "
                        f"bits; quantize with bits=4 or 8, or {QCORE_HINT}")
    elif not ct._integer_zeros(layer):
        problems.append(f"float or out-of-range zero points (e.g. HQQ): MatMulNBits is written with integer zero "
                        f"points; quantize with rtn or gptq, or {QCORE_HINT}")
    elif block_size(layer) is None:
        problems.append(f"group size {layer.group_size}: MatMulNBits blocks are a power of two from {MIN_BLOCK}"
                        f"{f' up to {MAX_BLOCK_2BIT} for 2 bits' if layer.bits == 2 else ''}; {FIX_GROUP}")
    if layer.g_idx is not None and not ct._contiguous(layer) and act_order(layer) is None:
        problems.append("act-order groups of uneven size (a g_idx whose sorted columns do not form whole groups); "
                        f"quantize with static_groups=True, or {QCORE_HINT}")
    if layer.input_transform is not None:
        problems.append(f"an online input transform ({type(layer.input_transform).__name__}, e.g. a QuaRot "
                        f"rotation) that runs before the matmul; {QCORE_HINT}")
    if layer.act is not None and not act_int8_grid(layer.act):
        problems.append(f"activation quantization {act_grid(layer.act)}: the ONNX export writes dynamic per-token "
                        f"symmetric int8 activations only (SmoothQuant's W8A8, ActQuant(bits=8, dynamic=True, "
                        f"sym=True)); export compressed-tensors, or {QCORE_HINT}")
    return problems


def act_int8_grid(act: Any) -> bool:
    """Whether ``act`` (an ``ActQuant``) is the grid written here: dynamic per-token symmetric int8,
    unclipped (``s = max|x_row| / 127``, ``q = clamp(round(x / s), -127, 127)``)."""
    return bool(act.bits == 8 and act.dynamic and act.sym and act.clip == 1.0)


def act_grid(act: Any) -> str:
    """``act`` in words (a refusal's subject)."""
    kind = "dynamic per-token" if act.dynamic else "static per-tensor"
    clip = f", clip {act.clip}" if act.clip != 1.0 else ""
    return f"A{act.bits} ({kind}, {'symmetric' if act.sym else 'asymmetric'}{clip})"


def integer_matmul(layer: Any) -> bool:
    """Whether ``layer`` is written as ``MatMulInteger`` (int8 activations times its 8-bit per-channel
    codes, as qcore's ``w8a8`` kernel); other activation-quantized layers (grouped or 2/4-bit
    weights) get their activations quantized and dequantized before MatMulNBits, as qcore's float
    backends compute them."""
    return (layer.act is not None and layer.bits == 8
            and (layer.group_size == -1 or layer.group_size >= layer.in_features))


def block_size(layer: Any) -> int | None:
    """MatMulNBits ``block_size`` of ``layer`` (qcore's group size, or one block per row), or None."""
    if layer.group_size == -1:
        size = max(MIN_BLOCK, 1 << max(0, (int(layer.in_features) - 1).bit_length()))
    else:
        size = int(layer.group_size)
    if size < MIN_BLOCK or size & (size - 1):
        return None
    if layer.bits == 2 and size > MAX_BLOCK_2BIT:
        return None
    return size


def act_order(layer: Any) -> Tensor | None:
    """The column order (``argsort(g_idx)``) that makes ``layer``'s act-order groups contiguous, when
    its sorted columns form whole groups of ``group_size`` (the last may be shorter); else None."""
    g_idx = layer.g_idx.long().cpu()
    order = torch.argsort(g_idx, stable=True)
    plain = torch.arange(layer.in_features) // layer.group_size
    return order if torch.equal(g_idx[order], plain) else None


def rope_type(config: Any) -> str:
    """The config's ``rope_type`` (``default`` when it names none)."""
    rope = _rope(config)
    return str(rope.get("rope_type", rope.get("type", "default")) or "default")


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params) if isinstance(params, dict) else {}


def _kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(config: Any) -> int:
    """Size of one attention head."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def sliding_window(config: Any, layer: int) -> int:
    """Sliding-window size of layer ``layer`` (``-1``: full attention), as transformers applies it:
    per ``layer_types`` when the config has them, else ``sliding_window`` for every layer."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types and types[layer] != "sliding_attention"):
        return -1
    return int(window)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


# -- tensors --------------------------------------------------------------------------------------
def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., n]`` -> uint8 ``[..., n * bits / 8]``, ``8 / bits`` codes per byte, the
    first in the lowest bits (``n`` a multiple of ``8 / bits``)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= c[..., j] << np.uint8(bits * j)
    return out


@dataclass
class NBitsWeight:
    """One ``QuantLinear`` in MatMulNBits' terms."""

    B: np.ndarray
    """uint8 ``[N, k_blocks, block * bits / 8]``."""
    scales: np.ndarray
    """float32 ``[N, k_blocks]``."""
    zero_points: np.ndarray | None
    """uint8 ``[N, ceil(k_blocks * bits / 8)]``; None for symmetric layers (default zero 2**(bits-1))."""
    bits: int
    block_size: int
    K: int
    N: int
    order: np.ndarray | None = None
    """Input column order (act-order layers): the matmul reads ``x[..., order]``."""


def nbits_weight(layer: Any) -> NBitsWeight:
    """``layer``'s codes, scales and zero points in MatMulNBits' layout (see the module docstring)."""
    bits, block = layer.bits, block_size(layer)
    assert block is not None, "check() refuses other group sizes"
    qw = layer.quantized_weight()
    codes, scales, zeros = qw.codes.cpu(), qw.scales.float().cpu(), qw.zeros.float().cpu()
    order = None
    if layer.g_idx is not None and not _plain_groups(layer):
        order = act_order(layer)
        assert order is not None, "check() refuses uneven act-order groups"
        codes = codes[:, order]
    n, k = codes.shape
    k_blocks = -(-k // block)
    if scales.shape[1] != k_blocks:  # per-channel: one block per row
        scales, zeros = scales[:, :1], zeros[:, :1]
    zero_codes = zeros.to(torch.uint8)
    padded = torch.cat([codes, zero_codes[:, -1:].expand(n, k_blocks * block - k)], dim=1)
    B = pack_low_first(padded.numpy().reshape(n, k_blocks, block), bits)
    sym = bool((zeros == 2 ** (bits - 1)).all())
    zp = None
    if not sym:
        per = 8 // bits
        zpad = torch.cat([zero_codes, torch.zeros(n, (-k_blocks) % per, dtype=torch.uint8)], dim=1)
        zp = pack_low_first(zpad.numpy(), bits)
    return NBitsWeight(B, scales.numpy().astype(np.float32), zp, bits, block, k, n,
                       None if order is None else order.numpy().astype(np.int64))


def _plain_groups(layer: Any) -> bool:
    from qcore.formats import compressed_tensors as ct

    return ct._contiguous(layer)


def float32(tensor: Tensor) -> np.ndarray:
    """A float tensor as a contiguous float32 numpy array."""
    return np.ascontiguousarray(tensor.detach().cpu().float().numpy())


def rotary_tables(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 ``[max_positions, rotary_dim / 2]`` from the model's own rotary
    embedding (its rope scaling and attention scaling included)."""
    config = model.config
    positions = int(config.max_position_embeddings)
    rotary = model.model.rotary_emb
    probe = torch.zeros(1, 1, head_dim(config), dtype=torch.float32, device=_device(model))
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(positions, device=probe.device)[None])
    half = cos.shape[-1] // 2
    return float32(cos[0, :, :half]), float32(sin[0, :, :half])


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


# -- graph ----------------------------------------------------------------------------------------
@dataclass
class Graph:
    """Nodes and initializers under construction (names unique by a running counter)."""

    nodes: list[Any] = field(default_factory=list)
    initializers: dict[str, Any] = field(default_factory=dict)
    counter: int = 0
    memo: dict[tuple[str, str], str] = field(default_factory=dict)
    """``(what, input) -> output`` of subgraphs several nodes read (one activation quantization of
    the input q/k/v, gate/up share)."""

    def const(self, name: str, array: np.ndarray) -> str:
        """Add (once) the initializer ``name`` holding ``array``."""
        from onnx import numpy_helper

        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str = "", domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        """Add one node (outputs named ``outputs``, or after the node); returns its output names."""
        from onnx import helper

        self.counter += 1
        base = f"/{name or op_type}_{self.counter}"
        outputs = outputs or [f"{base}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, domain=domain, **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], name: str = "", domain: str = "",
            outputs: list[str] | None = None, **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, name, domain, outputs, **attrs)[0]


def act_quant(graph: Graph, x: str, name: str) -> tuple[str, str]:
    """``(codes, scale)`` of ``x`` on the dynamic per-token int8 grid, as qcore's
    ``quantize_act_int8``: ``s = max(max|x_row| / 127, 1e-30)`` float32 ``[..., 1]``,
    ``q = clip(round(x / s), -127, 127)`` (float32 integer values; Round is half-to-even, as torch's)."""
    key = ("act_codes", x)
    if key not in graph.memo:
        lo, hi = ACT_INT8_RANGE
        axis = graph.const("const.axis_last", np.array([-1], np.int64))
        amax = graph.op1("ReduceMax", [graph.op1("Abs", [x], f"{name}/act_abs"), axis], f"{name}/act_absmax",
                         keepdims=1)
        scale = graph.op1("Div", [amax, graph.const("const.f32_act_qmax", np.array(hi, np.float32))],
                          f"{name}/act_scale")
        scale = graph.op1("Max", [scale, graph.const("const.f32_act_floor", np.array(ACT_SCALE_FLOOR, np.float32))],
                          f"{name}/act_scale_floor")
        codes = graph.op1("Round", [graph.op1("Div", [x, scale], f"{name}/act_div")], f"{name}/act_round")
        codes = graph.op1("Clip", [codes, graph.const("const.f32_act_lo", np.array(lo, np.float32)),
                                   graph.const("const.f32_act_hi", np.array(hi, np.float32))], f"{name}/act_clip")
        graph.memo[key], graph.memo[("act_scale", x)] = codes, scale
    return graph.memo[key], graph.memo[("act_scale", x)]


def act_int8(graph: Graph, x: str, name: str) -> tuple[str, str]:
    """``(int8 codes, float32 scale [..., 1])`` of ``x`` (:func:`act_quant`, codes cast to int8)."""
    codes, scale = act_quant(graph, x, name)
    key = ("act_int8", x)
    if key not in graph.memo:
        graph.memo[key] = graph.op1("Cast", [codes], f"{name}/act_int8", to=_onnx().TensorProto.INT8)
    return graph.memo[key], scale


def act_fake_quant(graph: Graph, x: str, name: str) -> str:
    """``q * s``: ``x`` quantized and dequantized on the int8 grid (what qcore's float backends read)."""
    codes, scale = act_quant(graph, x, name)
    key = ("act_dequant", x)
    if key not in graph.memo:
        graph.memo[key] = graph.op1("Mul", [codes, scale], f"{name}/act_dequant")
    return graph.memo[key]


def int8_weight(layer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` of an 8-bit per-channel layer for ``MatMulInteger``: int8
    ``[K, N]`` codes minus 128, float32 ``[N]`` scales, int8 ``[N]`` zero points minus 128 (None when
    every zero is 128, the symmetric grid)."""
    qw = layer.quantized_weight()
    codes = qw.codes.cpu().to(torch.int16) - 128
    zeros = qw.zeros.float().cpu()[:, 0].to(torch.int16) - 128
    B = np.ascontiguousarray(codes.t().to(torch.int8).numpy())
    zp = None if bool((zeros == 0).all()) else zeros.to(torch.int8).numpy()
    return B, np.ascontiguousarray(qw.scales.float().cpu()[:, 0].numpy()), zp


def integer_linear(graph: Graph, layer: Any, x: str, name: str) -> str:
    """``layer(x)`` without bias as qcore's ``w8a8`` kernel computes it: int8 codes of ``x`` times the
    int8 weight codes in ``MatMulInteger`` (exact int32), cast to float32, times the weight's
    per-channel scale, times the activation's per-row scale."""
    codes, scale = act_int8(graph, x, name)
    B, scales, zp = int8_weight(layer)
    inputs = [codes, graph.const(f"{name}.MatMulInteger.weight", B)]
    if zp is not None:
        inputs += ["", graph.const(f"{name}.MatMulInteger.zero_points", zp)]
    acc = graph.op1("MatMulInteger", inputs, f"{name}/MatMulInteger")
    y = graph.op1("Cast", [acc], f"{name}/Cast", to=_onnx().TensorProto.FLOAT)
    y = graph.op1("Mul", [y, graph.const(f"{name}.MatMulInteger.scales", scales)], f"{name}/weight_scale")
    return graph.op1("Mul", [y, scale], f"{name}/act_scale")


def linear(graph: Graph, module: nn.Module, x: str, name: str) -> str:
    """``module(x)`` (a QuantLinear as MatMulNBits, or as MatMulInteger when :func:`integer_matmul`;
    an nn.Linear as FusedMatMul), bias added."""
    from qcore.quant.linear import QuantLinear

    if isinstance(module, QuantLinear) and integer_matmul(module):
        y = integer_linear(graph, module, x, name)
    elif isinstance(module, QuantLinear):
        if module.act is not None:
            x = act_fake_quant(graph, x, name)
        w = nbits_weight(module)
        if w.order is not None:
            x = graph.op1("Gather", [x, graph.const(f"{name}.act_order", w.order)], f"{name}/act_order", axis=-1)
        inputs = [x, graph.const(f"{name}.MatMulNBits.qweight", w.B), graph.const(f"{name}.MatMulNBits.scales",
                                                                                  w.scales)]
        if w.zero_points is not None:
            inputs.append(graph.const(f"{name}.MatMulNBits.qzeros", w.zero_points))
        y = graph.op1("MatMulNBits", inputs, f"{name}/MatMulNBits", MS_DOMAIN, K=w.K, N=w.N, bits=w.bits,
                      block_size=w.block_size, accuracy_level=ACCURACY_LEVEL)
    else:
        weight = graph.const(f"{name}.weight", float32(module.weight))
        y = graph.op1("FusedMatMul", [x, weight], f"{name}/MatMul", MS_DOMAIN, transB=1)
    bias = getattr(module, "bias", None)
    if bias is not None:
        y = graph.op1("Add", [y, graph.const(f"{name}.bias", float32(bias))], f"{name}/Add")
    return y


def rms_norm(graph: Graph, module: nn.Module, x: str, name: str, eps: float) -> str:
    """``RMSNormalization`` over the last axis, float32 statistics."""
    weight = graph.const(f"{name}.weight", float32(module.weight))
    return graph.op1("RMSNormalization", [x, weight], name, axis=-1, epsilon=eps, stash_type=1)


def head_norm(graph: Graph, module: nn.Module, x: str, name: str, eps: float, dim: int) -> str:
    """Per-head RMSNorm of ``[batch, seq, heads * dim]`` (Qwen3's q/k norms)."""
    split = graph.const("const.heads_split", np.array([0, 0, -1, dim], dtype=np.int64))
    merged = graph.const("const.heads_merge", np.array([0, 0, -1], dtype=np.int64))
    y = graph.op1("Reshape", [x, split], f"{name}/Reshape")
    y = rms_norm(graph, module, y, name, eps)
    return graph.op1("Reshape", [y, merged], f"{name}/Reshape")


@dataclass
class Context:
    """What every layer's attention reads, built once from the graph inputs."""

    gqa: bool
    seqlens_k: str = ""
    """GroupQueryAttention: int32 ``[batch]``, tokens per row minus one."""
    total_len: str = ""
    """GroupQueryAttention: int32 scalar, the mask's length (past + new)."""
    cos: str = ""
    sin: str = ""
    """GroupQueryAttention: the ``[positions, dim / 2]`` tables."""
    cos_rows: str = ""
    sin_rows: str = ""
    """Plain attention: ``[seq, dim]`` rows of this call's positions."""
    past_len: str = ""
    """Plain attention: int64 scalar, the cache's length."""
    masks: dict[int, str] = field(default_factory=dict)
    """Plain attention: sliding window (-1 none) -> additive ``[batch, 1, seq, total]`` mask."""

    def mask_bias(self, graph: Graph, window: int) -> str:
        """The additive mask (0 or :data:`MASKED`) of a layer with this sliding window."""
        if window not in self.masks:
            self.masks[window] = plain_mask(graph, self.past_len, window)
        return self.masks[window]


def context(graph: Graph, model: nn.Module) -> Context:
    """The attention :class:`Context`: GroupQueryAttention's mask lengths and rotary tables, or the
    plain path's positions and rotary rows."""
    config = model.config
    cos, sin = rotary_tables(model)
    TP = _onnx().TensorProto
    if uses_gqa(config):
        one = graph.const("const.one_i64", np.array(1, dtype=np.int64))
        axis = graph.const("const.axis_1", np.array([1], dtype=np.int64))
        lengths = graph.op1("ReduceSum", [INPUT_NAMES["attention_mask"], axis], "attn_mask/ReduceSum", keepdims=0)
        seqlens = graph.op1("Cast", [graph.op1("Sub", [lengths, one], "attn_mask/Sub")], "attn_mask/Cast", to=TP.INT32)
        shape = graph.op1("Shape", [INPUT_NAMES["attention_mask"]], "attn_mask/Shape")
        total = graph.op1("Cast", [graph.op1("Gather", [shape, one], "attn_mask/Gather", axis=0)], "attn_mask/Cast",
                          to=TP.INT32)
        return Context(True, seqlens, total, graph.const("cos_cache", cos), graph.const("sin_cache", sin))
    past_len = graph.op1("Shape", [PAST_KEY % 0], "positions/past_len", start=2, end=3)
    seq_len = graph.op1("Shape", [INPUT_NAMES["input_ids"]], "positions/seq_len", start=1, end=2)
    scalar = graph.const("const.scalar_shape", np.array([], np.int64))
    start = graph.op1("Reshape", [past_len, scalar], "positions/start")
    end = graph.op1("Add", [start, graph.op1("Reshape", [seq_len, scalar], "positions/len")], "positions/end")
    positions = graph.op1("Range", [start, end, graph.const("const.one_i64", np.array(1, np.int64))],
                          "positions/Range")
    full_cos = graph.const("cos_table", np.concatenate([cos, cos], axis=-1))
    full_sin = graph.const("sin_table", np.concatenate([sin, sin], axis=-1))
    return Context(False, cos_rows=graph.op1("Gather", [full_cos, positions], "positions/cos", axis=0),
                   sin_rows=graph.op1("Gather", [full_sin, positions], "positions/sin", axis=0), past_len=start)


def plain_mask(graph: Graph, past_len: str, window: int) -> str:
    """Additive ``[batch, 1, seq, total]`` mask: query ``i`` (position ``past + i``) sees key ``j`` when
    ``j <= past + i`` (and ``j > past + i - window`` with a sliding window) and the attention mask
    of ``j`` is 1; :data:`MASKED` elsewhere."""
    mask = INPUT_NAMES["attention_mask"]
    one = graph.const("const.one_i64", np.array(1, np.int64))
    zero = graph.const("const.zero_i64", np.array(0, np.int64))
    name = f"mask_w{window}"
    total = graph.op1("Reshape", [graph.op1("Shape", [mask], f"{name}/total", start=1, end=2),
                                  graph.const("const.scalar_shape", np.array([], np.int64))], f"{name}/total_scalar")
    keys = graph.op1("Range", [zero, total, one], f"{name}/keys")  # [total]
    seq = graph.op1("Sub", [total, past_len], f"{name}/seq")
    queries = graph.op1("Add", [graph.op1("Range", [zero, seq, one], f"{name}/queries"), past_len],
                        f"{name}/query_pos")
    queries = graph.op1("Unsqueeze", [queries, graph.const("const.axis_last", np.array([-1], np.int64))],
                        f"{name}/query_col")  # [seq, 1]
    allowed = graph.op1("LessOrEqual", [keys, queries], f"{name}/causal")
    if window > 0:
        lowest = graph.op1("Sub", [queries, graph.const(f"const.window_{window}", np.array(window, np.int64))],
                           f"{name}/window_start")
        allowed = graph.op1("And", [allowed, graph.op1("Greater", [keys, lowest], f"{name}/window")],
                            f"{name}/and_window")
    present = graph.op1("Cast", [mask], f"{name}/mask_bool", to=_onnx().TensorProto.BOOL)
    present = graph.op1("Unsqueeze", [present, graph.const("const.axes_1_2", np.array([1, 2], np.int64))],
                        f"{name}/mask_4d")  # [batch, 1, 1, total]
    allowed = graph.op1("And", [allowed, present], f"{name}/and_padding")
    return graph.op1("Where", [allowed, graph.const("const.f32_zero", np.array(0.0, np.float32)),
                               graph.const("const.f32_masked", np.array(MASKED, np.float32))], f"{name}/bias")


def uses_gqa(config: Any) -> bool:
    """Whether attention is written as GroupQueryAttention (its CPU kernel needs a head size that is a
    multiple of :data:`GQA_HEAD_MULTIPLE`) rather than plain ONNX ops."""
    return head_dim(config) % GQA_HEAD_MULTIPLE == 0


def attention(graph: Graph, model: nn.Module, i: int, x: str, ctx: Context) -> str:
    """Layer ``i``'s self-attention on the normalized ``x``; adds its present outputs."""
    config = model.config
    attn = model.model.layers[i].self_attn
    prefix = f"model.layers.{i}.self_attn"
    dim, eps = head_dim(config), float(config.rms_norm_eps)
    q, k, v = (linear(graph, getattr(attn, p), x, f"{prefix}.{p}") for p in ("q_proj", "k_proj", "v_proj"))
    if ARCHS[config.model_type].qk_norm:
        q = head_norm(graph, attn.q_norm, q, f"{prefix}.q_norm", eps, dim)
        k = head_norm(graph, attn.k_norm, k, f"{prefix}.k_norm", eps, dim)
    scale = float(getattr(attn, "scaling", dim ** -0.5))
    presents = [PRESENT_KEY % i, PRESENT_VALUE % i]
    if ctx.gqa:
        out = graph.op(
            "GroupQueryAttention", [q, k, v, PAST_KEY % i, PAST_VALUE % i, ctx.seqlens_k, ctx.total_len,
                                    ctx.cos, ctx.sin], 3,
            f"{prefix}/GroupQueryAttention", MS_DOMAIN, [f"{prefix}/attn_output", *presents],
            num_heads=int(config.num_attention_heads), kv_num_heads=_kv_heads(config), scale=scale, do_rotary=1,
            rotary_interleaved=0, local_window_size=sliding_window(config, i))[0]
    else:
        out = plain_attention(graph, config, i, (q, k, v), ctx, scale, prefix)
    return linear(graph, attn.o_proj, out, f"{prefix}.o_proj")


def plain_attention(graph: Graph, config: Any, i: int, qkv: tuple[str, str, str], ctx: Context, scale: float,
                    prefix: str) -> str:
    """Causal grouped-query attention with a KV cache in plain ONNX ops (rotary embedding, cache
    concat, key/value heads repeated, additive mask of the causal window and the padding)."""
    heads, kv, dim = int(config.num_attention_heads), _kv_heads(config), head_dim(config)
    q, k, v = (split_heads(graph, t, dim, f"{prefix}/{n}") for t, n in zip(qkv, "qkv"))
    q, k = (rotate(graph, t, ctx, f"{prefix}/{n}_rotary") for t, n in ((q, "q"), (k, "k")))
    keys = graph.op1("Concat", [PAST_KEY % i, k], f"{prefix}/present_key", axis=2,
                     outputs=[PRESENT_KEY % i])
    values = graph.op1("Concat", [PAST_VALUE % i, v], f"{prefix}/present_value", axis=2,
                       outputs=[PRESENT_VALUE % i])
    if heads != kv:
        keys, values = (repeat_kv(graph, t, heads // kv, heads, dim, f"{prefix}/{n}_repeat")
                        for t, n in ((keys, "k"), (values, "v")))
    scores = graph.op1("MatMul", [q, graph.op1("Transpose", [keys], f"{prefix}/kT", perm=[0, 1, 3, 2])],
                       f"{prefix}/QK")
    scores = graph.op1("Mul", [scores, graph.const(f"const.scale_{scale!r}", np.array(scale, np.float32))],
                       f"{prefix}/scale")
    scores = graph.op1("Add", [scores, ctx.mask_bias(graph, sliding_window(config, i))], f"{prefix}/mask")
    probs = graph.op1("Softmax", [scores], f"{prefix}/Softmax", axis=-1)
    out = graph.op1("MatMul", [probs, values], f"{prefix}/PV")
    out = graph.op1("Transpose", [out], f"{prefix}/out_transpose", perm=[0, 2, 1, 3])
    return graph.op1("Reshape", [out, graph.const("const.heads_merge", np.array([0, 0, -1], np.int64))],
                     f"{prefix}/out_reshape")


def split_heads(graph: Graph, x: str, dim: int, name: str) -> str:
    """``[batch, seq, heads * dim]`` -> ``[batch, heads, seq, dim]``."""
    shape = graph.const(f"const.heads_split_{dim}", np.array([0, 0, -1, dim], np.int64))
    return graph.op1("Transpose", [graph.op1("Reshape", [x, shape], f"{name}/Reshape")], f"{name}/Transpose",
                     perm=[0, 2, 1, 3])


def rotate(graph: Graph, x: str, ctx: Context, name: str) -> str:
    """NeoX-style rotary embedding of ``[batch, heads, seq, dim]``: ``x * cos + rotate_half(x) * sin``
    at the positions of this call (past length on)."""
    first, second = graph.op("Split", [x], 2, f"{name}/Split", axis=-1, num_outputs=2)
    rotated = graph.op1("Concat", [graph.op1("Neg", [second], f"{name}/Neg"), first], f"{name}/Concat", axis=-1)
    return graph.op1("Add", [graph.op1("Mul", [x, ctx.cos_rows], f"{name}/cos"),
                             graph.op1("Mul", [rotated, ctx.sin_rows], f"{name}/sin")], f"{name}/Add")


def repeat_kv(graph: Graph, x: str, groups: int, heads: int, dim: int, name: str) -> str:
    """``[batch, kv, total, dim]`` -> ``[batch, kv * groups, total, dim]``, each head repeated."""
    axes = graph.const("const.axis_2", np.array([2], np.int64))
    grow = graph.const(f"const.repeat_{groups}", np.array([1, 1, groups, 1, 1], np.int64))
    shape = graph.const(f"const.repeat_shape_{heads}_{dim}", np.array([0, heads, -1, dim], np.int64))
    y = graph.op1("Expand", [graph.op1("Unsqueeze", [x, axes], f"{name}/Unsqueeze"), grow], f"{name}/Expand")
    return graph.op1("Reshape", [y, shape], f"{name}/Reshape")


def mlp(graph: Graph, block: nn.Module, x: str, prefix: str) -> str:
    """``down(silu(gate(x)) * up(x))``."""
    gate = linear(graph, block.mlp.gate_proj, x, f"{prefix}.mlp.gate_proj")
    up = linear(graph, block.mlp.up_proj, x, f"{prefix}.mlp.up_proj")
    silu = graph.op1("Mul", [gate, graph.op1("Sigmoid", [gate], f"{prefix}.mlp/Sigmoid")], f"{prefix}.mlp/SiLU")
    return linear(graph, block.mlp.down_proj, graph.op1("Mul", [silu, up], f"{prefix}.mlp/Mul"),
                  f"{prefix}.mlp.down_proj")


def quantized_head(model: nn.Module, bits: int) -> nn.Module:
    """``model.lm_head`` quantized with symmetric RTN (``bits`` 8: per channel; 4: block
    :data:`LM_HEAD_BLOCK_4BIT`), float32 scales, its bias kept: the head :func:`write` writes for
    ``lm_head_bits``."""
    from qcore.quant.linear import QuantLinear
    from qcore.quant.primitives import quantize_rtn

    head = model.lm_head
    qw = quantize_rtn(head.weight.detach().float().cpu(), bits, -1 if bits == 8 else LM_HEAD_BLOCK_4BIT, True)
    bias = getattr(head, "bias", None)
    return QuantLinear.from_quantized(qw, None if bias is None else bias.detach().float().cpu(),
                                      scale_dtype=torch.float32)


def build_graph(model: nn.Module, lm_head_bits: int | None = None) -> Graph:
    """Every node and initializer of the decoder (see the module docstring); ``lm_head_bits``: see
    :func:`write`."""
    config = model.config
    graph = Graph()
    eps = float(config.rms_norm_eps)
    ctx = context(graph, model)
    embed = graph.const("model.embed_tokens.weight", float32(model.model.embed_tokens.weight))
    h = graph.op1("Gather", [embed, INPUT_NAMES["input_ids"]], "model.embed_tokens/Gather")
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        x = rms_norm(graph, block.input_layernorm, h, f"{prefix}.input_layernorm", eps)
        h = graph.op1("Add", [h, attention(graph, model, i, x, ctx)], f"{prefix}/attn_residual")
        x = rms_norm(graph, block.post_attention_layernorm, h, f"{prefix}.post_attention_layernorm", eps)
        h = graph.op1("Add", [h, mlp(graph, block, x, prefix)], f"{prefix}/mlp_residual")
    x = rms_norm(graph, model.model.norm, h, "model.norm", eps)
    head = model.lm_head if lm_head_bits is None else quantized_head(model, lm_head_bits)
    if _tied(model) and not _is_quantized(head):
        y = graph.op1("FusedMatMul", [x, embed], "lm_head/MatMul", MS_DOMAIN, transB=1)
    else:
        y = linear(graph, head, x, "lm_head")
    graph.op("Identity", [y], 1, "logits", outputs=[LOGITS])
    return graph


def _tied(model: nn.Module) -> bool:
    head = getattr(model.lm_head, "weight", None)
    return head is not None and head is model.model.embed_tokens.weight


def _is_quantized(module: nn.Module) -> bool:
    from qcore.quant.linear import QuantLinear

    return isinstance(module, QuantLinear)


def _onnx() -> Any:
    import onnx

    return onnx


def model_proto(model: nn.Module, lm_head_bits: int | None = None) -> Any:
    """The ONNX ``ModelProto`` of ``model`` (tensors inline; :func:`write` moves them out;
    ``lm_head_bits``: see :func:`write`)."""
    import qcore

    onnx = _onnx()
    helper, TP = onnx.helper, onnx.TensorProto
    config = model.config
    graph = build_graph(model, lm_head_bits)
    kv, dim = _kv_heads(config), head_dim(config)
    inputs = [helper.make_tensor_value_info(INPUT_NAMES["input_ids"], TP.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info(INPUT_NAMES["attention_mask"], TP.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info(LOGITS, TP.FLOAT, ["batch_size", "sequence_length",
                                                                 int(config.vocab_size)])]
    for i in range(int(config.num_hidden_layers)):
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            inputs.append(helper.make_tensor_value_info(past % i, TP.FLOAT,
                                                        ["batch_size", kv, "past_sequence_length", dim]))
            outputs.append(helper.make_tensor_value_info(present % i, TP.FLOAT,
                                                         ["batch_size", kv, "total_sequence_length", dim]))
    body = helper.make_graph(graph.nodes, f"qcore-{config.model_type}", inputs, outputs,
                             list(graph.initializers.values()))
    proto = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
                              producer_name="qcore", producer_version=str(qcore.__version__))
    proto.ir_version = min(proto.ir_version, 10)  # read by onnxruntime releases from 1.20 on
    return proto


# -- genai_config ---------------------------------------------------------------------------------
def genai_config(model: nn.Module) -> dict[str, Any]:
    """``genai_config.json``: what onnxruntime-genai reads to run the decoder greedily on CPU."""
    config = model.config
    context = int(config.max_position_embeddings)
    ids = {k: getattr(config, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    eos = ids["eos"]
    pad = ids["pad"] if ids["pad"] is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": ids["bos"], "context_length": context, "eos_token_id": eos, "pad_token_id": pad,
            "type": ARCHS[config.model_type].genai_type, "vocab_size": int(config.vocab_size),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": head_dim(config), "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads), "num_hidden_layers":
                    int(config.num_hidden_layers), "num_key_value_heads": _kv_heads(config),
                "inputs": {**INPUT_NAMES, "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"do_sample": False, "early_stopping": True, "max_length": context, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


# -- write ----------------------------------------------------------------------------------------
def write(model: nn.Module, target: Path, tokenizer: Any = None, *, lm_head_bits: int | None = None) -> None:
    """Write ``model`` into the folder ``target`` (see the module docstring).

    ``lm_head_bits``: None writes a float LM head as it is (float32); 8 or 4 quantize it here with
    symmetric RTN (:func:`quantized_head`) and write it as MatMulNBits (the embedding's Gather still
    reads the float table): less read per generated token, no longer qcore's logits. With
    :data:`ACCURACY_LEVEL` 0, onnxruntime's CPU runs 8-bit MatMulNBits slower than the float head
    (see the module docstring); 4 bits are the fast choice there."""
    from qcore.checkpoint.atomic import write_json
    from qcore.formats import ExportError
    from qcore.formats import compressed_tensors as ct

    reasons = check(model, lm_head_bits=lm_head_bits)
    if reasons:
        raise ExportError(f"format {FORMAT!r} cannot hold this model: " + "; ".join(reasons))
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    proto = model_proto(model, lm_head_bits)
    _onnx().save_model(proto, str(target / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                       location=DATA_FILE, size_threshold=INLINE_BYTES)
    write_json(target / GENAI_CONFIG_FILE, genai_config(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    else:
        logger.warning("onnx: no tokenizer given: onnxruntime-genai needs the tokenizer files beside the model; "
                       "pass tokenizer= (the CLI exports the checkpoint's own)")
    counts = _op_counts(proto.graph.node)
    logger.info("onnx: wrote %s (%s)", target / MODEL_FILE,
                ", ".join(f"{n} x {op}" for op, n in sorted(counts.items())
                          if op in ("MatMulNBits", "MatMulInteger", "FusedMatMul")))
    if not ct.quantized_layers(model):
        logger.info("onnx: the model has no quantized layers: every linear is written in float32")


def _op_counts(nodes: Iterator[Any]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        counts[node.op_type] += 1
    return counts

