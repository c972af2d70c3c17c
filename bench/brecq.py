#!/usr/bin/env python
"""BRECQ bench: float, RTN, GPTQ, AdaRound and BRECQ in one run, same calibration, same evaluation.

Everything is evaluated with qcore's own perplexity protocol (:mod:`qcore.eval`) on WikiText-2;
every method gets the same calibration windows (seed 0) and the same bits and group size. Wall
times are the ``qcore.quantize`` call (model loading and evaluation not timed). BRECQ's per-block
record (error relative to round-to-nearest, seconds per step) is summarized under the table.

Usage (SmolLM2-135M, the numbers in docs/results.md):

    OMP_NUM_THREADS=2 .venv/bin/python bench/brecq.py --model smollm2-135m --bits 2 3 --group-size 64 \
        --n-samples 32 --seq-len 512 --eval-tokens 8192 --json /tmp/brecq_bench.json

``--adaround '{"iterations": 200}'`` and ``--brecq '{...}'`` pass options (JSON) to those methods;
``--methods`` picks the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METHODS = ("rtn", "gptq", "adaround", "brecq")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_main(args: argparse.Namespace) -> None:
    import torch

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity
    from qcore.models import load_model

    torch.manual_seed(0)

    def fresh() -> Any:
        m, t = load_model(args.model)
        return m.eval(), t

    def ppl(m: Any) -> float:
        return perplexity(m, args.eval_text, tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl

    model, tok = fresh()
    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    rows: list[dict[str, Any]] = [{"bits": "-", "method": "float", "ppl": ppl(model), "seconds": None}]
    print(f"float: ppl {rows[0]['ppl']:.3f}", flush=True)
    del model
    extra = {"adaround": json.loads(args.adaround), "brecq": json.loads(args.brecq)}

    for bits in args.bits:
        for method in args.methods:
            m, _ = fresh()
            opts = {"bits": bits, "group_size": args.group_size, "ignore": args.ignore, **extra.get(method, {})}
            start = time.perf_counter()
            qcore.quantize(m, method, calibration=None if method == "rtn" else calib, **opts)
            seconds = time.perf_counter() - start
            row = {"bits": bits, "method": method, "options": extra.get(method, {}), "ppl": ppl(m),
                   "seconds": seconds}
            if method == "brecq":
                blocks = m.qcore_record["chain"][-1]["record"]["blocks"].values()
                row["error_vs_rtn"] = sum(b["error_vs_rtn"] for b in blocks) / len(blocks)
                row["step_seconds"] = sum(b["step_seconds"] for b in blocks) / len(blocks)
            rows.append(row)
            print(rows[-1], flush=True)
            del m

    print()
    kept = f", float: {' '.join(args.ignore)}" if args.ignore else ""
    print(f"model {args.model}, group {args.group_size}, asymmetric{kept}; calibration {calib.record['source']} "
          f"{args.n_samples}x{args.seq_len} (seed 0); perplexity on {args.eval_text} over {args.eval_tokens} tokens "
          f"(windows of {args.eval_seq_len}); {datetime.now(timezone.utc):%Y-%m-%d}, {_cpu()}, "
          f"{torch.get_num_threads()} torch threads")
    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print()
    print("| bits | method | options | perplexity | quantize wall time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        opts = json.dumps(r.get("options") or {}) if r.get("options") else "defaults"
        print(f"| {r['bits']} | {r['method']} | {opts if r['method'] != 'float' else '-'} | {r['ppl']:.3f} | {sec} |")
    for r in rows:
        if r["method"] == "brecq":
            print(f"brecq {r['bits']}-bit: mean block error {r['error_vs_rtn']:.3f}x round-to-nearest's, "
                  f"{r['step_seconds']:.3f} s per step")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record, "rows": rows,
                                               "cpu": _cpu()}, indent=1, default=str))


def main() -> None:
    # bench/ holds scripts named like packages (bench/hqq.py): keep them off the import path
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ignore", nargs="*", default=[], help="patterns of linears every method keeps float")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--adaround", default="{}", help="AdaRound options (JSON)")
    ap.add_argument("--brecq", default="{}", help="BRECQ options (JSON)")
    ap.add_argument("--calibration", default="c4", help="calibration source (qcore.data name or file)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    bench_main(ap.parse_args())


if __name__ == "__main__":
    main()
