"""Streamed evaluation (qcore.eval.perplexity_streamed, ``qcore eval DIR --stream``): the model is read
one block at a time from its files and gives the in-memory perplexity on the same windows."""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qcore
from qcore.cli import main
from qcore.eval import perplexity, perplexity_streamed
from qcore.models import load_model
from qcore.pipeline import blockwise
from qcore.plugin.errors import CheckpointError
from qcore.testing import char_tokenizer
from qcore.tiny import tiny_model

RTOL = 1e-6
"""Relative tolerance on the NLL: the streamed pass runs the same batches through the same modules."""
SEQ_LEN = 32
TEXT = " ".join(string.ascii_letters + string.digits for _ in range(12))  # ~750 character tokens


def token_ids(n_windows: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n_windows * SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def quantized_checkpoint(folder: Path, family: str, tokenizer: Any = None, **overrides: Any) -> Path:
    model = tiny_model(family, **overrides)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    return qcore.save(model, folder, tokenizer=tokenizer)


def assert_same_result(got: Any, ref: Any) -> None:
    assert (got.n_predicted, got.n_windows, got.n_tokens, got.seq_len, got.sha256) == \
        (ref.n_predicted, ref.n_windows, ref.n_tokens, ref.seq_len, ref.sha256)
    assert got.nll == pytest.approx(ref.nll, rel=RTOL)
    assert got.ppl == pytest.approx(ref.ppl, rel=RTOL)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_streamed_perplexity_of_a_checkpoint_equals_the_in_memory_one(tmp_path: Path, family: str) -> None:
    ckpt = quantized_checkpoint(tmp_path / family, family)
    ids = token_ids()
    ref = perplexity(qcore.load(ckpt), ids, seq_len=SEQ_LEN, batch_size=2)
    got = perplexity_streamed(ckpt, ids, seq_len=SEQ_LEN, batch_size=2)
    assert_same_result(got, ref)


def test_tied_embeddings_and_a_float_folder(tmp_path: Path) -> None:
    ids = token_ids()
    ckpt = quantized_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    assert_same_result(perplexity_streamed(ckpt, ids, seq_len=SEQ_LEN),
                       perplexity(qcore.load(ckpt), ids, seq_len=SEQ_LEN))
    src = tmp_path / "float"
    tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    assert_same_result(perplexity_streamed(src, ids, seq_len=SEQ_LEN),
                       perplexity(load_model(str(src))[0], ids, seq_len=SEQ_LEN))


def loaded_blocks(blocks: list[nn.Module]) -> int:
    """How many blocks hold any stored tensor off the meta device."""
    return sum(any(t.device.type != "meta" for t in b.state_dict().values()) for b in blocks)


def test_at_most_one_block_is_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = quantized_checkpoint(tmp_path / "ckpt", "llama", num_hidden_layers=4)
    seen: list[int] = []
    packed: list[bool] = []
    opened: list[blockwise.LazyModel] = []

    def watch(path: Any) -> blockwise.LazyModel:
        lazy = real_open(path)
        blocks = list(lazy.model.model.layers)

        def pre(module: nn.Module, _args: Any) -> None:
            seen.append(loaded_blocks(blocks))
            if "forward" not in module.__dict__:  # the block's own forward: its packed weights are there
                packed.append(all(not m.qweight.is_meta for m in module.modules() if hasattr(m, "qweight")))
        for b in blocks:
            b.register_forward_pre_hook(pre)
        opened.append(lazy)
        return lazy

    real_open = blockwise.open_lazy
    monkeypatch.setattr(blockwise, "open_lazy", watch)
    perplexity_streamed(ckpt, token_ids(), seq_len=SEQ_LEN, batch_size=2)
    assert max(seen) == 1, seen
    assert len(packed) == 4 * 3 and all(packed), packed  # 4 blocks x 3 batches of windows
    assert all(t.is_meta for t in opened[0].model.state_dict().values()), "every stored tensor is freed at the end"


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out if code == 0 else cap.err + cap.out


def test_cli_eval_stream(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(char_tokenizer(tmp_path / "tok"))
    ckpt = quantized_checkpoint(tmp_path / "ckpt", "qwen3", tokenizer=tok)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    common = ("--data", str(text), "--eval-seq-len", str(SEQ_LEN), "--json")
    code, out = run_cli(capsys, "eval", str(ckpt), "--stream", *common)
    assert code == 0, out
    streamed = json.loads(out)
    code, out = run_cli(capsys, "eval", str(ckpt), *common)
    assert code == 0, out
    ref = json.loads(out)
    assert streamed["stream"] is True and streamed["tokens"] == ref["tokens"] > 0
    assert streamed["seq_len"] == ref["seq_len"] == SEQ_LEN
    assert streamed["perplexity"] == pytest.approx(ref["perplexity"], rel=RTOL)


def test_what_cannot_be_streamed_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_cli(capsys, "eval", "tiny-llama", "--stream", "--eval-seq-len", str(SEQ_LEN))
    assert code == 1 and "tiny model" in err and "without --stream" in err, err
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2, safe_serialization=True)
    with pytest.raises(CheckpointError, match="Conv1D"):
        perplexity_streamed(gpt2, token_ids(), seq_len=SEQ_LEN)
    (tmp_path / "seq").mkdir()
    quantized_checkpoint(tmp_path / "seq" / "ckpt", "llama")
    code, err = run_cli(capsys, "eval", str(tmp_path / "seq" / "ckpt"), "--stream", "--eval-seq-len", "4096")
    assert code == 1 and "--eval-seq-len" in err, err
