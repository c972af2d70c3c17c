"""Option sweep of a learned-rounding method (AdaRound, BRECQ) on stories260K, 3-bit group 32, against RTN and GPTQ.

The protocol of the stories260K tests: perplexity on the first 8192 tokens of the TinyStories
head; calibration 32 windows of 128 tokens from the second half of the same file (``--seeds``);
``mlp.down_proj`` (172 columns) kept float. Each argument after the options is a JSON object of
the method's options ({} = the defaults). One torch thread. Numbers in docs/results.md.

    .venv/bin/python bench/sweep.py --method brecq --seeds 0,1 '{}' '{"iterations": 500}'
    .venv/bin/python bench/sweep.py --method adaround --seeds 0,1,2,3 '{}' '{"iterations": 1000, "lr": 0.01}'
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/hqq.py would shadow the hqq package (transformers probes it): drop this folder from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import time

os.environ.setdefault("QCORE_PROGRESS", "0")

import torch

import qcore
from qcore.data import get_calibration
from qcore.eval import perplexity
from qcore.models import load_model
from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

IGNORE = ["*.mlp.down_proj"]


def _adaround_summary(record: dict) -> str:
    layers = list(record["layers"].values())
    n = len(layers)
    return (f"per linear {sum(e['seconds'] for e in layers) / n:.2f} s, error/RTN "
            f"{sum(e['error'] / e['rtn_error'] for e in layers) / n:.3f}, flipped "
            f"{sum(e['flipped'] for e in layers) / n:.3f}")


def _brecq_summary(record: dict) -> str:
    blocks = list(record["blocks"].values())
    n = len(blocks)
    return (f"error/RTN {sum(b['error_vs_rtn'] for b in blocks) / n:.3f}, flipped "
            f"{sum(b['flipped'] for b in blocks) / n:.3f}, undecided "
            f"{sum(b['undecided'] for b in blocks) / n:.3f}, step "
            f"{sum(b['step_seconds'] for b in blocks) / n * 1000:.1f} ms")


SUMMARIES = {"adaround": _adaround_summary, "brecq": _brecq_summary}
"""Per method, a one-line summary of its record."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                    help="calibration seeds, comma-separated")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--method", choices=sorted(SUMMARIES), default="brecq")
    ap.add_argument("--no-baselines", action="store_true", help="skip RTN and GPTQ")
    ap.add_argument("configs", nargs="*", default=["{}"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(STORIES_DIR)
    base = perplexity(model, TINYSTORIES_TXT, tok, max_tokens=8192).ppl
    text = TINYSTORIES_TXT.read_text(encoding="utf-8")
    print(f"float ppl {base:.4f}")
    runs = [] if args.no_baselines else [("rtn", {}), ("gptq", {})]
    runs += [(args.method, json.loads(c)) for c in args.configs]
    for seed in args.seeds:
        calib = get_calibration([text[len(text) // 2:]], tok, n_samples=32, seq_len=128, seed=seed)
        for method, options in runs:
            if method == "rtn" and seed != args.seeds[0]:
                continue  # calibration-free: the same for every seed
            m, _ = load_model(STORIES_DIR)
            extra = {} if method == "rtn" else {"calibration": calib}
            start = time.perf_counter()
            qcore.quantize(m, method, bits=args.bits, group_size=32, ignore=IGNORE, **options, **extra)
            seconds = time.perf_counter() - start
            increase = perplexity(m, TINYSTORIES_TXT, tok, max_tokens=8192).ppl - base
            line = f"seed {seed} {method} {json.dumps(options)}: +{increase:.4f} ({seconds:.1f} s)"
            if method in SUMMARIES:
                line += "; " + SUMMARIES[method](m.qcore_record["chain"][-1]["record"])
            print(line, flush=True)


if __name__ == "__main__":
    main()
