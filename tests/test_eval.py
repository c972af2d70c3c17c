"""qcore.eval: the pinned perplexity protocol, KL divergence, tables and JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qcore.checkpoint import write_json
from qcore.eval import (
    PerplexityResult,
    format_table,
    evaluate,
    kl_divergence,
    model_size_bytes,
    perplexity,
    window_nll,
    windows,
)
from qcore.plugin.errors import CalibrationError, CompatibilityError
from qcore.testing import STORIES_DIR, TINYSTORIES_TXT, requires_shared
from qcore.tiny import tiny_model


def test_windows_drop_remainder_and_cap() -> None:
    ids = torch.arange(10)
    assert windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        windows(ids, 11)


def test_perplexity_matches_hf_loss_on_token_ids() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 3 * 32 + 7), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seq_len=32, batch_size=2)
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == 3 and res.n_predicted == 3 * 31 and res.n_tokens == ids.numel()
    with torch.no_grad():  # HF's own shifted loss, one window at a time (mean over 31 predictions)
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows(ids[0], 32)]
    assert res.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.nll), rel=1e-9)
    json.dumps(res.to_dict())


def test_window_nll_counts_seq_len_minus_one() -> None:
    logits = torch.zeros(2, 5, 7)  # uniform: every prediction costs log(7)
    ids = torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(window_nll(logits, ids), torch.full((2,), 4 * math.log(7)))


def test_encoder_is_refused() -> None:
    with pytest.raises(CompatibilityError, match="causal"):
        perplexity(tiny_model("bert"), torch.arange(3, 70), seq_len=16)


def test_kl_divergence() -> None:
    a = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    same = kl_divergence(a, a, ids)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    assert same.n_positions == 3 * 24
    b = tiny_model("llama", seed=1)
    res = kl_divergence(a, b, ids, batch_size=2)
    with torch.no_grad():
        lp = torch.log_softmax(a(input_ids=ids).logits.double(), -1)
        lq = torch.log_softmax(b(input_ids=ids).logits.double(), -1)
    manual = (lp.exp() * (lp - lq)).sum(-1)
    assert res.kl_mean == pytest.approx(float(manual.mean()), rel=1e-4)
    assert res.kl_max == pytest.approx(float(manual.max()), rel=1e-4)
    assert res.kl_mean > 0


def test_format_table_and_json(tmp_path: Path) -> None:
    rows = [{"model": "float", "ppl": 6.2714, "size_mb": 1.0},
            {"model": "rtn-w4g32", "ppl": 7.5, "size_mb": 0.25, "kl": 0.0123}]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "model" and "kl" in lines[0]
    assert len(lines) == 4 and "6.271" in lines[2] and "0.0123" in lines[3]
    assert lines[1].startswith("|---") and lines[1].rstrip("|").endswith(":")  # numbers right-aligned
    assert format_table([]) == ""
    out = write_json(tmp_path / "sub" / "r.json", {"rows": rows})
    assert json.loads(out.read_text())["rows"][1]["kl"] == 0.0123


@requires_shared
def test_stories260k_perplexity_protocol() -> None:
    """stories260K on tinystories_train_head.txt, seq_len 512 (its training context).

    ../shared/README.md quotes 4.48 over "19k tokens". Under our protocol (the whole file:
    100,708 tokens, 196 windows) it is 6.27, not 4.48, because from character 43,965 on the file
    holds UTF-8 mojibake ("â€™", "â€“": 457 characters) that the 512-token vocabulary spells
    with byte-fallback tokens the model predicts badly (single windows reach ppl 17-26). On the
    first 19,000 tokens, before the mojibake, our protocol gives 4.23; starting every window
    with BOS (llama2.c's training layout, NOT our protocol) gives 4.46, within 2% of the quoted
    4.48, which is how that number was most likely measured.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(STORIES_DIR, local_files_only=True)
    full = perplexity(model, TINYSTORIES_TXT, tok, seq_len=512, batch_size=8)
    assert full.n_tokens == 100_708 and full.n_windows == 196
    assert full.ppl == pytest.approx(6.271, rel=0.01)
    head = perplexity(model, TINYSTORIES_TXT, tok, seq_len=512, max_tokens=19_000, batch_size=8)
    assert head.n_windows == 37
    assert head.ppl == pytest.approx(4.231, rel=0.01)
    # the explanation of the README's 4.48: the same 37 windows, each led by BOS
    ids = tok(TINYSTORIES_TXT.read_text(encoding="utf-8"))["input_ids"]
    w = windows(torch.tensor(ids[:19_000]), 511)
    w = torch.cat([torch.full((w.shape[0], 1), tok.bos_token_id), w], dim=1)
    with torch.no_grad():
        nll = sum(float(window_nll(model(input_ids=b).logits.float(), b).sum()) for b in w.split(8))
    assert math.exp(nll / (w.shape[0] * 511)) == pytest.approx(4.48, rel=0.02)


def test_model_size_counts_tied_weights_once_and_evaluate_row() -> None:
    tied = tiny_model("llama", tie_word_embeddings=True)
    untied = tiny_model("llama", tie_word_embeddings=False)
    emb = 128 * 64 * 4
    assert model_size_bytes(untied) - model_size_bytes(tied) == emb
    row = evaluate(tied, None, torch.arange(3, 99), seq_len=32, name="tiny")
    assert row["model"] == "tiny" and row["tokens"] == 3 * 31 and row["size_mb"] > 0
