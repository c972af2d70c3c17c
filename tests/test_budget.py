"""Mixed precision under a size budget (qcore.pipeline.budget): the allocation is optimal, sizes
are the bytes QuantLinear stores, the budget holds on real quantized models, bad budgets are
refused before any slow work, the map survives save/load, and on stories260K the allocation beats
the uniform width of the same size."""
from __future__ import annotations

import itertools
import re
import random

import pytest
import torch

import qcore
from qcore.pipeline.budget import (
    BudgetConfig,
    allocate,
    average_bits,
    make_plan,
    measure_sensitivity,
    packed_bytes,
)
from qcore.plugin.errors import ConfigError
from qcore.testing import HAS_SHARED, requires_shared
from qcore.tiny import tiny_model

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32}


def _model():
    return tiny_model("llama", **SHAPE)


def _ids(model, n: int = 8, seq: int = 64):
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


def _quant_linears(model):
    from qcore.quant.linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _packed(model) -> tuple[int, int]:
    nbytes = weights = 0
    for m in _quant_linears(model).values():
        sd = m.state_dict()
        nbytes += sum(sd[k].nbytes for k in ("qweight", "scales", "qzeros"))
        weights += m.in_features * m.out_features
    return nbytes, weights


# -- allocation ------------------------------------------------------------------------------------
def _brute(sizes, costs, budget):
    best = None
    for ks in itertools.product(*(range(len(s)) for s in sizes)):
        if sum(s[k] for s, k in zip(sizes, ks)) <= budget:
            c = sum(co[k] for co, k in zip(costs, ks))
            best = c if best is None or c < best else best
    return best


def test_allocation_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(150):
        n, m = rng.randint(1, 6), rng.randint(1, 4)
        sizes = [[rng.randint(1, 60) for _ in range(m)] for _ in range(n)]
        costs = [[rng.random() * 10 for _ in range(m)] for _ in range(n)]
        budget = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
        picks = allocate(sizes, costs, budget)
        assert sum(s[k] for s, k in zip(sizes, picks)) <= budget
        assert sum(c[k] for c, k in zip(costs, picks)) == pytest.approx(_brute(sizes, costs, budget), abs=1e-9)


def test_coarse_grid_keeps_the_budget_and_stays_near_optimal() -> None:
    rng = random.Random(1)
    worse = []
    for _ in range(100):
        sizes = [sorted(rng.randint(100, 2000) for _ in range(3)) for _ in range(6)]
        costs = [sorted((rng.random() * 10 for _ in range(3)), reverse=True) for _ in range(6)]
        budget = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
        picks = allocate(sizes, costs, budget, max_cells=16)  # a grid far coarser than the sizes
        assert sum(s[k] for s, k in zip(sizes, picks)) <= budget
        worse.append(sum(c[k] for c, k in zip(costs, picks)) - _brute(sizes, costs, budget))
    assert min(worse) >= -1e-9
    assert sum(w < 1e-9 for w in worse) >= 50  # optimal in most instances (measured: 78 of 100)


def test_infeasible_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="below the smallest allocation"):
        allocate([[10, 20], [10, 30]], [[1, 0], [1, 0]], 19)


# -- sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("in_features,group", [(128, 32), (128, 64), (96, -1), (100, -1), (192, 64)])
def test_packed_bytes_are_what_quantlinear_stores(bits: int, in_features: int, group: int) -> None:
    from qcore.quant.linear import QuantLinear
    from qcore.quant.primitives import quantize_rtn

    w = torch.randn(48, in_features, generator=torch.Generator().manual_seed(bits))
    q = QuantLinear.from_quantized(quantize_rtn(w, bits, group, False), None)
    stored = sum(q.state_dict()[k].nbytes for k in ("qweight", "scales", "qzeros"))
    assert packed_bytes(48, in_features, bits, group) == stored


# -- sensitivity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["hessian", "fisher", "fisher_diag"])
def test_sensitivity_decreases_with_bits(criterion: str) -> None:
    from qcore.arch.introspect import inspect_model
    from qcore.pipeline.chain import resolve_chain
    from qcore.pipeline.engine import _as_calibration

    model = _model()
    chain = resolve_chain("rtn", None, {"group_size": 32})
    plan = make_plan(inspect_model(model), chain, BudgetConfig(bits=4.0, criterion=criterion))
    assert plan.candidates == [2, 3, 4, 8]  # rtn supports 2, 3, 4 and 8 of the default 2, 3, 4, 6, 8
    sens = measure_sensitivity(model, plan, _as_calibration(_ids(model)))
    assert set(sens) == {layer.name for layer in plan.layers} and len(sens) == 14
    for name, s in sens.items():
        assert all(a > b > 0 for a, b in zip(s, s[1:])), f"{name}: {s}"
    assert all(not isinstance(m, torch.nn.Linear) or m.weight.requires_grad for m in model.modules())


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("budget", [3.2, 3.5, 5.2])
def test_budget_holds_on_the_quantized_model(method: str, budget: float) -> None:
    model = _model()
    qcore.quantize(model, method, group_size=32, calibration=_ids(model), budget_bits=budget)
    nbytes, weights = _packed(model)
    assert len(_quant_linears(model)) == 14
    limit = int(budget * weights / 8)
    assert nbytes <= limit
    # close to it: no single layer could have been made one width wider within what is left
    # (the smallest step here is 2 -> 3 bits of a 64x128 k/v projection: 1,024 bytes)
    assert limit - nbytes < 1024
    rec = model.qcore_record["budget"]
    assert rec["bytes"] == nbytes and rec["avg_bits"] == pytest.approx(average_bits(nbytes, weights), abs=1e-4)
    bits_map = model.qcore_record["chain"][-1]["config"]["bits"]
    assert {k: v for k, v in bits_map.items() if k != "default"} == {n: q.bits for n, q in _quant_linears(model).items()}
    assert len(set(bits_map.values())) > 1 or budget == 5.2  # mixed where the budget allows


def test_budget_bytes_and_explicit_candidates() -> None:
    model = _model()
    weights = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "layers" in n)
    target = weights // 2  # 4.0 bits per weight: between all 2-bit (3.0 at g32) and all 4-bit (5.0)
    qcore.quantize(model, "rtn", group_size=32, calibration=_ids(model), budget_bytes=target,
                   budget_candidates=[2, 4])
    nbytes, _ = _packed(model)
    assert nbytes <= target and {q.bits for q in _quant_linears(model).values()} == {2, 4}


def test_bits_map_pins_layers_inside_the_budget() -> None:
    model = _model()
    qcore.quantize(model, "rtn", group_size=32, calibration=_ids(model), budget_bits=5.0,
                   bits={"default": 4, "*.mlp.down_proj": 8})
    q = _quant_linears(model)
    assert all(m.bits == 8 for n, m in q.items() if n.endswith("down_proj"))
    assert model.qcore_record["budget"]["pinned"] == 2
    nbytes, weights = _packed(model)
    assert nbytes <= 5.0 * weights / 8
    assert len({m.bits for n, m in q.items() if not n.endswith("down_proj")}) > 1


def test_ignored_layers_are_outside_the_budget() -> None:
    model = _model()
    qcore.quantize(model, "rtn", group_size=32, calibration=_ids(model), budget_bits=3.5, ignore=["*.self_attn.*"])
    q = _quant_linears(model)
    assert len(q) == 6 and not any("self_attn" in n for n in q)
    assert model.qcore_record["budget"]["layers"] == 6


def test_save_load_keeps_the_map_and_info_shows_it(tmp_path) -> None:
    from qcore.checkpoint import describe_checkpoint, format_info

    model = _model()
    qcore.quantize(model, "rtn", group_size=32, calibration=_ids(model), budget_bits=3.5)
    widths = {n: q.bits for n, q in _quant_linears(model).items()}
    path = qcore.save(model, tmp_path / "mixed")
    back = qcore.load(path)
    assert {n: q.bits for n, q in _quant_linears(back).items()} == widths
    assert back.qcore_record["budget"] == model.qcore_record["budget"]
    text = format_info(describe_checkpoint(path))
    assert "mixed precision: budget 3.5 bits per weight -> 3.5 bits per weight" in text
    assert "bits=per-layer map {" in text  # the chain line summarizes the 14-layer map


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    ({"budget_bits": 3.5, "bits": 4}, "pass either bits= or budget_bits="),
    ({"budget_bits": 3.5, "budget_bytes": 1000}, "exactly one of budget_bits="),
    ({"budget_bits": 3.5, "budget_candidates": [3, 6]}, "gptq supports weight bits 2, 3, 4, 8; budget_candidates has 6"),
    ({"budget_bits": 3.5, "budget_criterion": "l2"}, "budget_criterion"),
    ({"budget_bits": -1}, "budget_bits"),
    ({"budget_bits": 2.1}, "below the smallest allocation of gptq"),
])
def test_bad_budgets_are_refused_before_any_slow_work(options: dict, match: str) -> None:
    model = _model()
    # no calibration given: a refusal that came later would be a CalibrationError instead
    with pytest.raises(ConfigError, match=match):
        qcore.quantize(model, "gptq", group_size=32, **options)
    verdict = qcore.check(model, "gptq", group_size=32, **options)
    assert not verdict.ok and re.search(match, verdict.message()), verdict.message()


def test_a_chain_without_a_weight_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a method that quantizes weights"):
        qcore.quantize(_model(), "smoothquant", budget_bits=4.0)


def test_check_accepts_a_reachable_budget() -> None:
    assert qcore.check(_model(), "gptq", group_size=32, budget_bits=3.5).ok


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_flags_are_options() -> None:
    from qcore.cli import build_parser, parse_options

    args = build_parser().parse_args(["quantize", "x", "--out", "o", "--budget-bits", "3.5",
                                      "-o", "budget_criterion=hessian"])
    assert parse_options(args) == {"budget_bits": 3.5, "budget_criterion": "hessian"}


@requires_shared
def test_cli_quantize_and_info(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from qcore.cli import main

    out = tmp_path / "mixed"
    assert main(["quantize", "stories260k", "--method", "gptq", "--group-size", "32", "--ignore", "*.mlp.down_proj",
                 "--budget-bits", "4", "--n-samples", "8", "--seq-len", "128", "--out", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mixed precision: budget 4.0 bits per weight ->" in text and "over 30 layers" in text
    assert main(["check", "stories260k", "--method", "gptq", "--group-size", "32", "--ignore", "*.mlp.down_proj",
                 "--budget-bits", "4", "-o", "budget_candidates=[2,6]"]) == 1
    assert "budget_candidates has 6" in capsys.readouterr().out


# -- quality on real weights (stories260K) -----------------------------------------------------------
STORIES_IGNORE = ["*.mlp.down_proj"]
"""172 columns: no group of 32 divides them, so down_proj stays float in every run."""


@pytest.fixture(scope="module")
def stories_runs() -> dict[str, float]:
    """Perplexity on the first 8192 tokens of the TinyStories head; calibration: 32 windows of
    128 tokens (seed 0) from its second half. Uniform 3-bit g32 is 4.0 bits per weight with its
    scales and zero points; the mixed runs get budget_bits=4.0 (default criterion)."""
    from qcore.data import get_calibration
    from qcore.eval import perplexity
    from qcore.models import load_model
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    def ppl(m, t) -> float:  # noqa: ANN001
        return perplexity(m, TINYSTORIES_TXT, t, max_tokens=8192).ppl

    model, tok = load_model(STORIES_DIR)
    out = {"float": ppl(model, tok)}
    text = TINYSTORIES_TXT.read_text(encoding="utf-8")
    calib = get_calibration([text[len(text) // 2:]], tok, n_samples=32, seq_len=128, seed=0)
    for method in ("rtn", "gptq"):
        for label, kw in (("uniform", {"bits": 3}), ("mixed", {"budget_bits": 4.0})):
            m, _ = load_model(STORIES_DIR)
            qcore.quantize(m, method, group_size=32, ignore=STORIES_IGNORE, calibration=calib, **kw)
            nbytes, weights = _packed(m)
            assert nbytes <= 4.0 * weights / 8
            out[f"{method} {label}"] = ppl(m, tok)
    return out


@pytest.mark.shared
@pytest.mark.skipif(not HAS_SHARED, reason="needs ../shared (stories260K and TinyStories text)")
@pytest.mark.parametrize("method,ratio", [("rtn", 0.85), ("gptq", 0.97)])
def test_stories260k_mixed_beats_uniform_3bit_at_its_size(stories_runs: dict[str, float], method: str,
                                                          ratio: float) -> None:
    # measured 2026-12-01: float 4.182; RTN uniform +1.981, mixed +1.547 (0.78x);
    # GPTQ uniform +0.996, mixed +0.925 (0.93x)
    base = stories_runs["float"]
    uniform, mixed = stories_runs[f"{method} uniform"] - base, stories_runs[f"{method} mixed"] - base
    assert mixed <= ratio * uniform, f"{method}: uniform 3-bit +{uniform:.3f}, mixed at its size +{mixed:.3f}"


def test_budget_keywords_are_reserved_for_quantize() -> None:
    from qcore.pipeline.budget import BUDGET_OPTIONS
    from qcore.plugin.spec import RESERVED_OPTIONS

    assert set(BUDGET_OPTIONS) <= set(RESERVED_OPTIONS)  # no method option may shadow them
