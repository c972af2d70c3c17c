"""Evaluation: perplexity under ONE pinned protocol, KL divergence, and result formatting.

Perplexity protocol (:func:`perplexity`; the GPTQ paper's WikiText-2 protocol):

1. the texts are joined with ``"\\n\\n"`` (:data:`qcore.data.TEXT_SEPARATOR`);
2. the joined string is tokenized ONCE with the model's tokenizer and its default special tokens
   for one string: a tokenizer that adds BOS (Llama's) adds exactly one, at the very start; one
   that adds none (SmolLM2's) adds none. No other BOS/EOS is inserted;
3. the stream is cut to ``max_tokens`` tokens (when given), then into non-overlapping windows of
   ``seq_len`` tokens; the trailing remainder shorter than ``seq_len`` is dropped;
4. each window is one independent forward pass (no cache, no context carried over); every
   position but the last predicts the next token: ``seq_len - 1`` predictions per window;
5. ``nll`` = mean negative log-likelihood (natural log, computed in float32) over all
   predictions; ``ppl = exp(nll)``.

The GPTQ code averages per-window mean losses weighted by ``seq_len``; with equal-size windows
this is the same number. KL divergence (:func:`kl_divergence`) is the mean over every position of
``KL(P_float || P_quant)`` of the next-token distributions, in nats.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcore.plugin.errors import CalibrationError, CompatibilityError, NonFiniteError
from qcore.progress import progress

PROTOCOL = ("texts joined with '\\n\\n', tokenized once (tokenizer's own special tokens for one "
            "string), non-overlapping windows of seq_len (remainder dropped), mean NLL over the "
            "seq_len-1 predicted tokens of every window, ppl = exp(mean NLL)")
"""One-line statement of the perplexity protocol, stored with every result."""
PROTOCOL_VERSION = 1
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 2
"""Windows per forward: logits of [batch, seq_len, vocab] float32 are the memory peak."""


@dataclass
class PerplexityResult:
    """Perplexity of one model on one text under :data:`PROTOCOL`."""

    ppl: float
    nll: float
    n_predicted: int
    n_windows: int
    seq_len: int
    n_tokens: int  # tokens in the stream (after max_tokens), before windowing
    data: str
    sha256: str = ""
    seconds: float = 0.0
    protocol: str = PROTOCOL
    protocol_version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KLResult:
    """Next-token KL(P_float || P_quant) over every position of ``input_ids``."""

    kl_mean: float
    kl_max: float
    top1_agreement: float  # fraction of positions where both models' argmax agree
    n_positions: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


# -- helpers -----------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Float32 logits of a causal LM for ``ids`` [batch, seq] (no cache)."""
    ids = ids.to(_device_of(model))
    try:
        out = model(input_ids=ids, use_cache=False)
    except TypeError:
        out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _check_causal(model: nn.Module) -> None:
    from qcore.tiny import ENCODER_FAMILIES

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", "") in ENCODER_FAMILIES or getattr(cfg, "is_encoder_decoder", False):
        raise CompatibilityError(
            f"perplexity needs a causal language model; {getattr(cfg, 'model_type', type(model).__name__)} "
            "is not one. Evaluate encoders with a task metric instead"
        )


def token_stream(data: Any, tokenizer: Any = None) -> tuple[Tensor, str, str]:
    """``(ids 1-D LongTensor, description, sha256)`` of texts (any :func:`qcore.data.read_texts`
    source) or of ready token ids (a tensor, whose rows are concatenated)."""
    import hashlib

    from qcore.data import TEXT_SEPARATOR, describe_source, read_texts, tokenize_text

    if isinstance(data, Tensor):
        ids = data.reshape(-1).long()
        return ids, f"token ids ({ids.numel()})", hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
    if tokenizer is None:
        raise CalibrationError("perplexity on text needs the model's tokenizer; pass tokenizer=... "
                               "(qcore.models.load_model returns it) or pass token ids")
    text = TEXT_SEPARATOR.join(read_texts(data))
    ids = torch.tensor(tokenize_text(tokenizer, text), dtype=torch.long)
    return ids, describe_source(data), hashlib.sha256(text.encode("utf-8")).hexdigest()


def windows(ids: Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of a 1-D stream (remainder dropped)."""
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    n = ids.numel() // seq_len
    if n == 0:
        raise CalibrationError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text (or a larger max_tokens) or lower seq_len"
        )
    return ids[: n * seq_len].reshape(n, seq_len)


def window_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed NLL per window of next-token predictions: logits [b, s, V], ids [b, s] -> [b]."""
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1).to(pred.device)
    nll = F.cross_entropy(pred, target, reduction="none")
    return nll.view(ids.shape[0], -1).sum(dim=1)


# -- metrics -----------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, data: Any, tokenizer: Any = None, seq_len: int = DEFAULT_SEQ_LEN,
               max_tokens: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> PerplexityResult:
    """Perplexity of a causal LM on ``data`` under :data:`PROTOCOL` (see the module docstring).

    ``data``: texts (list of strings, .txt/.jsonl file, directory, dataset name, ``None`` for
    the built-in pydoc text) or a tensor of token ids. ``max_tokens`` caps the stream length.
    """
    t0 = time.perf_counter()
    ids, desc, sha, win = _eval_windows(model, data, tokenizer, seq_len, max_tokens)
    was_training = model.training
    model.eval()
    try:
        batches = win.split(max(1, batch_size))
        total = _total_nll((_logits(model, b) for b in batches), batches, len(win))
    finally:
        model.train(was_training)
    return _result(total, ids, win, desc, sha, time.perf_counter() - t0)


@torch.no_grad()
def perplexity_streamed(path: str | os.PathLike[str], data: Any, tokenizer: Any = None,
                        seq_len: int | None = None, max_tokens: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> PerplexityResult:
    """:func:`perplexity` of the qcore checkpoint or float safetensors folder ``path`` without
    loading it whole: one block in memory at a time (:mod:`qcore.pipeline.blockwise`).

    ``tokenizer``: the folder's own when ``None`` and ``data`` is text. ``seq_len``: the default,
    capped at the model's positions, when ``None``.
    """
    from qcore.pipeline.blockwise import blockwise_logits, open_lazy
    from qcore.pipeline.validate import check_seq_len

    t0 = time.perf_counter()
    lazy = open_lazy(path)
    try:
        if tokenizer is None and not isinstance(data, Tensor):
            tokenizer = lazy.tokenizer()
        seq_len = check_seq_len(lazy.model, seq_len)
        ids, desc, sha, win = _eval_windows(lazy.model, data, tokenizer, seq_len, max_tokens)
        batch_size = max(1, batch_size)
        with closing(blockwise_logits(lazy, win, batch_size, _logits)) as logits:
            total = _total_nll(logits, win.split(batch_size), len(win))
    finally:
        lazy.shards.close()
    return _result(total, ids, win, desc, sha, time.perf_counter() - t0)


def _eval_windows(model: nn.Module, data: Any, tokenizer: Any, seq_len: int,
                  max_tokens: int | None) -> tuple[Tensor, str, str, Tensor]:
    """``(stream, description, sha256, windows)`` of the evaluation data, checked against the model."""
    _check_causal(model)
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 to predict anything (got {seq_len})")
    ids, desc, sha = token_stream(data, tokenizer)
    ids = ids[: int(max_tokens)] if max_tokens is not None else ids
    from qcore.pipeline.validate import check_token_ids

    check_token_ids(model, ids, "the evaluation text")
    return ids, desc, sha, windows(ids, seq_len)


def _total_nll(logits: Iterable[Tensor], batches: Sequence[Tensor], n_windows: int) -> float:
    """Summed NLL of every batch's windows from their logits; a non-finite loss is an error."""
    total, first = 0.0, 0
    for lg, batch in zip(progress(logits, desc="perplexity", total=len(batches), unit="batch"), batches):
        nll_batch = float(window_nll(lg, batch).double().sum())
        if not math.isfinite(nll_batch):
            raise NonFiniteError(
                f"the model's loss is {nll_batch} on evaluation windows {first}-{first + len(batch) - 1} "
                f"(of {n_windows}, {batch.shape[1]} tokens each): its logits are not finite, so there is no "
                "perplexity to report; the model is broken (non-finite weights, or a dtype that "
                "overflows): run qcore check on it, or evaluate in float32")
        total += nll_batch
        first += len(batch)
    return total


def _result(total: float, ids: Tensor, win: Tensor, desc: str, sha: str, seconds: float) -> PerplexityResult:
    n_pred = win.shape[0] * (win.shape[1] - 1)
    nll = total / n_pred
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_predicted=n_pred, n_windows=int(win.shape[0]),
                            seq_len=int(win.shape[1]), n_tokens=int(ids.numel()), data=desc, sha256=sha,
                            seconds=seconds)


def kl_per_position(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(P || Q) in nats for each position of logits [..., V] (float32)."""
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


@torch.no_grad()
def kl_divergence(float_model: nn.Module, quant_model: nn.Module, input_ids: Any,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> KLResult:
    """Mean KL(P_float || P_quant) of next-token distributions over every position.

    ``input_ids``: LongTensor ``[n, seq]`` (or 1-D, one sequence) or a ``CalibrationData``.
    """
    _check_causal(float_model)
    _check_causal(quant_model)
    ids = getattr(input_ids, "input_ids", input_ids)
    if not isinstance(ids, Tensor):
        raise CalibrationError("kl_divergence takes token ids (a LongTensor [n, seq_len]); tokenize "
                               "text first, e.g. with qcore.data.get_calibration")
    ids = ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    t0 = time.perf_counter()
    total, worst, agree, n = 0.0, 0.0, 0, 0
    modes = (float_model.training, quant_model.training)
    float_model.eval()
    quant_model.eval()
    try:
        for batch in ids.split(max(1, batch_size)):
            lp = _logits(float_model, batch)
            lq = _logits(quant_model, batch).to(lp.device)
            kl = kl_per_position(lp, lq)
            total += float(kl.double().sum())
            worst = max(worst, float(kl.max()))
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += kl.numel()
    finally:
        float_model.train(modes[0])
        quant_model.train(modes[1])
    return KLResult(kl_mean=total / n, kl_max=worst, top1_agreement=agree / n, n_positions=n,
                    seconds=time.perf_counter() - t0)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        size += t.untyped_storage().nbytes()
    return size


# -- output ------------------------------------------------------------------------------------------
def format_value(v: Any) -> str:
    """A table cell: floats to 4 significant digits, large numbers with thousands separators."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of result dicts (columns: ``columns`` or every key in first-seen order)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   for row in rows if row.get(c) is not None) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([str(c) for c in columns]), sep, *(line(r) for r in cells)])


def evaluate(model: nn.Module, tokenizer: Any, data: Any, seq_len: int = DEFAULT_SEQ_LEN,
             max_tokens: int | None = None, name: str = "model",
             batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """One result row: name, perplexity (and its protocol fields) and size in MB."""
    res = perplexity(model, data, tokenizer, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    return {"model": name, "ppl": res.ppl, "nll": res.nll, "tokens": res.n_predicted,
            "seq_len": seq_len, "size_mb": model_size_bytes(model) / 2**20, "eval_s": res.seconds,
            "data": res.data}
