"""Export to ONNX (qcore.formats.onnx): the MatMulNBits tensors hold qcore's integer codes, scales
and zero points exactly, onnxruntime (CPU) computes qcore's logits on a prefill and through its KV
cache token by token, the output folder passes onnx's checker (external data by path) and carries a
genai_config.json and the tokenizer, stories260K keeps its perplexity, and what the graph cannot
hold is refused before anything is written. W8A8 layers (SmoothQuant) compute qcore's int8 kernel
(MatMulInteger) and keep stories260K's perplexity; a float LM head can be quantized at export
(``lm_head_bits``). Skips when onnx or onnxruntime is not installed."""
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
from qcore.formats import onnx as onnx_format
from qcore.formats.compressed_tensors import quantized_layers
from qcore.plugin.errors import CheckpointError
from qcore.quant.act import ActQuant
from qcore.quant.linear import BACKEND_ENV, QuantLinear
from qcore.quant.primitives import QuantizedWeight, quantize_rtn
from qcore.testing import STORIES_DIR, TINYSTORIES_TXT, requires_shared, tiny_calibration
from qcore.tiny import tiny_inputs, tiny_model

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run the graph in onnxruntime "
                                                "(pip install onnxruntime)")

FORMAT = "onnx"
LOGIT_ATOL = 1e-5
"""Max |logit difference|, onnxruntime vs qcore's ``reference`` backend (float32 matmul with the
dequantized weights), prefill and decode alike. Both dequantize ``(code - zero) * scale`` in float32
from the same numbers: only summation order differs (measured 6.0e-8 to 2.4e-7 on logits of
magnitude ~0.6, every case below)."""
W8A8_LOGIT_ATOL = 2e-3
"""Max |logit difference| of the W8A8 cases, onnxruntime vs qcore's own kernels (``w8a8``'s exact int32
accumulation, ``dense`` for grouped weights). Each layer computes qcore's numbers to the last bit
(:func:`test_a_w8a8_layer_computes_qcore_int8_kernel_exactly`), but the float32 parts between them
(norms, attention) differ by summation order (~1e-7), and an activation that lands that close to a
rounding boundary of its int8 grid takes the neighbouring code: one code step (``max|x_row| / 127``,
~0.3% of the row) in one layer input. Measured 1.2e-7 (llama, qwen2: no code flipped) and 4.6e-4
(llama w8g32: one flipped code in layer 1's MLP input) on logits of magnitude ~0.6."""
PPL_REL_TOL = 0.005
"""Max relative perplexity difference on stories260K, onnxruntime vs qcore (measured 0.0000%: the
logits agree to ~1e-6)."""

LLAMA3_ROPE: dict[str, Any] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES: dict[str, dict[str, Any]] = {
    "llama-rtn-w4g32-asym": {"family": "llama", "bits": 4, "group_size": 32, "sym": False},
    "llama-rtn-w4g32-sym": {"family": "llama", "bits": 4, "group_size": 32, "sym": True},
    "llama-rtn-w4g64-asym": {"family": "llama", "bits": 4, "group_size": 64, "sym": False},
    "llama-rtn-w4g128-sym-wide": {"family": "llama", "model": {"hidden_size": 128, "num_attention_heads": 8,
                                                                "num_key_value_heads": 4},
                                  "bits": 4, "group_size": 128, "sym": True},
    "llama-rtn-w4g128-asym-wide": {"family": "llama", "model": {"hidden_size": 128, "num_attention_heads": 8,
                                                                 "num_key_value_heads": 4},
                                   "bits": 4, "group_size": 128, "sym": False},
    "llama-rtn-w4-per-channel": {"family": "llama", "bits": 4, "group_size": -1, "sym": False},
    "llama-rtn-w8g32-asym": {"family": "llama", "bits": 8, "group_size": 32, "sym": False},
    "llama-rtn-w8g64-sym": {"family": "llama", "bits": 8, "group_size": 64, "sym": True},
    "llama-rtn-w2g32-asym": {"family": "llama", "bits": 2, "group_size": 32, "sym": False},
    "llama-gptq-w4g32-act-order": {"family": "llama", "method": "gptq", "bits": 4, "group_size": 32,
                                   "static_groups": False},
    "llama-rtn-w4g32-sym-tied": {"family": "llama", "model": {"tie_word_embeddings": True}, "bits": 4,
                                 "group_size": 32, "sym": True},
    "llama-rtn-w4g32-llama3-rope": {"family": "llama", "model": {"rope_parameters": LLAMA3_ROPE}, "bits": 4,
                                    "group_size": 32, "sym": False},
    "qwen2-rtn-w4g32-asym": {"family": "qwen2", "bits": 4, "group_size": 32, "sym": False},
    "qwen2-gptq-w4g64-sym": {"family": "qwen2", "method": "gptq", "bits": 4, "group_size": 64, "sym": True},
    "qwen3-rtn-w4g32-asym": {"family": "qwen3", "bits": 4, "group_size": 32, "sym": False},
    "mistral-rtn-w4g32-asym": {"family": "mistral", "bits": 4, "group_size": 32, "sym": False},
    "mistral-rtn-w4g32-sym-window4": {"family": "mistral", "model": {"sliding_window": 4}, "bits": 4,
                                      "group_size": 32, "sym": True},
    "llama-float": {"family": "llama", "method": None},
    "llama-smoothquant-w8a8": {"family": "llama", "method": "smoothquant"},
    "qwen2-smoothquant-w8a8": {"family": "qwen2", "method": "smoothquant"},
    "llama-smoothquant-w8g32a8": {"family": "llama", "method": "smoothquant", "group_size": 32},
    "llama-rtn-w4g32-asym-plain": {"family": "llama", "bits": 4, "group_size": 32, "sym": False, "plain": True},
    "qwen3-rtn-w4g32-asym-plain": {"family": "qwen3", "bits": 4, "group_size": 32, "sym": False, "plain": True},
    "mistral-rtn-w4g32-sym-window4-plain": {"family": "mistral", "model": {"sliding_window": 4}, "bits": 4,
                                            "group_size": 32, "sym": True, "plain": True},
}
"""Tiny models exported (2 layers, hidden 64 unless widened). The act-order case has a permuted g_idx;
window4 runs Mistral's sliding window over 16 tokens; llama-float is unquantized; smoothquant cases
are W8A8 (8-bit symmetric weights per channel, MatMulInteger; w8g32a8 in groups of 32, its activations
quantized and dequantized before MatMulNBits); "plain" cases are
written with attention in plain ONNX ops (the path of head sizes GroupQueryAttention's CPU kernel
refuses, e.g. stories260K's 8)."""


def quantized(family: str = "llama", method: str | None = "rtn", model: dict[str, Any] | None = None,
              **options: Any) -> nn.Module:
    """A tiny ``family`` model (config ``model`` overrides) quantized by ``method`` with ``options``."""
    built = tiny_model(family, **(model or {}))
    if method in ("gptq", "smoothquant"):
        options["calibration"] = tiny_calibration(built.config.vocab_size)
    if method is not None:
        qcore.quantize(built, method, **options)
    return built


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    options = dict(CASES[request.param])
    plain = options.pop("plain", False)
    model = quantized(**options)
    with pytest.MonkeyPatch.context() as patch:
        if plain:  # no tiny head size (16) is a multiple of 1024: every layer takes the plain path
            patch.setattr(onnx_format, "GQA_HEAD_MULTIPLE", 1024)
        out = qcore.export(model, tmp_path_factory.mktemp(request.param) / "onnx", FORMAT)
    return model, out


# -- running the export ---------------------------------------------------------------------------
def session(folder: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / onnx_format.MODEL_FILE), options, providers=["CPUExecutionProvider"])


def empty_past(model: nn.Module, batch: int) -> list[np.ndarray]:
    config = model.config
    shape = (batch, config.num_key_value_heads, 0, onnx_format.head_dim(config))
    return [np.zeros(shape, np.float32) for _ in range(2 * config.num_hidden_layers)]


def ort_step(sess: Any, model: nn.Module, ids: torch.Tensor, past: list[np.ndarray] | None = None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(logits, presents)`` of one call: ``ids`` after ``past`` (an empty cache when None)."""
    batch, seq = ids.shape
    past = past if past is not None else empty_past(model, batch)
    total = past[0].shape[2] + seq
    feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones((batch, total), np.int64)}
    for i in range(model.config.num_hidden_layers):
        feeds[onnx_format.PAST_KEY % i] = past[2 * i]
        feeds[onnx_format.PAST_VALUE % i] = past[2 * i + 1]
    outputs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, outputs))
    presents = []
    for i in range(model.config.num_hidden_layers):
        presents += [got[onnx_format.PRESENT_KEY % i], got[onnx_format.PRESENT_VALUE % i]]
    return got[onnx_format.LOGITS], presents


def w8a8(model: nn.Module) -> bool:
    """Whether ``model`` has activation-quantized layers."""
    return any(layer.act is not None for layer in quantized_layers(model).values())


def qcore_logits(model: nn.Module, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """qcore's logits: ``reference`` (float32 matmul with the dequantized weights) for weight-only
    models; W8A8 models run qcore's own kernels (``w8a8``: int8 x int8, exact int32 accumulation at 1
    and more than 8 rows; ``dense`` for grouped weights: float32 on fake-quantized activations)."""
    monkeypatch.setenv(BACKEND_ENV, "auto" if w8a8(model) else "reference")
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def logit_atol(model: nn.Module) -> float:
    return W8A8_LOGIT_ATOL if w8a8(model) else LOGIT_ATOL


def max_diff(got: np.ndarray, want: torch.Tensor) -> float:
    return float(np.abs(got - want.numpy()).max())


# -- the export -----------------------------------------------------------------------------------
def test_the_folder_passes_the_checker_and_holds_its_files(exported: tuple[nn.Module, Path]) -> None:
    model, out = exported
    onnx.checker.check_model(str(out / onnx_format.MODEL_FILE), full_check=True)  # path form: external data
    files = {p.name for p in out.iterdir()}
    assert {onnx_format.MODEL_FILE, onnx_format.DATA_FILE, onnx_format.GENAI_CONFIG_FILE} <= files
    proto = onnx.load(str(out / onnx_format.MODEL_FILE), load_external_data=False)
    config = model.config
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    layers = range(config.num_hidden_layers)
    assert inputs == ["input_ids", "attention_mask"] + [n for i in layers for n in
                                                        (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
    assert outputs == ["logits"] + [n for i in layers for n in (f"present.{i}.key", f"present.{i}.value")]
    ops = [n.op_type for n in proto.graph.node]
    layers_q = quantized_layers(model).values()
    n_int = sum(onnx_format.integer_matmul(layer) for layer in layers_q)
    assert ops.count("MatMulInteger") == n_int
    assert ops.count("MatMulNBits") == len(layers_q) - n_int
    gqa = "GroupQueryAttention" in ops  # else attention in plain ops, one Softmax per layer
    assert ops.count("GroupQueryAttention") == (config.num_hidden_layers if gqa else 0)
    assert ops.count("Softmax") == (0 if gqa else config.num_hidden_layers)
    genai = json.loads((out / onnx_format.GENAI_CONFIG_FILE).read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == config.model_type
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        config.num_hidden_layers, config.num_key_value_heads, onnx_format.head_dim(config))
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"


def unpack_low_first(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` codes along the last axis of MatMulNBits-packed bytes."""
    if bits == 8:
        return packed[..., :n]
    per = 8 // bits
    codes = np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def test_matmulnbits_tensors_hold_qcore_codes_scales_and_zeros_exactly(exported: tuple[nn.Module, Path]) -> None:
    model, out = exported
    proto = onnx.load(str(out / onnx_format.MODEL_FILE))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    for name, layer in quantized_layers(model).items():
        if onnx_format.integer_matmul(layer):
            check_matmulinteger_tensors(proto, tensors, name, layer)
            continue
        node = next(n for key, n in nodes.items() if key.startswith(f"/{name}/MatMulNBits"))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        qw = layer.quantized_weight()
        k_blocks = tensors[node.input[1]].shape[1]
        assert (attrs["K"], attrs["N"], attrs["bits"]) == (layer.in_features, layer.out_features, layer.bits)
        want_block = layer.group_size if layer.group_size > 0 else layer.in_features  # per-channel: one block
        assert attrs["block_size"] == want_block, name
        codes = unpack_low_first(tensors[node.input[1]], layer.bits, attrs["block_size"])
        codes = codes.reshape(layer.out_features, -1)[:, : layer.in_features]
        order = onnx_format.act_order(layer) if layer.g_idx is not None else torch.arange(layer.in_features)
        assert np.array_equal(codes, qw.codes[:, order].numpy()), name  # the codes, exactly
        assert np.array_equal(tensors[node.input[2]], qw.scales.float().numpy()), name  # scales, exactly
        zeros = qw.zeros.numpy()
        if len(node.input) > 3 and node.input[3]:
            got = unpack_low_first(tensors[node.input[3]], layer.bits, k_blocks)
            assert np.array_equal(got, zeros.astype(np.uint8)), name
        else:
            assert (zeros == 2 ** (layer.bits - 1)).all(), name  # MatMulNBits' default zero point


def check_matmulinteger_tensors(proto: Any, tensors: dict[str, np.ndarray], name: str, layer: QuantLinear) -> None:
    """A W8A8 layer's MatMulInteger holds its codes minus 128 ``[in, out]`` and its float32 scales."""
    node = next(n for n in proto.graph.node if n.name.startswith(f"/{name}/MatMulInteger"))
    qw = layer.quantized_weight()
    B = tensors[node.input[1]]
    assert B.dtype == np.int8 and np.array_equal(B.astype(np.int16), qw.codes.numpy().T.astype(np.int16) - 128), name
    assert (qw.zeros == 128).all() and len(node.input) == 2, name  # SmoothQuant's weights are symmetric
    scales = tensors[f"{name}.MatMulInteger.scales"]
    assert np.array_equal(scales, qw.scales.float().numpy()[:, 0]), name


def test_onnxruntime_prefill_computes_qcore_logits(exported: tuple[nn.Module, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, out = exported
    ids = tiny_inputs(model)
    want = qcore_logits(model, ids, monkeypatch)
    got, presents = ort_step(session(out), model, ids)
    diff = max_diff(got, want)
    print(f"prefill max |logit diff| {diff:.3g} (logits up to {float(want.abs().max()):.3g})")
    assert diff <= logit_atol(model), diff
    assert presents[0].shape == (2, model.config.num_key_value_heads, ids.shape[1], onnx_format.head_dim(model.config))


def test_decoding_through_the_kv_cache_computes_the_full_forward(exported: tuple[nn.Module, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill 12 tokens, then feed the 4 others one at a time with the presents as the past: each
    step's logits are those of qcore's forward over every token so far."""
    model, out = exported
    ids = tiny_inputs(model)
    want = qcore_logits(model, ids, monkeypatch)
    sess = session(out)
    prefill = 12
    logits, past = ort_step(sess, model, ids[:, :prefill])
    worst = max_diff(logits, want[:, :prefill])
    for t in range(prefill, ids.shape[1]):
        logits, past = ort_step(sess, model, ids[:, t:t + 1], past)
        worst = max(worst, max_diff(logits[:, 0], want[:, t]))
        assert past[0].shape[2] == t + 1
    print(f"decode max |logit diff| {worst:.3g}")
    assert worst <= logit_atol(model), worst


def test_a_chunk_after_the_cache_computes_the_full_forward(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Several new tokens after a past (chunked prefill, batch 1) and a greedy generation loop."""
    model = quantized(**CASES["qwen3-rtn-w4g32-asym"])
    out = qcore.export(model, tmp_path / "onnx", FORMAT)
    ids = tiny_inputs(model, batch=1, seq_len=16)
    want = qcore_logits(model, ids, monkeypatch)
    sess = session(out)
    _, past = ort_step(sess, model, ids[:, :6])
    logits, past = ort_step(sess, model, ids[:, 6:16], past)
    assert max_diff(logits, want[:, 6:16]) <= LOGIT_ATOL
    seq = ids[:, :4]
    logits, past = ort_step(sess, model, seq)
    for _ in range(8):
        token = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        seq = torch.cat([seq, token], dim=1)
        logits, past = ort_step(sess, model, token, past)
    with torch.no_grad():
        greedy = model.generate(ids[:, :4], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(seq, greedy)


# -- refusals -------------------------------------------------------------------------------------
def with_layer(layer: QuantLinear) -> nn.Module:
    """A tiny quantized llama whose first q_proj is ``layer``."""
    model = quantized("llama", bits=4, group_size=32)
    model.model.layers[0].self_attn.q_proj = layer
    return model


def crafted(zero: float = 8.0, group: int = 32, **kwargs: Any) -> QuantLinear:
    codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    qw = QuantizedWeight(codes, torch.full((64, 64 // group), 0.01), torch.full((64, 64 // group), zero), 4, group,
                         zero == 8.0)
    return QuantLinear.from_quantized(qw, None, **kwargs)


REFUSALS: dict[str, tuple[Any, str]] = {
    "3-bit": (lambda: quantized("llama", bits=3, group_size=32), r"3-bit weights.*bits=4 or 8"),
    "group 8": (lambda: with_layer(crafted(group=8)), r"group size 8.*power of two.*--group-size.*q_proj"),
    "float zeros": (lambda: with_layer(crafted(zero=7.5)), r"float or out-of-range zero points.*q_proj"),
    "static A8": (lambda: with_layer(crafted(act=ActQuant(8, dynamic=False, scale=0.05))),
                  r"activation quantization A8 \(static per-tensor, symmetric\).*dynamic per-token.*q_proj"),
    "A4 clipped": (lambda: with_layer(crafted(act=ActQuant(4, clip=0.9))),
                   r"activation quantization A4 \(dynamic per-token, symmetric, clip 0.9\).*compressed-tensors"),
    "QuaRot": (lambda: with_layer(crafted(input_transform=nn.Identity())), r"online input transform.*QuaRot"),
    "gpt2": (lambda: quantized("gpt2", bits=4, group_size=32), r"architecture 'gpt2'.*qcore.save"),
    "gelu": (lambda: quantized("llama", model={"hidden_act": "gelu"}, bits=4, group_size=32),
             r"MLP activation 'gelu'.*compressed-tensors"),
    "yarn": (lambda: quantized("llama", model={"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                   "factor": 2.0}}, bits=4, group_size=32),
             r"rope scaling 'dynamic'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_the_graph_cannot_hold_is_refused_with_the_fix_and_nothing_is_written(case: str,
                                                                                   tmp_path: Path) -> None:
    build, pattern = REFUSALS[case]
    model = build()
    reasons = check_export(model, FORMAT)
    assert reasons and any(re.search(pattern, r) for r in reasons), reasons
    with pytest.raises(ExportError, match=pattern):
        qcore.export(model, tmp_path / "onnx", FORMAT)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_an_existing_export_is_kept(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized("llama", bits=4, group_size=32)
    out = tmp_path / "onnx"
    with monkeypatch.context() as patch:
        patch.setattr(onnx_format, "nbits_weight", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            qcore.export(model, out, FORMAT)
    assert list(tmp_path.iterdir()) == []
    qcore.export(model, out, FORMAT)
    before = (out / onnx_format.DATA_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="overwrite=True"):
        qcore.export(model, out, FORMAT)
    assert (out / onnx_format.DATA_FILE).read_bytes() == before


def test_half_precision_models_are_written_in_float32_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    out = qcore.export(model, tmp_path / "onnx", FORMAT)
    proto = onnx.load(str(out / onnx_format.MODEL_FILE))
    embed = next(t for t in proto.graph.initializer if t.name == "model.embed_tokens.weight")
    assert embed.data_type == onnx.TensorProto.FLOAT
    assert np.array_equal(onnx.numpy_helper.to_array(embed), model.model.embed_tokens.weight.detach().float().numpy())
    ids = tiny_inputs(model)
    got, _ = ort_step(session(out), model, ids)
    want = qcore_logits(model.float(), ids, monkeypatch)
    assert max_diff(got, want) <= LOGIT_ATOL


# -- CLI, tokenizer and a real model --------------------------------------------------------------
def test_cli_exports_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized("qwen2", bits=4, group_size=32, sym=False)
    ckpt = qcore.save(model, tmp_path / "ckpt")
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    ids = tiny_inputs(model)
    want = qcore_logits(qcore.load(ckpt), ids, monkeypatch)
    got, _ = ort_step(session(out), model, ids)
    assert max_diff(got, want) <= LOGIT_ATOL
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out), "--overwrite"]) == 0


def ort_perplexity(sess: Any, model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of the ONNX model over ``windows`` (qcore.eval's protocol: summed NLL of each next
    token over every window)."""
    from qcore.eval import window_nll

    total = 0.0
    for row in windows.split(4):
        logits, _ = ort_step(sess, model, row)
        total += float(window_nll(torch.from_numpy(logits), row).double().sum())
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


@requires_shared
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False)])
def test_real_model_keeps_its_tokenizer_and_perplexity(tmp_path: Path, bits: int, sym: bool) -> None:
    """stories260K, g32 (down_proj in float: its 172 columns are no multiple of 32), saved with its
    tokenizer and exported by the CLI: onnxruntime's perplexity on TinyStories is qcore's within
    0.5% on the same windows."""
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model

    model, tok = load_model(str(STORIES_DIR))
    qcore.quantize(model, "rtn", bits=bits, group_size=32, sym=sym, ignore=["*.mlp.down_proj"])
    ckpt = qcore.save(model, tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--format", FORMAT, "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    genai = json.loads((out / onnx_format.GENAI_CONFIG_FILE).read_text())
    assert (genai["model"]["bos_token_id"], genai["model"]["eos_token_id"]) == (1, 2)
    text = TINYSTORIES_TXT.read_text()[:60_000]
    ours = perplexity(model, [text], tok, seq_len=256).ppl
    ids, _, _ = token_stream([text], tok)
    theirs = ort_perplexity(session(out), model, windows(ids, 256))
    print(f"w{bits} sym={sym}: perplexity qcore {ours:.5f}, onnxruntime {theirs:.5f}")
    assert abs(theirs - ours) / ours < PPL_REL_TOL, (ours, theirs)


@requires_shared
@pytest.mark.parametrize("source", ["stories260K", "tiny-llama-gqa"])
def test_onnxruntime_genai_generates_qcore_greedy_tokens(tmp_path: Path, source: str) -> None:
    """onnxruntime-genai (when installed) runs the export from genai_config.json with the tokenizer
    beside it: its greedy tokens are qcore's. stories260K (head size 8) takes the plain attention
    path, a tiny llama with its tokenizer (head size 16) GroupQueryAttention."""
    og = pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install onnxruntime-genai)")
    from qcore.models import load_model

    model, tok = load_model(str(STORIES_DIR))
    if source == "tiny-llama-gqa":
        model = tiny_model("llama", vocab_size=model.config.vocab_size)
    qcore.quantize(model, "rtn", bits=4, group_size=32, ignore=["*.mlp.down_proj"])
    out = qcore.export(model, tmp_path / "onnx", FORMAT, tokenizer=tok)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
    generator_model = og.Model(str(out))
    params = og.GeneratorParams(generator_model)
    params.set_search_options(do_sample=False, max_length=len(want))
    generator = og.Generator(generator_model, params)
    generator.append_tokens(prompt[0].tolist())
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0)) == want


# -- W8A8 layers ----------------------------------------------------------------------------------
def layer_session(layer: QuantLinear) -> Any:
    """onnxruntime running ``layer`` alone as the export writes it: ``x`` float32 ``[1, rows, in]``."""
    helper, TP = onnx.helper, onnx.TensorProto
    graph = onnx_format.Graph()
    y = onnx_format.linear(graph, layer, "x", "layer")
    graph.op("Identity", [y], 1, "out", outputs=["y"])
    body = helper.make_graph(graph.nodes, "layer", [helper.make_tensor_value_info("x", TP.FLOAT, [1, "rows",
                                                                                                  layer.in_features])],
                             [helper.make_tensor_value_info("y", TP.FLOAT, [1, "rows", layer.out_features])],
                             list(graph.initializers.values()))
    proto = helper.make_model(body, opset_imports=[helper.make_opsetid("", onnx_format.OPSET),
                                                   helper.make_opsetid(onnx_format.MS_DOMAIN, onnx_format.MS_OPSET)])
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def w8a8_layer(sym: bool, bias: bool, in_features: int = 96, out_features: int = 40) -> QuantLinear:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear.from_quantized(quantize_rtn(w, 8, -1, sym), b, act=ActQuant(8))


@pytest.mark.parametrize("sym,bias", [(True, False), (True, True), (False, True)])
def test_a_w8a8_layer_computes_qcore_int8_kernel_exactly(sym: bool, bias: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One W8A8 layer, the same input: onnxruntime's output is qcore's ``w8a8`` kernel's to the last
    bit where that kernel accumulates in int32 (1 row, more than 8 rows; an all-zero row included),
    and within its bfloat16 rounding at 2 to 8 rows (``_weight_int8pack_mm`` in bf16). Asymmetric
    weights: MatMulInteger subtracts the zero point in int32, qcore adds ``rowsum * (128 - z) * s``
    in float32 (a rounding apart)."""
    layer = w8a8_layer(sym, bias)
    assert onnx_format.integer_matmul(layer) and layer.select_backend() == "w8a8"
    sess = layer_session(layer)
    gen = torch.Generator().manual_seed(2)
    monkeypatch.setenv(BACKEND_ENV, "w8a8")
    for rows in (1, 5, 9, 33):
        x = torch.randn(1, rows, layer.in_features, generator=gen) * torch.rand(1, rows, 1, generator=gen) * 4
        if rows == 33:
            x[0, 3] = 0.0
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            want = layer(x).numpy()
        diff = float(np.abs(got - want).max())
        scale = float(np.abs(want).max())
        print(f"w8a8 sym={sym} bias={bias} rows={rows}: max |diff| {diff:.3g} (outputs up to {scale:.3g})")
        if rows in (1, 9, 33) and sym:
            assert np.array_equal(got, want), (rows, diff)
        elif rows in (1, 9, 33):
            assert diff <= 1e-6 * scale, (rows, diff)
        else:
            assert diff <= 2 ** -7 * scale, (rows, diff)


def test_w8a8_layers_share_one_quantization_of_their_input() -> None:
    """q/k/v and gate/up read one per-row int8 quantization of their common input."""
    model = quantized("llama", "smoothquant")
    ops = [n.op_type for n in onnx_format.model_proto(model).graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("ReduceMax") == ops.count("Round") == 4 * layers  # q/k/v, o, gate/up, down
    assert ops.count("MatMulInteger") == 7 * layers


@requires_shared
def test_real_model_w8a8_keeps_its_perplexity(tmp_path: Path) -> None:
    """stories260K quantized by SmoothQuant (W8A8: 8-bit per-channel weights, dynamic int8 activations)
    and exported: onnxruntime's perplexity on TinyStories is qcore's within 0.5% (attention in plain
    ops: head size 8)."""
    from qcore.data import get_calibration
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model

    model, tok = load_model(str(STORIES_DIR))
    text = TINYSTORIES_TXT.read_text()[:60_000]
    calib = get_calibration([text[:30_000]], tok, n_samples=8, seq_len=128, seed=0)
    qcore.quantize(model, "smoothquant", calibration=calib)
    layers = quantized_layers(model)
    assert layers and all(onnx_format.integer_matmul(layer) for layer in layers.values())
    out = qcore.export(model, tmp_path / "onnx", FORMAT, tokenizer=tok)
    ours = perplexity(model, [text], tok, seq_len=256).ppl
    ids, _, _ = token_stream([text], tok)
    theirs = ort_perplexity(session(out), model, windows(ids, 256))
    print(f"W8A8: perplexity qcore {ours:.5f}, onnxruntime {theirs:.5f} ({(theirs / ours - 1) * 100:+.4f}%)")
    assert abs(theirs - ours) / ours < PPL_REL_TOL, (ours, theirs)


# -- a quantized LM head --------------------------------------------------------------------------
LM_HEAD_ATOL = {8: 1e-2, 4: 1e-1}
"""Max |logit difference| of a tiny tied llama's export with ``lm_head_bits`` against qcore's float
LM head: the head's RTN error on a random 128 x 64 table (measured 4.2e-3 at 8 bits, 6.0e-2 at 4 bits,
logits up to ~0.6); against the same quantized head run by qcore, float rounding (2.4e-7)."""


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_bits_writes_the_float_head_as_matmulnbits(bits: int, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized(**CASES["llama-rtn-w4g32-sym-tied"])
    out = tmp_path / "onnx"
    onnx_format.write(model, out, lm_head_bits=bits)
    onnx.checker.check_model(str(out / onnx_format.MODEL_FILE), full_check=True)
    proto = onnx.load(str(out / onnx_format.MODEL_FILE))
    nodes = {n.name: n for n in proto.graph.node}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == len(quantized_layers(model)) + 1 and "FusedMatMul" not in ops
    head = next(n for key, n in nodes.items() if key.startswith("/lm_head/MatMulNBits"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert (attrs["bits"], attrs["block_size"]) == (bits, 64 if bits == 8 else onnx_format.LM_HEAD_BLOCK_4BIT)
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] == "model.embed_tokens.weight"  # the embedding still reads the float table
    ids = tiny_inputs(model)
    want = qcore_logits(model, ids, monkeypatch)
    got, _ = ort_step(session(out), model, ids)
    diff = max_diff(got, want)
    exact = onnx_format.quantized_head(model, bits)
    with torch.no_grad():  # the same quantized head in qcore: onnxruntime computes it
        hidden = model.model(ids, use_cache=False).last_hidden_state
        head_logits = exact(hidden)
    print(f"lm_head_bits={bits}: max |logit diff| vs float head {diff:.3g}, "
          f"vs the same quantized head in qcore {max_diff(got, head_logits):.3g}")
    assert diff <= LM_HEAD_ATOL[bits], diff
    assert max_diff(got, head_logits) <= LOGIT_ATOL


@pytest.mark.parametrize("bits,pattern", [(3, r"lm_head_bits=3: use 8 .*4 .*None"),
                                          (8, r"lm_head_bits=8: the LM head is already quantized")])
def test_lm_head_bits_refusals(bits: int, pattern: str, tmp_path: Path) -> None:
    model = quantized("llama", bits=4, group_size=32)
    if bits == 8:  # a quantized LM head keeps its own codes
        model.lm_head = QuantLinear.from_quantized(quantize_rtn(model.lm_head.weight.detach(), 4, 32, True), None)
    assert onnx_format.check(model) == []
    reasons = onnx_format.check(model, lm_head_bits=bits)
    assert any(re.search(pattern, r) for r in reasons), reasons
    with pytest.raises(ExportError, match=pattern):
        onnx_format.write(model, tmp_path / "onnx", lm_head_bits=bits)
    assert not (tmp_path / "onnx").exists()


def test_cli_and_export_pass_lm_head_bits_and_other_formats_refuse_it(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = quantized(**CASES["llama-rtn-w4g32-sym-tied"])
    ckpt = qcore.save(model, tmp_path / "ckpt")
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--lm-head-bits", "8"]) == 0
    ops = [n.op_type for n in onnx.load(str(out / onnx_format.MODEL_FILE)).graph.node]
    assert ops.count("MatMulNBits") == len(quantized_layers(model)) + 1
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--lm-head-bits", "8"]) != 0
    assert "format 'gguf' takes no option --lm-head-bits; it takes none" in capsys.readouterr().err
    with pytest.raises(ExportError, match="takes no option bogus; its options: lm_head_bits"):
        qcore.export(ckpt, tmp_path / "o2", format="onnx", bogus=1)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "o2").exists()
