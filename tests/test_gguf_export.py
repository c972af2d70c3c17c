"""Export to GGUF (qcore.formats.gguf): the blocks hold qcore's integer codes exactly, float16 block
scales are the only change (bounded by float16's unit roundoff), transformers' GGUF reader computes
qcore's logits and perplexity, the tokenizer survives, and what GGUF cannot hold is refused before
anything is written. Where llama-cpp-python is importable, llama.cpp itself runs every export too
(tokenizer, logits, perplexity); elsewhere those tests skip."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import qcore
from qcore.cli import main
from qcore.formats import ExportError, check_export
from qcore.formats import gguf as gguf_format
from qcore.formats.compressed_tensors import quantized_layers
from qcore.quant.linear import BACKEND_ENV, QuantLinear
from qcore.quant.primitives import QuantizedWeight
from qcore.testing import STORIES_DIR, TINYSTORIES_TXT, max_relative_error, requires_shared, tiny_calibration
from qcore.tiny import tiny_inputs, tiny_model

gguf = pytest.importorskip("gguf")

FORMAT = "gguf"
U = gguf_format.FP16_UNIT
"""float16's unit roundoff, 2**-11: a normal value moves by at most this fraction when rounded."""
F32_SLACK = 8 * 2.0 ** -24
"""Room for float32 arithmetic in the two dequantizations compared (a few roundings each)."""
FP16_REL_BOUND = 4 * U
"""Max |GGUF - qcore| / max |qcore| of a layer. Q4_0 / Q8_0 round only d: |error| <= U * |weight|.
Q4_1 rounds d and m = -s*z: |d*q + m - s*(q - z)| <= U*s*(q + z) <= 30*U*s, while a group's largest
|s*(q - z)| is at least 8*s when its codes reach 0 and 15 (min/max grids, clipped or not): at most
3.75*U. Measured 0.81-0.91*U (3.97e-4 to 4.54e-4) on every asymmetric case and stories260K, and 0 on
symmetric ones (bfloat16 / float16 scales are exact in float16)."""
LOGIT_ATOL: dict[bool, float] = {True: 1e-5, False: 1e-3}
"""Max |logit difference|, transformers (float32, dequantized GGUF) vs qcore's ``reference``
backend, by symmetric export: symmetric layers are exact (measured 0.0: bfloat16 / float16 scales
convert to float16 exactly); asymmetric ones carry Q4_1's float16 offsets (measured up to 2.0e-4
on logits of magnitude ~0.6)."""

GEMMA2: dict[str, Any] = {"head_dim": 256, "query_pre_attn_scalar": 256, "tie_word_embeddings": True}
CASES: dict[str, dict[str, Any]] = {
    "llama-rtn-w4g32-asym": {"family": "llama", "bits": 4, "group_size": 32, "sym": False},
    "llama-rtn-w4g32-sym": {"family": "llama", "bits": 4, "group_size": 32, "sym": True},
    "llama-rtn-w8g32-sym": {"family": "llama", "bits": 8, "group_size": 32, "sym": True},
    "llama-gptq-w4g64-asym": {"family": "llama", "method": "gptq", "bits": 4, "group_size": 64, "sym": False},
    "qwen2-rtn-w4g32-asym": {"family": "qwen2", "bits": 4, "group_size": 32, "sym": False},
    "llama-rtn-w4g128-sym-wide": {"family": "llama", "model": {"hidden_size": 128, "num_attention_heads": 8,
                                                                "num_key_value_heads": 4},
                                  "bits": 4, "group_size": 128, "sym": True},
    "qwen2-rtn-w4g64-sym-tied": {"family": "qwen2", "model": {"tie_word_embeddings": True}, "bits": 4,
                                 "group_size": 64, "sym": True},
    "qwen2-rtn-w8g32-sym": {"family": "qwen2", "bits": 8, "group_size": 32, "sym": True},
    "qwen2-gptq-w4g32-sym": {"family": "qwen2", "method": "gptq", "bits": 4, "group_size": 32, "sym": True},
    "qwen3-rtn-w4g32-asym": {"family": "qwen3", "model": {"head_dim": 128}, "bits": 4, "group_size": 32, "sym": False},
    "mistral-rtn-w4g32-asym": {"family": "mistral", "bits": 4, "group_size": 32, "sym": False},
    "phi3-rtn-w4g32-asym": {"family": "phi3", "bits": 4, "group_size": 32, "sym": False},
    "gemma2-rtn-w4g32-asym": {"family": "gemma2", "model": GEMMA2, "bits": 4, "group_size": 32, "sym": False},
}
"""Tiny models exported. qwen3 gets head_dim 128: transformers' GGUF reader does not read
``attention.key_length`` for qwen3 and builds Qwen3Config's default head_dim (128); gemma2 likewise
gets Gemma2Config's default query_pre_attn_scalar (256), which llama.cpp takes from head_dim."""


def quantized(family: str = "llama", method: str = "rtn", model: dict[str, Any] | None = None,
              **options: Any) -> nn.Module:
    """A tiny ``family`` model (config ``model`` overrides) quantized by ``method`` with ``options``."""
    built = tiny_model(family, **(model or {}))
    if method == "gptq":
        options["calibration"] = tiny_calibration()
    qcore.quantize(built, method, **options)
    return built


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = quantized(**CASES[request.param])
    out = qcore.export(model, tmp_path_factory.mktemp(request.param) / "model.gguf", FORMAT)
    return model, out


def gguf_tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def unpack_blocks(data: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] as qcore stores them, d [out, blocks], m [out, blocks])`` of raw GGUF
    rows, read by the byte layout of ggml's block_q4_0 / block_q4_1 / block_q8_0."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    raw = torch.from_numpy(np.array(data)).reshape(data.shape[0], -1, size)
    d = raw[..., :2].contiguous().view(torch.float16).squeeze(-1)
    m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if qtype == "Q4_1" else torch.zeros_like(d)
    if qtype == "Q8_0":
        codes = raw[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128
    else:
        qs = raw[..., size - 16:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int16)
    return codes.reshape(data.shape[0], -1), d, m


def layer_order(model: nn.Module, name: str, rows: int) -> torch.Tensor:
    """The row order written for layer ``name`` (llama's q/k permutation, else identity)."""
    order = gguf_format.qk_permutation(model, f"{name}.weight", rows)
    return torch.arange(rows) if order is None else order


def test_blocks_hold_qcore_codes_exactly_and_scales_within_fp16_rounding(exported: tuple[nn.Module, Path]) -> None:
    model, out = exported
    tensors = gguf_tensors(out)
    layers = quantized_layers(model)
    assert layers
    worst = 0.0
    for name, layer in layers.items():
        t = tensors[gguf_format.gguf_name(model, f"{name}.weight")]
        qtype = t.tensor_type.name
        qw = layer.quantized_weight()
        assert qtype == ("Q8_0" if layer.bits == 8 else "Q4_0" if layer.sym else "Q4_1"), name
        order = layer_order(model, name, layer.out_features)
        codes, d, m = unpack_blocks(t.data, qtype)
        assert torch.equal(codes, qw.codes[order].to(torch.int16)), name  # the codes, exactly
        rep = layer.group_size // 32
        scales = qw.scales[order].double().repeat_interleave(rep, dim=1)
        zeros = qw.zeros[order].double().repeat_interleave(rep, dim=1)
        assert torch.equal(d, scales.to(torch.float16)), name  # each block: its group's scale, rounded once
        if qtype == "Q4_1":
            assert torch.equal(m, (-scales * zeros).to(torch.float16)), name
        # what llama.cpp computes (gguf's reference dequantization) against qcore's own weight
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).double()
        ref = layer.dequantize_weight()[order].double()
        q = codes.double().reshape(layer.out_features, -1, 32)
        s = scales.unsqueeze(-1)
        z = (zeros if qtype == "Q4_1" else torch.zeros_like(zeros)).unsqueeze(-1)
        eff = (q if qtype == "Q4_1" else q - 2 ** (layer.bits - 1)).abs()
        bound = (U * s * (eff + z) + F32_SLACK * s * (eff + z + 1) + gguf_format.FP16_TINY * (eff + 1))
        diff = (got.reshape_as(q) - ref.reshape_as(q)).abs()
        assert bool((diff <= bound).all()), f"{name}: {float((diff - bound).max()):.3g} past the fp16 bound"
        err = max_relative_error(got, ref)
        assert err == pytest.approx(gguf_format.fp16_rounding(layer), abs=1e-6), name
        stored = layer.scales_zeros()[0].float()
        if layer.sym and torch.equal(stored.to(torch.float16).float(), stored):
            assert torch.equal(got.float(), ref.float()), name  # fp16-exact scales: bit-identical weights
        worst = max(worst, err)
    assert worst <= FP16_REL_BOUND, worst
    print(f"fp16 block-scale rounding: max relative weight error {worst:.3g} ({worst / U:.2f} x 2^-11)")
    field = gguf.GGUFReader(str(out)).fields["qcore.export.fp16_scale_max_rel_error"]
    assert field.contents() == pytest.approx(worst, rel=1e-5, abs=1e-9)


def test_float_tensors_and_metadata(exported: tuple[nn.Module, Path]) -> None:
    model, out = exported
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, gguf_format.ARCHS[config.model_type].gguf_arch)]
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == arch
    expected = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
                "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
                "attention.head_count": config.num_attention_heads,
                "attention.head_count_kv": config.num_key_value_heads, "vocab_size": config.vocab_size}
    for key, value in expected.items():
        assert fields[f"{arch}.{key}"] == value, key
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(gguf_format._rope(config)["rope_theta"])
    assert tensors["token_embd.weight"].tensor_type.name == "F32"
    assert torch.equal(torch.from_numpy(np.array(tensors["token_embd.weight"].data)),
                       model.get_input_embeddings().weight.detach())
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    shift = gguf_format.ARCHS[config.model_type].norm_shift  # gemma2: llama.cpp multiplies by the weight itself
    assert torch.equal(torch.from_numpy(np.array(tensors["output_norm.weight"].data)),
                       model.model.norm.weight.detach() + shift)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == head_dim
    assert ("output.weight" in tensors) != bool(config.tie_word_embeddings)
    main_type = max(gguf_format.FILE_TYPES, key=lambda q: sum(t.tensor_type.name == q for t in reader.tensors))
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, gguf_format.FILE_TYPES[main_type]))


def qcore_logits(model: nn.Module, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setenv(BACKEND_ENV, "reference")  # float32 matmul with the dequantized weights
    with torch.no_grad():
        return model(ids).logits


def transformers_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_transformers_reads_the_gguf_and_computes_qcore_logits(
        exported: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, out = exported
    ids = tiny_inputs(model)
    want = qcore_logits(model, ids, monkeypatch)
    with torch.no_grad():
        got = transformers_model(out)(ids).logits
    symmetric = all(layer.sym for layer in quantized_layers(model).values())
    diff = (got - want).abs().max().item()
    assert diff <= LOGIT_ATOL[symmetric], f"max |logit diff| {diff:.3g} > {LOGIT_ATOL[symmetric]}"


def test_llama_qk_rows_are_permuted_into_llama_cpp_rotary_order() -> None:
    """llama.cpp's converter permutes HF q/k rows (LlamaModel.permute); transformers' reader undoes
    it. Without it the logits above would differ; here the order itself: head h's rows
    ``h*d + (0, d/2, 1, d/2+1, ...)``."""
    model = quantized("llama", bits=4, group_size=32)
    order = gguf_format.qk_permutation(model, "model.layers.0.self_attn.q_proj.weight", 64)
    assert order is not None and order[:4].tolist() == [0, 8, 1, 9] and order[16:18].tolist() == [16, 24]
    assert gguf_format.qk_permutation(model, "model.layers.0.self_attn.v_proj.weight", 32) is None
    k_order = gguf_format.qk_permutation(model, "model.layers.0.self_attn.k_proj.weight", 32)
    assert k_order is not None and sorted(k_order.tolist()) == list(range(32))  # 2 kv heads of 16
    assert gguf_format.qk_permutation(quantized("qwen2", bits=4, group_size=32),
                                      "model.layers.0.self_attn.q_proj.weight", 64) is None


# -- refusals -------------------------------------------------------------------------------------
REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "per-channel": ({"bits": 4, "group_size": -1}, r"per-channel scales.*--group-size 32, 64 or 128"),
    "8-bit asym": ({"bits": 8, "group_size": 32, "sym": False}, r"8-bit asymmetric.*--sym"),
    "3-bit": ({"bits": 3, "group_size": 32}, r"3-bit weights.*bits=4"),
    "act-order": ({"method": "gptq", "bits": 4, "group_size": 32, "static_groups": False}, r"act-order"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_gguf_cannot_hold_is_refused_with_the_fix_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    options, pattern = REFUSALS[case]
    model = quantized("llama", **options)
    reasons = check_export(model, FORMAT)
    assert reasons and any(re.search(pattern, r) for r in reasons), reasons
    with pytest.raises(ExportError, match=pattern):
        qcore.export(model, tmp_path / "model.gguf", FORMAT)
    assert list(tmp_path.iterdir()) == []


def test_a_group_size_that_is_no_multiple_of_32_is_refused_with_the_fix(tmp_path: Path) -> None:
    model = quantized("llama", bits=4, group_size=32)
    old = model.model.layers[0].self_attn.q_proj
    codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    qw = QuantizedWeight(codes, torch.full((64, 4), 0.01), torch.full((64, 4), 8.0), 4, 16, True)
    model.model.layers[0].self_attn.q_proj = QuantLinear.from_quantized(qw, old.bias)
    with pytest.raises(ExportError, match=r"group size 16.*--group-size 32, 64 or 128.*q_proj"):
        qcore.export(model, tmp_path / "model.gguf", FORMAT)
    assert list(tmp_path.iterdir()) == []


def gemma_model() -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_unsupported_architectures_are_refused(family: str, tmp_path: Path) -> None:
    model = gemma_model() if family == "gemma" else tiny_model(family)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    with pytest.raises(ExportError, match=f"architecture '{family}'.*(compressed-tensors|qcore.save|unverified)"):
        qcore.export(model, tmp_path / "model.gguf", FORMAT)
    assert list(tmp_path.iterdir()) == []


def test_gemma2_settings_llama_cpp_would_run_differently_are_refused() -> None:
    untied = quantized("gemma2", bits=4, group_size=32)  # llama.cpp's gemma2 has no output tensor
    assert any("lm_head not tied" in r and "lm_head.weight" in r for r in check_export(untied, FORMAT))
    scaled = quantized("gemma2", model={"tie_word_embeddings": True, "query_pre_attn_scalar": 32}, bits=4,
                       group_size=32)
    assert any("query_pre_attn_scalar 32" in r for r in check_export(scaled, FORMAT))
    assert check_export(quantized("gemma2", model={"tie_word_embeddings": True}, bits=4, group_size=32), FORMAT) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_float_tensors_keep_their_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_model("llama").to(dtype)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    tensors = gguf_tensors(qcore.export(model, tmp_path / "model.gguf", FORMAT))
    embed, head = tensors["token_embd.weight"], tensors["output.weight"]
    assert embed.tensor_type.name == head.tensor_type.name == {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    got = torch.from_numpy(gguf.quants.dequantize(embed.data, embed.tensor_type))
    assert torch.equal(got, model.model.embed_tokens.weight.float())


def test_a_failed_write_leaves_nothing_and_an_existing_file_is_kept(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized("llama", bits=4, group_size=32)
    out = tmp_path / "model.gguf"
    with monkeypatch.context() as patch:
        patch.setattr(gguf_format, "block_tensor", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            qcore.export(model, out, FORMAT)
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed
    qcore.export(model, out, FORMAT)
    before = out.read_bytes()
    with pytest.raises(ExportError, match="overwrite"):
        qcore.export(model, out, FORMAT)
    assert out.read_bytes() == before
    with pytest.raises(ExportError, match="folder"):
        qcore.export(model, tmp_path, FORMAT)


# -- tokenizers -----------------------------------------------------------------------------------
BPE_TEXT = ("Once upon a time there was a little girl named Lily. She liked to play outside in the sun. "
            "One day, 12 birds came and sang 345 songs; she didn't stop smiling!\n\n") * 20
BPE_VOCAB = 320
"""Embedding rows of the models given the byte-level BPE tokenizer (300 tokens, padded in the GGUF)."""


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer (GPT-2 / Qwen style, 300 tokens) trained on :data:`BPE_TEXT`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([BPE_TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_a_byte_level_bpe_tokenizer_survives(bpe_tokenizer: Any, tmp_path: Path) -> None:
    """A byte-level BPE tokenizer becomes tokenizer.ggml.model gpt2 with its merges, padded to the
    embedding rows; transformers' GGUF tokenizer then encodes text as the original does."""
    from transformers import AutoTokenizer

    tok = bpe_tokenizer
    model = tiny_model("qwen2", vocab_size=BPE_VOCAB)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    out = qcore.export(model, tmp_path / "q.gguf", FORMAT, tokenizer=tok)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == BPE_VOCAB and tokens[-1] == f"[PAD{BPE_VOCAB - 1}]"
    first = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"][0]
    assert fields["tokenizer.ggml.merges"][0] == (first if isinstance(first, str) else " ".join(first))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "tokenizer.ggml.add_space_prefix" not in fields
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert theirs(BPE_TEXT).input_ids == tok(BPE_TEXT).input_ids


# -- llama.cpp itself (llama-cpp-python, when installed) -------------------------------------------
LLAMA_CPP_REL_TOL = 0.03
"""Max |llama.cpp logit - qcore logit| / max |qcore logit| on the tiny models. ggml's CPU matmul
quantizes activations to 8 bits per 32 (Q8_0 / Q8_1) against Q4/Q8 weights, and gemma2's GELU goes
through a float16 table, so it is not exact: measured 0.0053-0.0082 (llama, mistral, phi3, qwen2),
0.0099 (qwen3), 0.018 (gemma2). :data:`GGML_EXACT_TOL` checks the same runs against ggml's
arithmetic; a wrong row order, nibble order or offset gives errors of order one."""


LLAMA3_ROPE: dict[str, Any] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""Llama 3.1's rope scaling on a tiny model (an original context of 64, so that every band occurs)."""
LLAMA_CPP_CASES: dict[str, dict[str, Any]] = {
    **CASES,
    "llama-rtn-w4g32-asym-llama3-rope": {"family": "llama", "model": {"rope_parameters": LLAMA3_ROPE}, "bits": 4,
                                         "group_size": 32, "sym": False},
}
""":data:`CASES` plus llama3 rope scaling, which only llama.cpp reads (``rope_freqs.weight``)."""


def test_llama3_rope_scaling_becomes_llama_cpp_rope_freqs(tmp_path: Path) -> None:
    """The factors llama.cpp divides each rotary frequency by, as its converter computes them from
    the config (wavelengths below original_context / high_freq_factor kept, above
    original_context / low_freq_factor divided by factor, smoothly in between)."""
    import math

    model = quantized(**LLAMA_CPP_CASES["llama-rtn-w4g32-asym-llama3-rope"])
    tensors = gguf_tensors(qcore.export(model, tmp_path / "model.gguf", FORMAT))
    got = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    r = LLAMA3_ROPE
    dim = model.config.head_dim
    want = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * r["rope_theta"] ** (i / dim)
        ctx = r["original_max_position_embeddings"]
        if wavelen < ctx / r["high_freq_factor"]:
            want.append(1.0)
        elif wavelen > ctx / r["low_freq_factor"]:
            want.append(r["factor"])
        else:
            smooth = (ctx / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
            want.append(1 / ((1 - smooth) / r["factor"] + smooth))
    assert len(set(want)) > 2  # all three bands occur
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
    assert "rope_freqs.weight" not in gguf_tensors(qcore.export(quantized("llama", bits=4, group_size=32),
                                                                tmp_path / "plain.gguf", FORMAT))
    yarn = quantized("llama", model={"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "original_max_position_embeddings": 32}},
                     bits=4, group_size=32)
    assert any("rope scaling 'yarn'" in r for r in check_export(yarn, FORMAT))


def llama_cpp_model(path: Path) -> Any:
    """llama.cpp's model of the GGUF at ``path`` (llama-cpp-python), logits of every position kept,
    float32 KV cache (its default float16 cache adds its own rounding)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                           n_threads=1, type_k=0, type_v=0)


def llama_cpp_logits(llm: Any, rows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits of every position of each row of token ids."""
    out = []
    for ids in rows.tolist():
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(np.array(llm.scores[: len(ids)])))
    return torch.stack(out)


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood of each next token."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


GGML_EXACT_TOL = 1e-4
"""Max relative logit error, llama.cpp vs qcore with ggml's arithmetic emulated (:func:`ggml_matmul`):
measured 2.3e-7 to 6.5e-6 (float32 summation order), 1.8e-5 with llama3 rope factors (ggml's float
rotary angles; 7e-3 when rope_freqs is left out). gemma2 is left out: its GELU goes through ggml's
float16 table and its soft-capped attention amplifies summation order (measured, with the table
emulated: 3e-7 on Q4_0 and Q8_0, 5e-3 on Q4_1)."""


def ggml_matmul(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output as ggml's CPU kernels compute it from the GGUF blocks: activations
    quantized per 32 (``d = amax / 127`` stored in float16, codes rounded half away from zero; Q4_1
    pairs with Q8_1, whose block sum ``s = d * sum(q)`` is float16 too), dot products in integers,
    scaled by the float16 block scales."""
    shape = x.shape
    blocks = x.float().reshape(-1, shape[-1] // 32, 32)
    d = blocks.abs().amax(-1) / 127
    v = blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None]
    q8 = (torch.sign(v) * torch.floor(v.abs() + 0.5)).double()
    d8 = d.half().double()
    codes, dw, mw = gguf_format.block_parts(layer)
    qtype = gguf_format.quant_type(layer)
    cw = codes.double().reshape(codes.shape[0], -1, 32) - (0 if qtype == "Q4_1" else 2 ** (layer.bits - 1))
    out = (torch.einsum("nbj,obj->nob", q8, cw) * dw.half().double()[None] * d8[:, None, :]).sum(-1)
    if qtype == "Q4_1":
        s8 = (q8.sum(-1) * d).half().double()
        out = out + (mw.half().double()[None] * s8[:, None, :]).sum(-1)
    if layer.bias is not None:
        out = out + layer.bias.double()
    return out.float().reshape(*shape[:-1], -1)


def test_llama_cpp_runs_the_gguf_and_computes_qcore_logits(bpe_tokenizer: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tiny export runs in llama.cpp: its logits are qcore's within ggml's own rounding, and
    reproduce qcore's model with ggml's arithmetic emulated to float32 summation order."""
    pytest.importorskip("llama_cpp")
    worst: dict[str, float] = {}
    exact: dict[str, float] = {}
    for case, options in sorted(LLAMA_CPP_CASES.items()):
        options = dict(options)
        options["model"] = {**options.get("model", {}), "vocab_size": BPE_VOCAB}
        model = quantized(**options)
        out = qcore.export(model, tmp_path / f"{case}.gguf", FORMAT, tokenizer=bpe_tokenizer)
        ids = tiny_inputs(model)
        want = qcore_logits(model, ids, monkeypatch)
        llm = llama_cpp_model(out)
        got = llama_cpp_logits(llm, ids)
        llm.close()
        worst[case] = max_relative_error(got, want)
        if not case.startswith("gemma2"):
            hooks = [m.register_forward_hook(lambda mod, args, _: ggml_matmul(mod, args[0]))
                     for m in quantized_layers(model).values()]
            with torch.no_grad():
                emulated = model(ids).logits
            for hook in hooks:
                hook.remove()
            exact[case] = max_relative_error(got, emulated)
    print("llama.cpp vs qcore, max relative logit error:", {k: f"{v:.2g}" for k, v in worst.items()})
    print("llama.cpp vs qcore with ggml's arithmetic:", {k: f"{v:.2g}" for k, v in exact.items()})
    assert max(worst.values()) <= LLAMA_CPP_REL_TOL, worst
    assert max(exact.values()) <= GGML_EXACT_TOL, exact


# -- CLI and a real model -------------------------------------------------------------------------
def test_cli_exports_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized("llama", bits=4, group_size=32, sym=False)
    ckpt = qcore.save(model, tmp_path / "ckpt")
    out = tmp_path / "model.gguf"
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    ids = tiny_inputs(model)
    want = qcore_logits(qcore.load(ckpt), ids, monkeypatch)
    with torch.no_grad():
        assert (transformers_model(out)(ids).logits - want).abs().max().item() <= LOGIT_ATOL[False]
    before = out.read_bytes()
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(tmp_path / "w.gguf"), "--json"]) == 0


@requires_shared
@pytest.mark.parametrize("sym", [True, False])
def test_real_model_through_the_cli_keeps_tokenizer_and_perplexity(tmp_path: Path, sym: bool) -> None:
    """stories260K, 4-bit g32 (down_proj in float: 172 columns), saved with its tokenizer and
    exported by the CLI: the GGUF's sentencepiece vocabulary (tokens, scores, types from
    tokenizer.model) encodes text as the original, and transformers' perplexity on TinyStories is
    within 0.5% of qcore's own (measured 0.03%)."""
    from transformers import AutoTokenizer

    from qcore.eval import perplexity
    from qcore.models import load_model

    model, tok = load_model(str(STORIES_DIR))
    qcore.quantize(model, "rtn", bits=4, group_size=32, sym=sym, ignore=["*.mlp.down_proj"])
    ckpt = qcore.save(model, tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "stories.gguf"
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == 512
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.token_type"][:4] == [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL),
                                                       int(gguf.TokenType.CONTROL), int(gguf.TokenType.BYTE)]
    assert any(s != 0.0 for s in fields["tokenizer.ggml.scores"])
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.ffn_down.weight"] == "F32"
    text = TINYSTORIES_TXT.read_text()[:60_000]
    theirs_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert theirs_tok(text[:5000]).input_ids == tok(text[:5000]).input_ids
    ours = perplexity(model, [text], tok, seq_len=256).ppl
    theirs = perplexity(transformers_model(out), [text], tok, seq_len=256).ppl
    print(f"sym={sym}: qcore {ours:.4f}, transformers from GGUF {theirs:.4f}")
    assert abs(theirs - ours) / ours < 0.005, (ours, theirs)


@requires_shared
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_llama_cpp_tokenizes_and_scores_the_real_model_as_qcore(tmp_path: Path, bits: int, sym: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """stories260K (down_proj in float) through llama.cpp: its sentencepiece tokenizer, read from
    the GGUF, encodes TinyStories as transformers does, and its perplexity is qcore's within 1%."""
    pytest.importorskip("llama_cpp")
    from qcore.models import load_model

    model, tok = load_model(str(STORIES_DIR))
    qcore.quantize(model, "rtn", bits=bits, group_size=32, sym=sym, ignore=["*.mlp.down_proj"])
    out = qcore.export(model, tmp_path / "stories.gguf", FORMAT, tokenizer=tok)
    llm = llama_cpp_model(out)
    text = TINYSTORIES_TXT.read_text()[:20_000]
    want_ids = tok(text).input_ids
    assert llm.tokenize(text.encode("utf-8"), add_bos=True) == want_ids
    ids = torch.tensor(want_ids[: 8 * 256]).reshape(8, 256)
    ours = mean_nll(qcore_logits(model, ids, monkeypatch), ids)
    theirs = mean_nll(llama_cpp_logits(llm, ids), ids)
    llm.close()
    print(f"w{bits} sym={sym}: perplexity qcore {np.exp(ours):.4f}, llama.cpp {np.exp(theirs):.4f}")
    assert abs(np.exp(theirs - ours) - 1) < 0.01, (np.exp(ours), np.exp(theirs))
