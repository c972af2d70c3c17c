"""bench/peer_eval.py: a peer's whole-model evaluation reproduces qcore's perplexity protocol, and
a peer whose float model misses qcore's float perplexity is void."""
from __future__ import annotations

import math
from pathlib import Path
from runpy import run_path
from types import SimpleNamespace

import pytest
import torch

import qcore
from qcore.eval import perplexity, windows
from qcore.tiny import tiny_model

PEER_EVAL = SimpleNamespace(**run_path(str(Path(__file__).resolve().parents[1] / "bench" / "peer_eval.py")))


def _stream(model: torch.nn.Module, n: int = 640) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_window_perplexity_is_qcores_protocol(family: str) -> None:
    model = tiny_model(family).eval()
    ids = _stream(model)
    win = windows(ids, 64)
    ours = perplexity(model, ids, seq_len=64).ppl
    assert math.isclose(PEER_EVAL.window_perplexity(model, win), ours, rel_tol=1e-6)
    assert math.isclose(PEER_EVAL.window_perplexity(model, win, batch=3), ours, rel_tol=1e-6)


def test_whole_model_evaluation_sees_a_quantized_model() -> None:
    """Evaluated whole, a quantized model's perplexity differs from its float one (the read-back
    of the peer's model cannot silently return the float model)."""
    model = tiny_model("llama").eval()
    win = windows(_stream(model), 64)
    before = PEER_EVAL.window_perplexity(model, win)
    qcore.quantize(model, "rtn", bits=2, group_size=32)
    assert PEER_EVAL.window_perplexity(model, win) != before


def test_float_check_voids_a_mismatched_peer() -> None:
    ok, note = PEER_EVAL.float_check(30.0, 30.0 * (1 + 0.5 * PEER_EVAL.FLOAT_MATCH_RTOL))
    assert ok and "void" not in note
    ok, note = PEER_EVAL.float_check(30.15, 29.87)
    assert not ok and "void" in note and "29.8700" in note
    assert PEER_EVAL.float_check(30.15, 29.87, rtol=0.02)[0]
