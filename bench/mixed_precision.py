#!/usr/bin/env python
"""Mixed precision bench: a sensitivity-driven per-layer allocation against uniform widths of the
same packed size, for any weight method (default GPTQ and RTN).

For each budget (average bits per weight over the quantized linears, scales and zero points
included: at group 64 with fp16/bf16 scales and zero points, uniform b bits is b + 0.5), the
uniform run uses the widest candidate width whose size fits the budget, and the mixed run the
allocation of :mod:`qcore.pipeline.budget` at the same budget. It takes the same steps as
``qcore.quantize(model, method, budget_bits=B)``, with the sensitivity measured once per
criterion and reused for every budget and method (it depends only on the group size, the
symmetry and the candidate widths). Every run is evaluated with qcore's perplexity protocol
(:mod:`qcore.eval`); sizes are the bytes the quantized model's ``QuantLinear`` layers hold
(codes, scales and zero points). A plot of perplexity against packed bytes goes to ``--plot``.

Usage (SmolLM2-135M, the numbers in docs/results.md, "Mixed precision"):

    QCORE_PROGRESS=0 OMP_NUM_THREADS=2 .venv/bin/python bench/mixed_precision.py --model smollm2-135m \
        --methods gptq rtn --budgets 3.5 2.5 4.5 --criteria fisher --group-size 64 --n-samples 16 \
        --seq-len 512 --eval-tokens 4096 --plot docs/mixed_precision.png --json /tmp/mixed.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _ppl(model: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    from qcore.eval import perplexity

    return perplexity(model, args.eval_text, tokenizer, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl


def _packed(model: Any) -> tuple[int, int]:
    """(bytes of codes + scales + zero points, weights) over the model's QuantLinear layers."""
    from qcore.quant.linear import QuantLinear

    nbytes = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            sd = m.state_dict()
            nbytes += sum(sd[k].nbytes for k in ("qweight", "scales", "qzeros"))
            weights += m.in_features * m.out_features
    return nbytes, weights


def bench_main(args: argparse.Namespace) -> None:
    import torch

    import qcore
    from qcore.arch.introspect import inspect_model
    from qcore.data import get_calibration
    from qcore.models import load_model
    from qcore.pipeline.budget import BudgetConfig, allocation_for, make_plan, measure_sensitivity
    from qcore.pipeline.chain import resolve_chain

    torch.manual_seed(0)

    def fresh() -> Any:
        m, t = load_model(args.model)
        return m.eval(), t

    model, tok = fresh()
    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    info = inspect_model(model)
    ppl_float = _ppl(model, tok, args)
    print(f"float: ppl {ppl_float:.3f}", flush=True)
    common: dict[str, Any] = {"group_size": args.group_size, "sym": args.sym, **_options(args.option)}
    if args.ignore:
        common["ignore"] = args.ignore

    sens_cache: dict[tuple, tuple[dict[str, list[float]], float]] = {}
    rows: list[dict[str, Any]] = []
    for budget in args.budgets:
        for method in args.methods:
            plans = {}
            for crit in args.criteria:
                chain = resolve_chain(method, None, dict(common))
                cfg = BudgetConfig(bits=budget, candidates=args.candidates, criterion=crit)
                plans[crit] = make_plan(info, chain, cfg)
            any_plan = next(iter(plans.values()))
            # uniform: the widest candidate whose packed size fits the budget
            fits = [w for w in any_plan.candidates
                    if sum(layer.sizes()[layer.widths.index(w)] for layer in any_plan.layers) <= any_plan.limit]
            uniform = max(fits) if fits else min(any_plan.candidates)
            m, _ = fresh()
            start = time.perf_counter()
            qcore.quantize(m, method, bits=uniform, calibration=calib, **common)
            seconds = time.perf_counter() - start
            nbytes, weights = _packed(m)
            rows.append({"method": method, "budget": budget, "kind": f"uniform {uniform}-bit", "ppl": _ppl(m, tok, args),
                         "bytes": nbytes, "avg_bits": 8 * nbytes / weights, "seconds": seconds})
            print(rows[-1], flush=True)
            del m
            for crit, plan in plans.items():
                key = (crit, tuple(plan.candidates), args.group_size, args.sym)
                if key not in sens_cache:
                    start = time.perf_counter()
                    sens_cache[key] = (measure_sensitivity(model, plan, calib), time.perf_counter() - start)
                    print(f"sensitivity ({crit}): {sens_cache[key][1]:.1f} s", flush=True)
                sens, sens_seconds = sens_cache[key]
                alloc = allocation_for(plan, sens, sens_seconds)
                m, _ = fresh()
                start = time.perf_counter()
                qcore.quantize(m, method, bits=alloc.bits, calibration=calib, **common)
                seconds = time.perf_counter() - start
                nbytes, weights = _packed(m)
                rows.append({"method": method, "budget": budget, "kind": f"mixed ({crit})", "ppl": _ppl(m, tok, args),
                             "bytes": nbytes, "avg_bits": 8 * nbytes / weights, "seconds": seconds,
                             "sensitivity_seconds": sens_seconds, "widths": alloc.record["widths"],
                             "planned_bytes": alloc.record["bytes"], "limit": plan.limit})
                print(rows[-1], flush=True)
                del m
            _dump(args, calib, ppl_float, rows)

    print()
    print(f"model {args.model}, group {args.group_size}, sym={args.sym}, candidates "
          f"{args.candidates or 'method default'}; calibration {calib.record['source']} {args.n_samples}x"
          f"{args.seq_len} (seed 0); perplexity on {args.eval_text} over {args.eval_tokens} tokens "
          f"(float {ppl_float:.3f})")
    print()
    print("| method | budget (bits/weight) | run | avg bits | packed MB | perplexity | widths (layers) | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        widths = ", ".join(f"{w}:{n}" for w, n in r.get("widths", {}).items()) or "-"
        print(f"| {r['method']} | {r['budget']} | {r['kind']} | {r['avg_bits']:.3f} | {r['bytes'] / 1e6:.2f} | "
              f"{r['ppl']:.3f} | {widths} | {r['seconds']:.1f} |")
    for key, (_, sec) in sens_cache.items():
        print(f"sensitivity pass ({key[0]}): {sec:.1f} s (once, reused for every budget and method)")
    _dump(args, calib, ppl_float, rows)
    if args.plot:
        print(f"plot: {args.plot}")


def _dump(args: argparse.Namespace, calib: Any, ppl_float: float, rows: list[dict[str, Any]]) -> None:
    """The rows so far as JSON and plot (rewritten after every budget: a stopped run keeps its results)."""
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record, "float": ppl_float,
                                              "rows": rows}, indent=1, default=str))
    if args.plot and rows:
        _plot(rows, ppl_float, args)


def _plot(rows: list[dict[str, Any]], ppl_float: float, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is missing (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = f"{r['method']} {'uniform' if r['kind'].startswith('uniform') else r['kind']}"
        series.setdefault(label, []).append((r["bytes"] / 1e6, r["ppl"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        style = "--" if "uniform" in label else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    ax.axhline(ppl_float, color="grey", linewidth=0.8, label=f"float {ppl_float:.2f}")
    ax.set_xlabel("packed bytes of the quantized linears (MB: codes, scales, zero points)")
    ax.set_ylabel(f"perplexity ({Path(args.eval_text).name}, {args.eval_tokens} tokens)")
    ax.set_yscale("log")
    ax.set_title(f"{args.model}, group {args.group_size}: mixed vs uniform widths")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


def _options(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as method options (values parsed as JSON where they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option {pair!r}: use KEY=VALUE, e.g. iterations=50")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    # bench/ holds scripts named like packages (bench/hqq.py): keep them off the import path
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["gptq", "rtn"], help="weight methods (any installed)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.5, 4.5], help="average bits per weight")
    ap.add_argument("--criteria", nargs="+", default=["fisher"], help="sensitivity criteria of the mixed runs")
    ap.add_argument("--candidates", type=int, nargs="+", default=None, help="widths (default: the method's of 2,3,4,6,8)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    ap.add_argument("--ignore", nargs="*", default=None, help="layer patterns kept in float")
    ap.add_argument("--calibration", default="c4", help="calibration source (qcore.data name or file)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--plot", default=None, help="write the perplexity-vs-bytes plot here (PNG)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a method option for every run (repeatable), e.g. --option iterations=50")
    ap.add_argument("--json", default=None)
    bench_main(ap.parse_args())


if __name__ == "__main__":
    main()
