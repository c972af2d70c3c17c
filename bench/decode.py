"""End-to-end greedy decoding speed of the default model: float against 4-bit, in one run.

Loads SmolLM2-135M (``qcore.models.load_model``), makes float32 and bfloat16 copies and 4-bit
copies (RTN, group 32 and 64: no calibration, the same packed format and kernels every weight
method produces), then decodes ``--new-tokens`` tokens greedily with the KV cache after a fixed
prompt, round-robin over the variants for ``--rounds`` rounds, and prints tokens/s (median) and
the speedup over float32. The prompt is prefilled once per generate call and its time is
included; ``--new-tokens`` large against the prompt keeps decode dominant. The prefill columns time
one forward pass over a ``--prefill-tokens`` prompt (512 fixed token ids, seed 0) in the same
round-robin, as tokens/s and against float32 and bfloat16 (batched matmuls: 512 activation rows
per linear, the paths ``int4_native`` measured for that).

Each 4-bit group also runs as ``(rest bf16)``: the same model with its float parts (embedding,
norms, ``lm_head``) and activations in bfloat16, as a bf16 deployment runs it (the quantized
weights, scales and zeros are unchanged: scales are stored in bf16 already).

``--profile`` then splits one greedy generation of each variant by where the time goes, per
token: forward hooks on every module take each module's own time (its children's time taken
out) by kind -- quantized linears, float linears, attention (its own code: rotary, scaled dot
product, KV cache), MLP glue, norms, decoder-layer glue (residual adds), embedding, the model's own
code -- and what is left of the wall time is ``generate`` itself (sampling, stopping, cache
bookkeeping). The hooks add their own time (two Python calls per module call), so the profiled
total is above the plain one.

``--quarot G`` adds QuaRot W4A16 copies (RTN weights, group ``G``) with and without R4, the online
Hadamard on every down projection's input (``r4=False``): their ratio is R4's decode cost.

    OMP_NUM_THREADS=2 QCORE_PROGRESS=0 .venv/bin/python bench/decode.py [--quarot 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
from collections import Counter
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qcore  # noqa: E402
from qcore.eval import format_table  # noqa: E402
from qcore.models import DEFAULT_MODEL, load_model  # noqa: E402
from qcore.quant.linear import QuantLinear  # noqa: E402

PROMPT = "Once upon a time, in a small town by the sea, there lived"


def backend_counts(model: nn.Module) -> str:
    """How many QuantLinear layers each backend runs, e.g. ``int4_native x210``."""
    counts = Counter(m.select_backend() for m in model.modules() if isinstance(m, QuantLinear))
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def variants(model: nn.Module, groups: list[int], torch_kernel: bool) -> dict[str, nn.Module]:
    """name -> model: float32, bfloat16 and RTN 4-bit at each group size (the backends ``auto``
    picks; with ``torch_kernel``, each that uses qcore's own kernel also forced to torch's,
    ``int4_cpu``)."""
    out = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    for g in groups:
        q = copy.deepcopy(model)
        qcore.quantize(q, "rtn", bits=4, group_size=g)
        out[f"rtn w4 g{g}"] = q
        out[f"rtn w4 g{g} (rest bf16)"] = copy.deepcopy(q).to(torch.bfloat16)
        if torch_kernel and "int4_native" in backend_counts(q):
            t = copy.deepcopy(q)
            for m in t.modules():
                if isinstance(m, QuantLinear) and m.why_not("int4_cpu") is None:
                    m.backend = "int4_cpu"
            out[f"rtn w4 g{g} (torch kernel)"] = t
    return out


def quarot_variants(model: nn.Module, group: int) -> dict[str, nn.Module]:
    """QuaRot W4A16 (RTN weights at ``group``) with R1+R2+R4 and with R1+R2 only (``r4=False``)."""
    out = {}
    for label, r4 in (("R1+R2+R4", True), ("R1+R2, r4=False", False)):
        q = copy.deepcopy(model)
        qcore.quantize(q, "quarot", w_bits=4, group_size=group, r4=r4)
        out[f"quarot w4 g{group} {label}"] = q
    return out


@torch.no_grad()
def decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=model.config.eos_token_id)
    return time.perf_counter() - start, out[0, ids.shape[1]:]


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return time.perf_counter() - start


def module_kind(module: nn.Module) -> str:
    """The profile bucket of a module, by its class."""
    name = type(module).__name__
    if isinstance(module, QuantLinear):
        return "quantized linears"
    if isinstance(module, nn.Linear):
        return "float linears"
    for part, kind in (("Norm", "norms"), ("Rotary", "rotary"), ("Attention", "attention"), ("MLP", "MLP glue"),
                       ("DecoderLayer", "layer glue"), ("Embedding", "embedding")):
        if part in name:
            return kind
    return "model code"


def profile_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Milliseconds per generated token by module kind (each module's own time), and the rest."""
    own: dict[str, float] = {}
    stack: list[list[float]] = []  # [start, children's time]

    def pre(module: nn.Module, args: Any) -> None:
        stack.append([time.perf_counter(), 0.0])

    def post(module: nn.Module, args: Any, out: Any) -> None:
        start, children = stack.pop()
        elapsed = time.perf_counter() - start
        kind = module_kind(module)
        own[kind] = own.get(kind, 0.0) + elapsed - children
        if stack:
            stack[-1][1] += elapsed

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        total, _ = decode_seconds(model, ids, new_tokens)
    finally:
        for h in handles:
            h.remove()
    out = {k: v * 1e3 / new_tokens for k, v in sorted(own.items(), key=lambda kv: -kv[1])}
    out["generate loop"] = total * 1e3 / new_tokens - sum(out.values())
    out["total"] = total * 1e3 / new_tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", default="32,64,-1",
                    help="comma-separated group sizes for the 4-bit rows (-1: per channel)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch-kernel", action="store_true",
                    help="skip the 4-bit rows forced to torch's int4 kernel")
    ap.add_argument("--quarot", type=int, default=None, metavar="G",
                    help="add QuaRot W4A16 (RTN, group G) with and without R4")
    ap.add_argument("--only-quarot", action="store_true", help="with --quarot: float32 and the QuaRot rows only")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill columns (0: none)")
    ap.add_argument("--profile", action="store_true", help="also split one generation per variant by module kind")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    groups = [] if args.only_quarot else [int(g) for g in args.groups.split(",") if g]
    models = variants(model, groups, not args.no_torch_kernel)
    if args.only_quarot:
        models.pop("bfloat16")
    if args.quarot is not None:
        models.update(quarot_variants(model, args.quarot))
    times: dict[str, list[float]] = {k: [] for k in models}
    prefill: dict[str, list[float]] = {k: [] for k in models}
    long_ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_tokens),
                             generator=torch.Generator().manual_seed(0))
    texts: dict[str, str] = {}
    for name, m in models.items():  # warm-up: kernel packs, measured dispatch, caches
        decode_seconds(m, ids, 4)
        if args.prefill_tokens:
            prefill_seconds(m, long_ids)
    for _ in range(args.rounds):
        for name, m in models.items():
            sec, toks = decode_seconds(m, ids, args.new_tokens)
            times[name].append(sec)
            texts[name] = tok.decode(toks[:24])
            if args.prefill_tokens:
                prefill[name].append(prefill_seconds(m, long_ids))
    base = args.new_tokens / statistics.median(times["float32"])
    rows: list[dict[str, Any]] = []
    for name, ts in times.items():
        tps = args.new_tokens / statistics.median(ts)
        row = {"variant": name, "tokens/s": round(tps, 1), "vs float32": f"{tps / base:.2f}x"}
        if args.prefill_tokens:
            ptps = {k: args.prefill_tokens / statistics.median(prefill[k]) for k in prefill}
            row["prefill tokens/s"] = round(ptps[name], 1)
            row["prefill vs float32 / bfloat16"] = (f"{ptps[name] / ptps['float32']:.2f}x / "
                                                    + (f"{ptps[name] / ptps['bfloat16']:.2f}x" if "bfloat16" in ptps else "-"))
        row.update({"backends": backend_counts(models[name]) or "-",
                    "first tokens": texts[name][:40].replace("\n", " ")})
        rows.append(row)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model}, prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, median of {args.rounds} rounds, load average {load:.1f}")
    print(format_table(rows))
    profiles: dict[str, dict[str, float]] = {}
    if args.profile:
        profiles = {name: profile_generation(m, ids, args.new_tokens) for name, m in models.items()}
        kinds = sorted({k for p in profiles.values() for k in p}, key=lambda k: (k == "total", k == "generate loop",
                                                                                -max(p.get(k, 0.0) for p in profiles.values())))
        print("\nms per generated token, by module kind (forward hooks; each module's own time):")
        print(format_table([{"kind": k, **{name: f"{p.get(k, 0.0):.2f}" for name, p in profiles.items()}} for k in kinds]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "times": times, "prefill": prefill,
                                               "profile_ms_per_token": profiles}, indent=2))


if __name__ == "__main__":
    main()
