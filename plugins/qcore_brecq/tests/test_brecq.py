"""Tests of the BRECQ plugin: the pure functions, the engine integration on tiny models (dense,
MoE, batched masks), and quality on real weights (stories260K, needs ../shared)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from qcore_brecq.brecq import (
    dequantize,
    fake_quant,
    hard_codes,
    nearest_codes,
    round_regularizer,
    rounding_vars,
    slice_windows,
    storage_round,
)

from qcore.quant import QuantLinear, quant_params
from qcore.testing import MethodConformance, requires_shared, tiny_calibration

TINY = {"bits": 4, "group_size": 32, "iterations": 20}
SCRAMBLE = {"iterations": 3, "lr": 1000.0, "warmup": 0.0, "reg_lambda": 0.0}
"""Options whose learned rounding ends worse than round-to-nearest (a learning rate far too large)."""


def _weight(out: int = 16, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed))


# -- the pure functions ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_soft_weight_starts_at_the_float_weight(bits: int, sym: bool) -> None:
    """Inside the grid's range the relaxed weight equals w at initialization (AdaRound's start)."""
    w = _weight()
    s, z = quant_params(w, bits, 32, sym)
    rv = rounding_vars(w, s, z, bits, 32)
    soft = fake_quant(rv)
    inside = (rv.base >= 0) & (rv.base + 1 <= rv.maxq)  # both neighbouring codes on the grid
    torch.testing.assert_close(soft[inside], w[inside], atol=1e-5, rtol=1e-4)
    assert soft.requires_grad and torch.autograd.grad(soft.sum(), rv.v)[0].abs().sum() > 0


@pytest.mark.parametrize("learn_scales", [False, True])
def test_hard_weight_is_what_the_codes_dequantize_to(learn_scales: bool) -> None:
    w = _weight()
    s, z = quant_params(w, 3, 32, False)
    rv = rounding_vars(w, s, z, 3, 32, learn_scales)
    with torch.no_grad():
        rv.v.add_(torch.randn(rv.v.shape, generator=torch.Generator().manual_seed(1)))
        if learn_scales:
            rv.log_scale.add_(0.05)
    codes = hard_codes(rv)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    assert torch.equal(fake_quant(rv, hard=True), dequantize(codes, rv.current_scales(), rv.zeros, 32))
    # every code is the weight rounded down or up on the initial grid
    near = nearest_codes(w, rv)
    assert bool(((codes.float() - near).abs() <= 1).all())
    # the scales are those the packed layer stores (bfloat16 at <= 4 bits)
    assert torch.equal(rv.current_scales(), storage_round(rv.current_scales(), 3))


def test_regularizer_is_zero_on_binary_h_and_one_at_half() -> None:
    assert float(round_regularizer([torch.tensor([0.0, 1.0]), torch.tensor([1.0])], 2.0)) == 0.0
    assert float(round_regularizer([torch.full((3,), 0.5)], 20.0)) == 1.0


def test_slice_windows_takes_only_batched_tensors() -> None:
    idx = torch.tensor([1, 3])
    args = (torch.arange(4 * 2 * 3.0).reshape(4, 2, 3), None)
    kwargs = {"mask": torch.zeros(4, 1, 2, 2), "pos": (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)),
              "cache_position": torch.arange(4), "flag": False}
    a, k = slice_windows(args, idx, 4), slice_windows(kwargs, idx, 4)
    assert torch.equal(a[0], args[0][idx]) and a[1] is None
    assert k["mask"].shape == (2, 1, 2, 2) and k["pos"][0].shape == (1, 2, 5)
    assert torch.equal(k["cache_position"], torch.arange(4)) and k["flag"] is False


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_trained_activation_grid_is_the_one_that_runs(dynamic: bool, bits: int) -> None:
    """What the reconstruction trains (``ActStep.fake_quant``) is what the saved ``ActQuant``
    computes at run time, after the step was moved by training."""
    from qcore_brecq.act import init_step

    from qcore.quant.act import fake_quant_act

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 4, 48)
    step = init_step(x, bits, dynamic)
    with torch.no_grad():
        step.param.add_(-0.3 if dynamic else 0.1)
    torch.testing.assert_close(step.fake_quant(x), fake_quant_act(x, step.to_act()), rtol=0, atol=1e-6)


def test_static_step_gets_the_lsq_gradient() -> None:
    """d out / d s is round(x/s) - x/s inside the grid and +-m outside it (Esser et al., 2020)."""
    from qcore_brecq.act import static_fake_quant

    x = torch.tensor([0.26, -0.74, 0.05, 3.0, -5.0])
    log_step = torch.tensor(math.log(0.1), requires_grad=True)
    static_fake_quant(x, log_step, 4).sum().backward()
    s = log_step.detach().exp()
    v = x / s  # 2.6, -7.4 (outside: the clamp is applied before rounding), 0.5, 30, -50
    per_element = torch.where(v.abs() <= 7, v.round() - v, 7 * v.sign())
    assert float(per_element[1]) == -7.0
    torch.testing.assert_close(log_step.grad, per_element.sum() * s, rtol=1e-5, atol=1e-6)


def test_initial_grid_clips_an_outlier() -> None:
    """The initial search clips when a few outliers would waste the grid (smaller error than the
    full range), and keeps the full range on uniform data."""
    from qcore_brecq.act import init_step

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    x[0, 0] = 60.0
    clipped = init_step(x, 4, dynamic=False)
    full = float(x.abs().max()) / 7
    assert math.exp(float(clipped.param)) < 0.5 * full
    uniform = torch.rand(512, 32, generator=gen) * 2 - 1
    assert math.exp(float(init_step(uniform, 4, dynamic=False).param)) > 0.9 * float(uniform.abs().max()) / 7


# -- the engine ------------------------------------------------------------------------------------

class TestBrecqConformance(MethodConformance):
    method = "brecq"
    plugin_module = "qcore_brecq.plugin"
    tiny_options = TINY
    unsupported: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"bits": 7}, "bits"), ({"group_size": 48}, "group"),
        ({"beta_start": 2.0, "beta_end": 20.0}, "beta_end"), ({"loss": "kl"}, "loss"), ({"a_bits": 5}, "a_bits")]


def _record(model: torch.nn.Module) -> dict:
    return [e for e in model.qcore_record["chain"] if e["method"] == "brecq"][-1]["record"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_a_subset_of_windows_gives_those_windows_outputs(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block on windows ``idx`` (its masks, positions sliced too) equals the whole batch's
    output at those windows: gemma2 passes a batched 4-D mask, opt batched position ids."""
    from qcore_brecq.quantizer import BrecqQuantizer, param_names

    import qcore
    from qcore.tiny import tiny_model

    checked = []

    def spy(self: BrecqQuantizer, block: Any) -> None:
        names = block.quantizable(self.config)
        params = param_names(block.module, {n: block.linear(n) for n in names})
        ws = {n: block.linear(n).weight.detach() for n in names}
        idx = torch.tensor([0, 2, 5])
        with torch.no_grad():
            full = self._run(block, params, ws, 0)
            part = self._run(block, params, ws, 0, idx)
        torch.testing.assert_close(part, full[idx], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, block.float_outputs[0], atol=1e-5, rtol=1e-5)
        checked.append(block.index)

    monkeypatch.setattr(BrecqQuantizer, "process_block", spy)
    model = tiny_model(family)
    qcore.quantize(model, "brecq", calibration=tiny_calibration(model.config.vocab_size, n_samples=8), **TINY)
    assert checked == [0, 1]


@pytest.mark.parametrize(("learn_scales", "scramble", "bits"),
                         [(False, False, 4), (True, False, 4), (False, True, 4), (False, False, 2)])
def test_packed_layers_hold_what_the_fake_quant_forward_used(learn_scales: bool, scramble: bool, bits: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored codes, scales and zero points dequantize to exactly the weights the
    reconstruction error was measured with (the hardened fake-quantized ones on their refit scales
    where the refit was kept, or round-to-nearest's where a block keeps it); the model's parameters
    get no gradient."""
    from qcore_brecq import quantizer as qmod

    import qcore
    from qcore.tiny import tiny_model

    hard: dict[str, torch.Tensor] = {}
    pack = qmod.BrecqQuantizer._pack

    def spy(self: Any, block: Any, names: list[str], rvs: dict, nearest: frozenset = frozenset()) -> None:
        for n, rv in rvs.items():
            w = (dequantize(nearest_codes(block.linear(n).weight, rv), rv.scales, rv.zeros, rv.group_size)
                 if n in nearest else fake_quant(rv, hard=True))
            hard[f"{block.name}.{n}"] = w.detach()
        pack(self, block, names, rvs, nearest)

    monkeypatch.setattr(qmod.BrecqQuantizer, "_pack", spy)
    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), learn_scales=learn_scales,
                   **{**TINY, "bits": bits, **(SCRAMBLE if scramble else {})})
    assert len(hard) == 2 * 7
    blocks = _record(model)["blocks"].values()
    assert not scramble or any(b["kept_nearest"] for b in blocks)
    assert bits != 2 or any(b["refit"] for b in blocks)
    for name, w in hard.items():
        lin = model.get_submodule(name)
        assert isinstance(lin, QuantLinear)
        assert torch.equal(lin.dequantize_weight().float(), w), name
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dynamic", [False, True])
def test_activation_quantization_is_saved_and_reloaded_bit_exactly(dynamic: bool, tmp_path: Any) -> None:
    """a_bits: every quantized linear runs its learned 4-bit activation grid; the checkpoint
    reloads to the same logits; the block error stays below round-to-nearest's."""
    import qcore
    from qcore.tiny import tiny_model

    model = tiny_model("llama")
    calib = tiny_calibration(model.config.vocab_size, n_samples=8)
    qcore.quantize(model, "brecq", calibration=calib, a_bits=4, a_dynamic=dynamic, **TINY)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act is not None and m.act.bits == 4 and m.act.dynamic == dynamic for m in layers)
    blocks = _record(model)["blocks"].values()
    assert all(b["error_vs_rtn"] < 1.0 and len(b["activation_grids"]) == 7 for b in blocks)
    x = calib.input_ids[:2]
    with torch.no_grad():
        ref = model(x).logits
    qcore.save(model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(qcore.load(tmp_path / "ckpt")(x).logits, ref)


def test_per_layer_precision_map_is_honoured() -> None:
    import qcore
    from qcore.tiny import tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128),
                   **{**TINY, "bits": {"default": 3, "*.down_proj": 4}, "group_size": {"default": 32, "*.o_proj": -1}})
    modules = model.qcore_record["modules"]
    assert len(modules) == 14
    for name, meta in modules.items():
        want_bits = 4 if name.endswith("down_proj") else 3
        want_group = -1 if name.endswith("o_proj") else 32
        assert (meta["bits"], meta["group_size"]) == (want_bits, want_group), name
        lin = model.get_submodule(name)
        assert lin.bits == want_bits


def test_a_block_worse_than_round_to_nearest_keeps_round_to_nearest() -> None:
    """A learning rate far too large scrambles the rounding: such a block reverts linears to
    round-to-nearest on their initial grid until its error is below the learned one's, never
    above round-to-nearest's, and says which."""
    import qcore
    from qcore.tiny import tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), **{**TINY, **SCRAMBLE})
    blocks = _record(model)["blocks"]
    kept = {name: b["kept_nearest"] for name, b in blocks.items() if b["kept_nearest"]}
    assert kept, blocks
    for name, linears in kept.items():
        assert blocks[name]["error_vs_rtn"] <= 1.0
        assert set(linears) <= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}, linears
        if len(linears) == 7:
            assert blocks[name]["error_vs_rtn"] == 1.0 and blocks[name]["flipped"] == 0.0


def test_scale_refit_is_kept_only_where_it_lowers_the_block_error() -> None:
    """Each linear's scales refit to its hardened codes stay only where the block's error drops:
    every block ends at or below its error before the refit (strictly where a refit was kept), and
    at 2 bits some linear of the tiny model keeps one; ``scale_refit=False`` refits nothing."""
    import qcore
    from qcore.tiny import tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), **{**TINY, "bits": 2})
    blocks = list(_record(model)["blocks"].values())
    assert any(b["refit"] for b in blocks), blocks
    for b in blocks:
        assert b["error"] <= b["error_before_refit"]
        assert (b["error"] < b["error_before_refit"]) == bool(b["refit"])
    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), scale_refit=False, **{**TINY, "bits": 2})
    assert all(not b["refit"] and b["error"] == b["error_before_refit"] for b in _record(model)["blocks"].values())


def test_step_windows_span_batches_only_when_one_is_too_small() -> None:
    """A step draws its windows from one captured batch where it holds enough (a subset, or the
    whole batch as None), else whole distinct batches until the count is reached."""
    from qcore_brecq.quantizer import _step_windows

    gen = torch.Generator().manual_seed(0)
    (b, idx), = _step_windows([4, 4, 4], 2, gen)
    assert b in (0, 1, 2) and idx is not None and len(idx) == 2 and bool((idx[1:] > idx[:-1]).all())
    (b, idx), = _step_windows([4, 4, 4], 4, gen)
    assert idx is None
    picks = _step_windows([1] * 8, 4, gen)
    assert len(picks) == 4 and len({b for b, _ in picks}) == 4
    assert all(idx is None for _, idx in picks)
    assert sorted(b for b, _ in _step_windows([1, 1, 1], 8, gen)) == [0, 1, 2]


def test_training_in_bfloat16_packs_what_the_float32_error_measured() -> None:
    """``train_dtype="bfloat16"`` runs the training steps under autocast and several batches per
    step; the final error (float32) still decides, and stays below round-to-nearest's at 2 bits."""
    import qcore
    from qcore.tiny import tiny_model

    model = tiny_model("llama")
    calib = tiny_calibration(model.config.vocab_size, n_samples=8)
    qcore.quantize(model, "brecq", calibration=calib, train_dtype="bfloat16", batch_tokens=4096,
                   **{**TINY, "bits": 2})
    blocks = _record(model)["blocks"].values()
    assert all(b["error_vs_rtn"] < 1.0 and len(b["kept_nearest"]) < 7 for b in blocks), blocks


def test_moe_model_quantizes_every_expert() -> None:
    import qcore
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("qwen3_moe")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), **TINY)
    experts = [n for n in model.qcore_record["modules"] if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x linears
    assert all(not n.endswith("mlp.gate") for n in model.qcore_record["modules"])  # routers stay float
    assert _record(model)["blocks"]["model.layers.0"]["linears"] == 4 + 4 * 3
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()


def test_fisher_loss_runs_the_gradient_pass() -> None:
    import qcore
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, "brecq", calibration=tiny_calibration(128), loss="fisher", **TINY)
    assert "gradient_pass_seconds" in model.qcore_record
    assert len(_record(model)["blocks"]) == 2
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()


def test_degenerate_calibration_never_puts_nan_in_the_model() -> None:
    import qcore
    from qcore.data import CalibrationData
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    calib = CalibrationData(torch.full((2, 16), 7, dtype=torch.long), {"source": "constant"})
    qcore.quantize(model, "brecq", calibration=calib, **{**TINY, "bits": 2})
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert torch.isfinite(buf).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()



@pytest.mark.parametrize("first", ["smoothquant"])
def test_chain_with_a_scaling_method_runs(first: str) -> None:
    """After a transform the linears carry folded scales; BRECQ trains and packs them all the same."""
    import qcore
    from qcore.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    qcore.quantize(model, [first, "brecq"], calibration=tiny_calibration(128), **TINY)
    assert [c["method"] for c in model.qcore_record["chain"]] == [first, "brecq"]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in model.qcore_record["modules"])
    assert len(model.qcore_record["modules"]) == 14
    with torch.no_grad():
        assert torch.isfinite(model(tiny_inputs(model)).logits).all()

# -- quality on real weights (stories260K) ---------------------------------------------------------

STORIES_IGNORE = ["*.mlp.down_proj"]
"""stories260K's MLP width is 172, which no group of 32 divides: its down_proj stays float."""
RATIO_BOUND = 0.75
"""BRECQ's increase over GPTQ's: measured 0.63x on this test's calibration (seed 0; 0.57x and
0.59x with step_seed 1 and 2, 0.49-0.53x on calibration seed 1), busy 2-core machine, one torch
thread, 2026-12-01; the bound leaves margin for that spread."""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: for a model this small a second thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.shared
@requires_shared
@pytest.mark.usefixtures("one_thread")
def test_stories260k_3bit_g32_against_gptq() -> None:
    """The GPTQ and AdaRound plugins' protocol: evaluated on the first 8192 tokens of the
    TinyStories head, calibrated on 32 windows of 128 tokens (seed 0) from the second half of the
    same file, ``mlp.down_proj`` kept float; BRECQ at its defaults."""
    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity
    from qcore.models import load_model
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    model, tok = load_model(STORIES_DIR)
    base = perplexity(model, TINYSTORIES_TXT, tok, max_tokens=8192).ppl
    text = TINYSTORIES_TXT.read_text(encoding="utf-8")
    calib = get_calibration([text[len(text) // 2:]], tok, n_samples=32, seq_len=128, seed=0)
    increase, records = {}, {}
    for method in ("gptq", "brecq"):
        m, _ = load_model(STORIES_DIR)
        qcore.quantize(m, method, bits=3, group_size=32, ignore=STORIES_IGNORE, calibration=calib)
        increase[method] = perplexity(m, TINYSTORIES_TXT, tok, max_tokens=8192).ppl - base
        records[method] = m.qcore_record["chain"][-1].get("record", {})
    ratio = increase["brecq"] / increase["gptq"]
    msg = (f"float {base:.3f}; increase GPTQ +{increase['gptq']:.3f}, BRECQ +{increase['brecq']:.3f} "
           f"({ratio:.2f}x GPTQ's)")
    print(msg)
    assert math.isfinite(base) and increase["gptq"] > 0, msg
    assert increase["brecq"] <= RATIO_BOUND * increase["gptq"], msg
    # the learned rounding lowers every block's output error below round-to-nearest's
    assert all(b["error_vs_rtn"] < 1.0 for b in records["brecq"]["blocks"].values()), records["brecq"]


@pytest.mark.shared
@requires_shared
@pytest.mark.usefixtures("one_thread")
def test_stories260k_w4a4_learned_steps_beat_the_searched_ones() -> None:
    """W4A4 with static per-tensor activation steps (the protocol above, 4-bit g32): learning the
    steps with the rounding lowers the perplexity increase below keeping the initial (error-
    searched) steps. At ``reg_lambda`` 30 the rounding stays soft longer and the steps adapt with
    it (learned below kept on seeds 0 and 1); at the default 300 learned is below kept on average
    over those seeds but not on seed 0 alone (docs/results.md), so this compares them at 30."""
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
    for learn in (True, False):
        m, _ = load_model(STORIES_DIR)
        qcore.quantize(m, "brecq", bits=4, group_size=32, ignore=STORIES_IGNORE, calibration=calib, a_bits=4,
                       a_learn=learn, reg_lambda=30.0)
        increase[learn] = perplexity(m, TINYSTORIES_TXT, tok, max_tokens=8192).ppl - base
    msg = f"float {base:.3f}; W4A4 increase: learned steps +{increase[True]:.3f}, searched steps +{increase[False]:.3f}"
    print(msg)
    assert 0 < increase[True] < increase[False], msg
