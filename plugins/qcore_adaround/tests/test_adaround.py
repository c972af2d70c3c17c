"""Tests of the AdaRound plugin: the pure functions on random matrices, the engine integration on
tiny models, chains, and quality on real weights (stories260K, needs ../shared)."""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch
from qcore_adaround.adaround import (
    beta_at,
    expand_groups,
    group_output_error,
    init_v,
    learn_rounding,
    grid_error,
    objective_and_gradient,
    product_dtype,
    output_error,
    rectified_sigmoid,
    refit_scales,
    round_regularizer,
    row_errors,
    rounding_problem,
    rtn_weight,
    search_scales,
)

from qcore.plugin import BlockContext
from qcore.quant import QuantLinear, quant_params, quantize_rtn
from qcore.testing import MethodConformance, requires_shared, tiny_calibration

FAST = {"iterations": 200, "lr": 0.01, "reg_lambda": 30.0, "warmup": 0.2, "beta_start": 20.0, "beta_end": 2.0}
"""Options of the pure-function tests: few steps, a small learning rate, the default regularizer."""


def _layer(out: int, dim: int, rank: int, n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight [out, dim] and n inputs [n, dim] that lie close to a rank-``rank`` subspace."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=gen) @ torch.randn(rank, dim, generator=gen)
    return torch.randn(out, dim, generator=gen), x + 0.1 * torch.randn(n, dim, generator=gen)


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


# -- the pure functions ----------------------------------------------------------------------------

def test_init_v_reproduces_the_fractional_part() -> None:
    w = _layer(16, 64, rank=8)[0] * 3.7
    frac = w - torch.floor(w)
    torch.testing.assert_close(rectified_sigmoid(init_v(frac)), frac, atol=1e-5, rtol=0)


def test_rectified_sigmoid_reaches_0_and_1() -> None:
    h = rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0]))
    assert h.tolist() == [0.0, pytest.approx(0.5), 1.0]


def test_regularizer() -> None:
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert float(round_regularizer(binary, 2.0)[0]) == 0.0
    assert float(round_regularizer(torch.full((4,), 0.5), 20.0)[0]) == 1.0
    # a high beta is flat (about 1) except next to 0 and 1, so h moves freely; as beta decays the
    # slope towards the nearer of 0 and 1 reaches every h
    h = torch.tensor([0.3, 0.7])
    slopes = [round_regularizer(h, beta)[1] for beta in (20.0, 2.0)]
    assert 0.0 < float(slopes[0][0]) < 0.01 < float(slopes[1][0])
    assert torch.equal(slopes[1][1], -slopes[1][0])
    ref = h.clone().requires_grad_(True)
    (1.0 - (2.0 * ref - 1.0).abs().pow(2.0)).mean().backward()
    torch.testing.assert_close(slopes[1], ref.grad)


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
def test_hand_written_gradient_equals_autograd(beta: float | None) -> None:
    w, x = _layer(16, 64, rank=8, n=256)
    h = _second_moment(x)
    s, z = quant_params(w, 3, 32, False)
    prob = rounding_problem(w, h, s, z, 3, 32)
    v = init_v(w / prob.s + prob.z - prob.base) + 2.0 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    loss, grad = objective_and_gradient(v, prob, 30.0, beta)
    ref = v.clone().requires_grad_(True)
    hv = rectified_sigmoid(ref)
    want = output_error(prob.weight(prob.base + hv) - w, h) / prob.rtn_error
    if beta is not None:
        want = want + 30.0 * (1.0 - (2.0 * hv - 1.0).abs().pow(beta)).mean()
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(grad, ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [None, 20.0, 1.0])
def test_bfloat16_product_gives_the_float32_gradient_within_its_precision(beta: float | None) -> None:
    """The step's ``dW H`` in bfloat16 changes the gradient by bfloat16's rounding only (a few
    parts in a thousand), the regularizer's part (beta 1 included: ``|t|^0 = 1``) not at all."""
    w, x = _layer(32, 128, rank=16, n=512)
    h = _second_moment(x)
    s, z = quant_params(w, 3, 32, False)
    v = 2.0 * torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    _, ref = objective_and_gradient(v, rounding_problem(w, h, s, z, 3, 32), 30.0, beta)
    _, got = objective_and_gradient(v, rounding_problem(w, h, s, z, 3, 32, torch.bfloat16), 30.0, beta)
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 1e-2


def test_product_race_picks_a_dtype_once_per_shape() -> None:
    picked = product_dtype(64, 96)
    assert picked in (torch.float32, torch.bfloat16)
    assert product_dtype(64, 96) is picked
    w, x = _layer(64, 96, rank=16, n=256)
    res = learn_rounding(w, _second_moment(x), *quant_params(w, 3, 32, False), 3, 32, **FAST, product=None)
    assert res.error < res.rtn_error


def test_beta_schedule() -> None:
    n, warm = 100, 0.2
    betas = [beta_at(i, n, warm, 20.0, 2.0) for i in range(n)]
    assert all(b is None for b in betas[:20]) and betas[20] == 20.0 and betas[-1] == pytest.approx(2.0)
    decay = betas[20:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert beta_at(0, 10, 0.0, 20.0, 2.0) == 20.0


def test_output_error_equals_the_token_form() -> None:
    dw, x = _layer(12, 32, rank=8, n=512)
    dw = dw * 0.01
    tokens = float(((x @ dw.T) ** 2).mean())
    assert float(output_error(dw, _second_moment(x))) == pytest.approx(tokens, rel=1e-4)
    # per channel, the group error is the whole error of each row
    rows = group_output_error(dw, _second_moment(x), -1)
    assert rows.shape == (12, 1) and float(rows.sum() / 12) == pytest.approx(tokens, rel=1e-4)


def test_scale_search_never_worse_than_min_max() -> None:
    w, x = _layer(16, 64, rank=16, n=1024)
    h = _second_moment(x)
    w[:, 3] *= 6  # outliers: clipping pays
    s0, z0 = quant_params(w, 3, 32, False)
    s1, z1 = search_scales(w, h, 3, 32, False, 0.7)
    before = group_output_error(rtn_weight(w, s0, z0, 3, 32) - w, h, 32)
    after = group_output_error(rtn_weight(w, s1, z1, 3, 32) - w, h, 32)
    assert bool((after <= before + 1e-6).all()) and float(after.sum()) < float(before.sum())
    assert torch.equal(search_scales(w, h, 3, 32, False, 1.0)[0], s0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_hardened_codes_round_up_or_down_and_stay_in_range(bits: int, sym: bool) -> None:
    w, x = _layer(16, 64, rank=8, n=512)
    h = _second_moment(x)
    s, z = quant_params(w, bits, 32, sym)
    res = learn_rounding(w, h, s, z, bits, 32, **{**FAST, "iterations": 30})
    codes = res.codes.float()
    assert res.codes.dtype == torch.uint8 and res.codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    scaled = w / expand_groups(s, 64, 32) + expand_groups(z, 64, 32)
    lo, hi = torch.floor(scaled).clamp(0, 2**bits - 1), torch.ceil(scaled).clamp(0, 2**bits - 1)
    assert bool(((codes == lo) | (codes == hi)).all())


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, -1])
def test_learned_rounding_beats_rtn_at_3_bits(sym: bool, group: int) -> None:
    w, x = _layer(48, 128, rank=16)
    s, z = quant_params(w, 3, group, sym)
    res = learn_rounding(w, _second_moment(x), s, z, 3, group, **FAST)
    rtn = quantize_rtn(w, 3, group, sym)
    assert torch.equal(s, rtn.scales)
    layer = float(((x @ (rtn.dequantize() - w).T) ** 2).mean())
    assert res.rtn_error == pytest.approx(layer, rel=1e-3)
    # low-rank inputs leave a lot of room: the learned rounding's output error is a fraction of RTN's
    assert res.error < 0.5 * res.rtn_error and 0.0 < res.flipped < 0.5


@pytest.mark.parametrize("group", [16, -1])
def test_refit_scales_is_each_rows_least_squares_fit(group: int) -> None:
    """Against an explicit least-squares solve of each row's weighted error over its group
    scales (design matrix: one column per group, weighted by H's square root)."""
    w, x = _layer(6, 48, rank=6, n=512)
    h = _second_moment(x)
    s, z = quant_params(w, 3, group, False)
    codes = learn_rounding(w, h, s, z, 3, group, **FAST).codes
    new = refit_scales(w, h, codes, s, z, group)
    q = codes.float() - expand_groups(z, 48, group)
    root = torch.linalg.cholesky(h.double() + 1e-9 * torch.eye(48, dtype=torch.float64))
    gs = 48 if group == -1 else group
    for r in range(6):
        design = torch.zeros(48, 48 // gs, dtype=torch.float64)
        for g in range(48 // gs):
            design[g * gs:(g + 1) * gs, g] = q[r, g * gs:(g + 1) * gs].double()
        want = torch.linalg.lstsq(root.T @ design, root.T @ w[r].double()).solution
        torch.testing.assert_close(new[r].double(), want, rtol=1e-3, atol=1e-6)
    assert grid_error(w, h, codes, new, z, group) < grid_error(w, h, codes, s, z, group)


def test_refit_scales_never_worsens_a_row() -> None:
    """A row whose fit would be worse or not positive keeps its scales: here rows whose codes all
    sit at the zero point (no say in the scale) and a row flipped in sign against its codes."""
    w, x = _layer(8, 32, rank=8, n=512)
    h = _second_moment(x)
    s, z = quant_params(w, 4, 16, False)
    codes = learn_rounding(w, h, s, z, 4, 16, **FAST).codes.clone()
    codes[0] = expand_groups(z, 32, 16)[0].to(codes.dtype)  # q = 0: nothing to fit
    w_flipped = w.clone()
    w_flipped[1] = -w[1]  # the best scales of row 1 would be negative
    new = refit_scales(w_flipped, h, codes, s, z, 16)
    assert torch.equal(new[0], s[0]) and torch.equal(new[1], s[1])
    before = row_errors((codes.float() - expand_groups(z, 32, 16)) * expand_groups(s, 32, 16) - w_flipped, h)
    after = row_errors((codes.float() - expand_groups(z, 32, 16)) * expand_groups(new, 32, 16) - w_flipped, h)
    assert bool((after <= before).all()) and bool((new > 0).all())


def test_without_calibration_signal_it_is_round_to_nearest() -> None:
    """A zero Hessian leaves only the regularizer, which sends each weight to its nearest code."""
    w = _layer(16, 64, rank=8)[0]
    s, z = quant_params(w, 4, 32, False)
    res = learn_rounding(w, torch.zeros(64, 64), s, z, 4, 32, **{**FAST, "iterations": 50})
    assert torch.equal(res.codes, quantize_rtn(w, 4, 32, False).codes) and res.flipped == 0.0


# -- the engine ------------------------------------------------------------------------------------

TINY = {"bits": 4, "group_size": 32, "iterations": 20}


class TestAdaRoundConformance(MethodConformance):
    method = "adaround"
    plugin_module = "qcore_adaround.plugin"
    tiny_options = TINY
    unsupported: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"bits": 5}, "bits"), ({"group_size": 48}, "group"),
        ({"beta_start": 2.0, "beta_end": 20.0}, "beta_end"), ({"scale_init": "hqq"}, "scale_init")]


def _record(model: torch.nn.Module) -> dict:
    return [e for e in model.qcore_record["chain"] if e["method"] == "adaround"][-1]["record"]


def test_true_sequential_order_and_shared_hessians(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v, then o, then gate/up, then down, each subset observed after the previous one was
    quantized; q/k/v and gate/up share one Hessian."""
    from qcore_adaround.quantizer import AdaRoundQuantizer

    import qcore
    from qcore.tiny import tiny_model

    seen: list[tuple[tuple[str, ...], bool]] = []
    process = AdaRoundQuantizer.process_block

    def spy(self: AdaRoundQuantizer, block: BlockContext) -> None:
        observe = block.observe

        def observed(names: Sequence[str], stat: str, **kw: Any) -> dict[str, Any]:
            if block.index == 0:
                seen.append((tuple(names), isinstance(block.linear("self_attn.q_proj"), QuantLinear)))
            return observe(names, stat, **kw)

        block.observe = observed
        process(self, block)

    monkeypatch.setattr(AdaRoundQuantizer, "process_block", spy)
    model = tiny_model("llama")
    qcore.quantize(model, "adaround", calibration=tiny_calibration(128), **TINY)
    assert seen == [(("self_attn.q_proj",), False), (("self_attn.o_proj",), True),
                    (("mlp.gate_proj",), True), (("mlp.down_proj",), True)]
    layers = _record(model)["layers"]
    assert list(layers)[:7] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert all(v["nsamples"] == 4 * 32 and v["error"] <= v["rtn_error"] * 1.5 for v in layers.values())


def test_moe_model_quantizes_every_expert() -> None:
    import qcore
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("qwen3_moe")
    qcore.quantize(model, "adaround", calibration=tiny_calibration(128), **TINY)
    rec = _record(model)
    assert sum(".experts." in k for k in rec["layers"]) == 2 * 4 * 3  # layers x experts x linears
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()


def test_degenerate_calibration_never_puts_nan_in_the_model() -> None:
    """Every window the same token: rank-deficient Hessians everywhere."""
    import qcore
    from qcore.data import CalibrationData
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    calib = CalibrationData(torch.full((2, 16), 7, dtype=torch.long), {"source": "constant"})
    qcore.quantize(model, "adaround", calibration=calib, **{**TINY, "bits": 2})
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert torch.isfinite(buf).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()


@pytest.mark.parametrize("first", ["smoothquant", "awq"])
def test_chain_with_a_scaling_method_runs(first: str) -> None:
    import qcore
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, [first, "adaround"], calibration=tiny_calibration(128), **TINY)
    assert [c["method"] for c in model.qcore_record["chain"]] == [first, "adaround"]
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()


# -- quality on real weights (stories260K) ---------------------------------------------------------

STORIES_IGNORE = ["*.mlp.down_proj"]
"""stories260K's MLP width is 172, which no group of 32 divides: its down_proj stays float."""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: for a model this small, waking a second thread costs more than it saves
    (on 2 busy cores the test takes about 3x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.shared
@requires_shared
@pytest.mark.usefixtures("one_thread")
def test_stories260k_3bit_g32_against_gptq_and_rtn() -> None:
    """The GPTQ plugin's protocol: evaluated on the first 8192 tokens of the TinyStories head,
    calibrated on 32 windows of 128 tokens (seed 0) from the second half of the same file."""
    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity
    from qcore.models import load_model
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    model, tok = load_model(STORIES_DIR)
    base = perplexity(model, TINYSTORIES_TXT, tok, max_tokens=8192).ppl
    text = TINYSTORIES_TXT.read_text(encoding="utf-8")
    calib = get_calibration([text[len(text) // 2:]], tok, n_samples=32, seq_len=128, seed=0)
    increase = {}
    for method in ("rtn", "gptq", "adaround"):
        m, _ = load_model(STORIES_DIR)
        extra = {} if method == "rtn" else {"calibration": calib}
        qcore.quantize(m, method, bits=3, group_size=32, ignore=STORIES_IGNORE, **extra)
        increase[method] = perplexity(m, TINYSTORIES_TXT, tok, max_tokens=8192).ppl - base
    msg = (f"float {base:.3f}; increase RTN +{increase['rtn']:.3f}, GPTQ +{increase['gptq']:.3f}, "
           f"AdaRound +{increase['adaround']:.3f} ({increase['adaround'] / increase['gptq']:.2f}x GPTQ's)")
    print(msg)
    assert math.isfinite(base) and increase["rtn"] > 0, msg
    assert increase["adaround"] <= 0.7 * increase["rtn"], msg
