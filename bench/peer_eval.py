"""Whole-model evaluation of a peer's quantized model, inside the peer's own process.

Every bench that compares qcore with another tool evaluates the peer's model as that tool leaves
it: all its parameters and buffers (norms a method folded scales into, packed layers and their
kernels), never tensors copied back into a float model. The peer process:

1. loads the float model and computes its perplexity on the evaluation windows it was given
   (the same token ids qcore evaluates on, with qcore's formula: summed next-token NLL over all
   windows / predicted tokens, exponentiated);
2. quantizes with the peer's own call;
3. computes the quantized model's perplexity on the same windows.

The bench side checks that the peer's float perplexity equals qcore's within
:data:`FLOAT_MATCH_RTOL` (:func:`float_check`): when it does not, the peer reads the model or
the windows differently and its row is void. This module imports only torch and the standard
library, so it runs in any peer's virtual environment; bench scripts load it by path
(``runpy.run_path``) because ``bench/`` holds scripts named like packages.
"""
from __future__ import annotations

import math
from typing import Any

FLOAT_MATCH_RTOL = 1e-3
"""A peer's float perplexity must equal qcore's to this relative tolerance (else its row is void)."""
EVAL_BATCH = 4
"""Windows per forward pass in the peer's evaluation."""


def window_perplexity(model: Any, windows: Any, batch: int = EVAL_BATCH) -> float:
    """Perplexity of a causal LM on ``windows`` [n, seq] of token ids: exp(summed NLL / predicted
    tokens), computed in float64 over every window, on the device of the model's first parameter."""
    import torch
    import torch.nn.functional as F

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows in windows.split(batch):
                rows = rows.to(device)
                try:
                    out = model(input_ids=rows, use_cache=False)
                except TypeError:
                    out = model(input_ids=rows)
                logits = (out.logits if hasattr(out, "logits") else out[0]).float()
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      rows[:, 1:].reshape(-1), reduction="sum")
                total += float(nll.double())
                count += rows[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def float_check(peer_float: float, qcore_float: float, rtol: float = FLOAT_MATCH_RTOL) -> tuple[bool, str]:
    """Whether the peer's float perplexity reproduces qcore's, and a note for the table."""
    ok = math.isclose(peer_float, qcore_float, rel_tol=rtol)
    note = f"its float {peer_float:.4f}" + ("" if ok else f" != qcore's {qcore_float:.4f}: void")
    return ok, note



def ignore_regexes(cfg: dict[str, Any]) -> list[str]:
    """The module-name regexes a bench config keeps float (``cfg["ignore"]``: qcore's globs)."""
    import fnmatch

    return [fnmatch.translate(g) for g in cfg.get("ignore", [])]


def llmc_ignore(cfg: dict[str, Any]) -> list[str]:
    """llm-compressor's ``ignore=``: the LM head and the config's ignored modules."""
    return ["lm_head", *(f"re:{r}" for r in ignore_regexes(cfg))]


def gptqmodel_dynamic(cfg: dict[str, Any]) -> dict[str, dict] | None:
    """GPTQModel's ``dynamic=`` skipping the config's ignored modules (``-:regex``), or None."""
    return {f"-:{r}": {} for r in ignore_regexes(cfg)} or None
