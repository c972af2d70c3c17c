"""Tests of the AWQ plugin: pure search/fold functions, exact folding on tiny architectures,
conformance, and quality on real weights (stories260K, skipped without ../shared)."""
from __future__ import annotations

import math

import pytest
import torch

from qcore.testing import MethodConformance, requires_shared

from qcore.quant.primitives import quantize_rtn
from qcore.arch.fold import fold_into_linear_rows, fold_into_norm, group_tie, scale_columns
from qcore_awq.search import (
    activation_mean,
    alpha_grid,
    apply_clip,
    awq_scales,
    scaled_fake_quant,
    search_clip,
    search_scale,
    shrink_grid,
    weight_mean,
)


def rtn(bits: int, gs: int, sym: bool = False):
    return lambda w: quantize_rtn(w, bits, gs, sym).dequantize()


def _outlier_problem(seed: int = 0, out: int = 48, inp: int = 64, tokens: int = 256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g)
    x[:, :4] *= 30.0  # a few salient input channels, as in real LLM activations
    return w, x


# -- pure functions ------------------------------------------------------------------------------
def test_grids():
    assert alpha_grid(20) == [i / 20 for i in range(20)] and len(alpha_grid(20)) == 20
    assert shrink_grid(20, 0.5) == [1.0 - i / 20 for i in range(10)]


def test_awq_scales_normalized_and_identity():
    g = torch.Generator().manual_seed(0)
    xm = torch.rand(64, generator=g) * 5 + 0.01
    wm = torch.rand(64, generator=g) + 0.1
    for a in (0.0, 0.3, 0.95):
        s = awq_scales(xm, wm, a, duo_scaling=True)
        assert s.shape == (64,) and (s > 0).all()
        assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-5)
    assert torch.allclose(awq_scales(xm, None, 0.0, duo_scaling=False), torch.ones(64))
    # larger activations get larger scales
    s = awq_scales(xm, wm, 0.5, duo_scaling=False)
    assert torch.equal(torch.argsort(s), torch.argsort(xm))


def test_means():
    w, x = _outlier_problem()
    wm = weight_mean([w[:20], w[20:]], 32)
    assert wm.shape == (64,) and (wm > 0).all() and (wm <= 1).all()
    assert torch.allclose(wm, weight_mean([w], 32))
    xm = activation_mean(x.reshape(4, 64, 64))
    assert torch.allclose(xm, x.abs().mean(0))


def test_scaled_fake_quant_is_exact_without_quantization():
    w, _ = _outlier_problem()
    s = awq_scales(torch.rand(64) + 0.1, torch.rand(64) + 0.1, 0.5)
    assert torch.allclose(scaled_fake_quant(w, s, lambda t: t), w, rtol=1e-6, atol=1e-6)


def test_scale_search_beats_plain_rtn_on_salient_channels():
    w, x = _outlier_problem()
    ref = x @ w.T
    fq = rtn(3, 32)

    def loss(s):
        return float((x @ scaled_fake_quant(w, s, fq).T - ref).pow(2).mean())

    best_s, best_alpha, losses, base = search_scale(activation_mean(x), weight_mean([w], 32), loss, 20)
    assert len(losses) == 20
    assert best_alpha is not None and best_alpha > 0
    assert loss(best_s) == min(losses) < 0.7 * base


def test_scale_search_keeps_identity_when_nothing_helps():
    w, x = _outlier_problem()
    best_s, best_alpha, losses, base = search_scale(activation_mean(x), weight_mean([w], 32),
                                                    lambda s: float((s - 1).abs().sum()), 20)
    assert best_alpha is None and torch.equal(best_s, torch.ones(64))


@pytest.mark.parametrize("sym", [False, True])
def test_apply_clip_matches_rtn_clip(sym):
    w, _ = _outlier_problem(1)
    shrink = torch.rand(48, 2) * 0.5 + 0.5
    assert torch.equal(apply_clip(w, torch.ones(48, 2), 32, sym), w)
    a = quantize_rtn(apply_clip(w, shrink, 32, sym), 3, 32, sym)
    b = quantize_rtn(w, 3, 32, sym, clip=shrink)
    assert torch.allclose(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    # clamped values sit on the grid's rounding boundary (sym): at most a rare one-code tie
    diff = (a.codes.int() - b.codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_clip_search_reduces_held_out_output_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    fq = rtn(3, 32)
    shrink, gain = search_clip(w, x, 32, False, fq, clip_grid=20, max_shrink=0.5, row_chunk=16)
    assert shrink.shape == (64, 4) and ((shrink > 0.5) & (shrink <= 1)).all()
    assert (shrink < 1).float().mean() > 0.2 and (gain >= 0).all()
    xt = torch.randn(512, 128, generator=g)  # held-out inputs
    err_plain = (xt @ fq(w).T - xt @ w.T).pow(2).mean()
    err_clip = (xt @ fq(apply_clip(w, shrink, 32, False)).T - xt @ w.T).pow(2).mean()
    assert err_clip < 0.95 * err_plain


def test_fold_functions_are_exact():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(16, generator=g) * 4 + 0.2
    x = torch.randn(5, 16, generator=g)
    n = torch.nn.functional.layer_norm(x, (16,))
    for offset in (0.0, 1.0):
        w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
        w2, b2 = fold_into_norm(w, b, s, offset)
        assert torch.allclose(n * (offset + w2) + b2, (n * (offset + w) + b) / s, atol=1e-5)
    prev_w, prev_b = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    nxt = torch.randn(4, 16, generator=g)
    pw, pb = fold_into_linear_rows(prev_w, prev_b, s)
    h = torch.randn(3, 8, generator=g)
    y_old = torch.relu(h @ prev_w.T + prev_b) @ nxt.T
    y_new = torch.relu(h @ pw.T + pb) @ scale_columns(nxt, s).T
    assert torch.allclose(y_old, y_new, atol=1e-4)


# -- exact folding on tiny architectures ---------------------------------------------------------
FOLD_FAMILIES = ["llama", "llama-mha", "qwen3", "qwen3_moe", "gpt2", "opt", "gemma2", "mistral", "phi3"]


def _tiny(family: str):
    from qcore.tiny import tiny_model

    if family == "llama-mha":  # equal q/kv heads: v -> o can be folded
        return tiny_model("llama", num_key_value_heads=4)
    return tiny_model(family)


def _perturb_norms(model) -> None:
    """Random norm weights/biases, so folding into them (incl. Gemma's 1 + w) is really tested."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if "norm" in type(mod).__name__.lower() or "ln" in name.split(".")[-1]:
                for p in mod.parameters(recurse=False):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))


def _ids(model, n: int = 2, t: int = 24):
    return torch.randint(3, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(7))


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


class _Block:
    """The part of the engine's BlockContext that folding needs."""

    def __init__(self, module):
        self.module = module

    def linear(self, name):
        return self.module.get_submodule(name)


@pytest.mark.parametrize("family", FOLD_FAMILIES)
def test_fold_random_scales_keeps_logits(family):
    from qcore.arch.introspect import inspect_model
    from qcore_awq.quantizer import AWQQuantizer

    from qcore_awq.config import AWQConfig

    model = _tiny(family)
    _perturb_norms(model)
    info = inspect_model(model)
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    q = AWQQuantizer(AWQConfig(), None)
    g = torch.Generator().manual_seed(11)
    folded, skipped = [], []
    for b in info.blocks:
        for group in b.scale_groups:
            if not group.scalable:
                assert group.reason, f"{family}: unscalable group {group.role} without a reason"
                skipped.append(group.role)
                continue
            n_in = b.module.get_submodule(group.linears[0]).weight.shape[1]
            s = group_tie(group, torch.exp(0.7 * torch.randn(n_in, generator=g)))
            why = q.fold(_Block(b.module), group, s)
            assert why is None, f"{family} {group.role}: {why}"
            folded.append(group.role)
    with torch.no_grad():
        after = model(ids).logits
    assert folded, f"{family}: no scale group folded"
    assert _rel(after, before) < 1e-5, f"{family}: logits changed by {_rel(after, before):.2e} ({folded})"
    roles = set(folded)
    assert {"attn_in", "mlp_in"} <= roles or family == "qwen3_moe", (family, roles)
    if family in ("llama-mha", "llama"):  # GQA (llama): scales tied across query heads per kv head
        assert "attn_out" in roles


def _calib(model, n=4, t=32):
    from qcore.testing import tiny_calibration

    return tiny_calibration(model.config.vocab_size, n_samples=n, seq_len=t)


@pytest.mark.parametrize("family", ["llama", "llama-mha", "qwen3", "qwen3_moe", "gpt2", "opt", "gemma2"])
def test_searched_scales_fold_exactly(family):
    """The real search + fold (stopped before clipping/quantizing) leaves the logits unchanged."""
    from qcore.pipeline.engine import run_chain
    from qcore.registry import get_method

    model = _tiny(family)
    _perturb_norms(model)
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    spec = get_method("awq")
    q = spec.load_quantizer()(spec.config_cls(bits=3, group_size=32, n_grid=8, scale_gqa_attn_out=True), spec)
    q.fold_only = True
    run_chain(model, [q], calibration=_calib(model))
    with torch.no_grad():
        after = model(ids).logits
    statuses = [g["status"] for b in q.blocks for g in b["groups"]]
    assert any(s == "scaled" for s in statuses), statuses
    if family == "llama":  # GQA v -> o searched with tied scales (and folded when one beat none)
        attn_out = [g["status"] for b in q.blocks for g in b["groups"] if g["role"] == "attn_out"]
        assert attn_out and not any(st.startswith("skipped") for st in attn_out), attn_out
    assert _rel(after, before) < 1e-5, f"{family}: {_rel(after, before):.2e}"


def test_gqa_attn_out_is_skipped_by_default_with_reason():
    import qcore

    model = _tiny("llama")
    qcore.quantize(model, "awq", calibration=_calib(model), bits=3, group_size=32, n_grid=4, clip_grid=4)
    blocks = model.qcore_record["chain"][-1]["record"]["blocks"]
    attn_out = [g["status"] for b in blocks for g in b["groups"] if g["role"] == "attn_out"]
    assert attn_out and all("grouped-query" in st and "scale_gqa_attn_out" in st for st in attn_out)


# -- conformance, quantization, chaining -----------------------------------------------------------
class TestAWQConformance(MethodConformance):
    method = "awq"
    plugin_module = "qcore_awq.plugin"
    tiny_options = {"bits": 4, "group_size": 32, "n_grid": 4, "clip_grid": 8}
    unsupported = [({"bits": 5}, "bits"), ({"group_size": 48}, "group"), ({"n_grid": 1}, "n_grid")]


def test_quantizes_and_records_timings():
    import qcore
    from qcore.quant.linear import QuantLinear

    model = _tiny("llama-mha")
    qcore.quantize(model, "awq", calibration=_calib(model), bits=3, group_size=32, n_grid=6, clip_grid=8)
    lin = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(lin) == 2 * 7
    rec = model.qcore_record["chain"][-1]["record"]
    assert rec["search_seconds_total"] > 0 and len(rec["blocks"]) == 2
    b = rec["blocks"][0]
    assert b["scale_search_s"] > 0 and b["clip_search_s"] > 0 and not b["deferred_to_later_method"]
    assert [g["role"] for g in b["groups"]] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]


def test_no_calibration_is_an_error():
    import qcore
    from qcore.registry import get_method

    spec = get_method("awq")
    q = spec.load_quantizer()(spec.config_cls(), spec)

    class NoInputs:
        inputs = None

    with pytest.raises(qcore.CalibrationError, match="calibration"):
        q.process_block(NoInputs())


def test_chain_with_gptq_hands_over_float_weights():
    import qcore
    from qcore.quant.linear import QuantLinear

    if "gptq" not in qcore.list_methods():
        pytest.skip("qcore-quant-gptq is not installed")
    model = _tiny("llama")
    qcore.quantize(model, ["awq", "gptq"], calibration=_calib(model), bits=3, group_size=32, n_grid=4,
                   clip_grid=8)
    chain = model.qcore_record["chain"]
    assert [c["method"] for c in chain[-2:]] == ["awq", "gptq"]
    assert all(b["deferred_to_later_method"] for b in chain[-2]["record"]["blocks"])
    assert not any(b["clipped_fraction"] for b in chain[-2]["record"]["blocks"])  # clip left to GPTQ
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7


@pytest.mark.parametrize("follower", ["adaround", "brecq"])
def test_chain_with_a_reconstruction_method(follower):
    """Any reconstruction method may follow AWQ (``kind:reconstruction``): it packs every linear
    from AWQ's scaled float weights."""
    import qcore
    from qcore.quant.linear import QuantLinear

    if follower not in qcore.list_methods():
        pytest.skip(f"qcore-quant-{follower} is not installed")
    model = _tiny("llama")
    qcore.quantize(model, ["awq", follower], calibration=_calib(model), bits=3, group_size=32, n_grid=4,
                   clip_grid=8)
    assert [c["method"] for c in model.qcore_record["chain"][-2:]] == ["awq", follower]
    assert all(b["deferred_to_later_method"] for b in model.qcore_record["chain"][-2]["record"]["blocks"])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7


# -- quality on real weights -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_increase():
    """Perplexity increase over float of RTN and AWQ, stories260K, 3-bit g32.

    stories260K's down_proj reads 172 features, which 32 does not divide: it stays float for
    both methods (so the up -> down group cannot help), and v -> o is GQA (skipped by default).
    Calibration: the last 40% of the TinyStories file; perplexity: the first 60% (disjoint)."""
    import copy

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity
    from qcore.models import load_model
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    model, tok = load_model(str(STORIES_DIR))
    stories = [s for s in TINYSTORIES_TXT.read_text().split("\n\n") if s.strip()]
    cut = int(len(stories) * 0.6)
    evaluation, calibration = stories[:cut], stories[cut:]
    calib = get_calibration(calibration, tok, n_samples=16, seq_len=256, seed=0)
    opts = {"bits": 3, "group_size": 32, "ignore": ["*.mlp.down_proj"]}
    base = perplexity(model, evaluation, tok, seq_len=512).ppl
    rtn = copy.deepcopy(model)
    qcore.quantize(rtn, "rtn", **opts)
    awq = copy.deepcopy(model)
    qcore.quantize(awq, "awq", calibration=calib, **opts)
    d_rtn = perplexity(rtn, evaluation, tok, seq_len=512).ppl - base
    d_awq = perplexity(awq, evaluation, tok, seq_len=512).ppl - base
    return d_rtn, d_awq


@requires_shared
def test_stories260k_awq_beats_rtn(stories_increase):
    """AWQ's increase at most 0.75x RTN's (the AWQ paper's own 3-bit ratio on Llama-2-7B is
    0.65x; a 64-wide model leaves scaling less room: measured 0.71x)."""
    d_rtn, d_awq = stories_increase
    assert d_rtn > 0
    assert d_awq <= 0.75 * d_rtn, f"AWQ +{d_awq:.3f} vs RTN +{d_rtn:.3f} (ratio {d_awq / d_rtn:.2f})"
