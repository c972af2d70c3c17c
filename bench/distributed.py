"""Calibration shared by processes: ``torchrun --nproc-per-node N -m qcore quantize`` against one process.

For each process count of ``--procs`` the same ``qcore quantize`` command runs under torchrun
(gloo on CPU; ``--device cuda`` uses NCCL, one GPU per process), each process with
``--threads // N`` torch threads, so every row uses the same cores. Printed per row: wall time of
the whole command (start-up, model load and save included), qcore's quantize time, and the
perplexity of the written checkpoint on the same evaluation windows (the results agree up to the
order of float sums); the speedup is against the first row, measured in the same run.

    .venv/bin/python bench/distributed.py --model smollm2-135m --method gptq --bits 4 --group-size 64 \\
        --n-samples 32 --seq-len 512 --procs 1 2 --threads 2

Measured results are in the README (section "Several processes or GPUs").
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(args: argparse.Namespace, procs: int, out: Path) -> dict[str, float]:
    """One ``qcore quantize`` under torchrun with ``procs`` processes; wall and quantize seconds."""
    threads = max(1, args.threads // procs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
           str(29500 + procs), "-m", "qcore", "quantize", args.model, "-m", args.method, "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
           "--out", str(out), "--json"]
    if args.calibration:
        cmd += ["--calibration", args.calibration]
    if args.ignore:
        cmd += ["--ignore", *args.ignore]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QCORE_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {"threads": threads, "wall_s": wall, "quantize_s": float(report["quantize_seconds"])}


def evaluate(out: Path, tokens: int) -> float:
    """Perplexity of the checkpoint on WikiText-2's first ``tokens`` tokens (qcore's protocol)."""
    import qcore
    from qcore.checkpoint import load_tokenizer
    from qcore.eval import perplexity

    return perplexity(qcore.load(out), "wikitext2", load_tokenizer(str(out)), max_tokens=tokens).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration", default=None, help="qcore quantize --calibration (default: its default text)")
    ap.add_argument("--ignore", nargs="*", default=[], help="module-name globs kept float (qcore quantize --ignore)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all, split over the processes")
    ap.add_argument("--device", default=None, help="e.g. cuda: one GPU per process (NCCL)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="0: no evaluation")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcore-dist-") as tmp:
        for procs in args.procs:
            out = Path(tmp) / f"p{procs}"
            row = {"procs": procs, **run(args, procs, out)}
            row["ppl"] = evaluate(out, args.eval_tokens) if args.eval_tokens else float("nan")
            rows.append(row)
    base = rows[0]
    print(f"{_dt.date.today()}, {cpu_name()}, {os.cpu_count()} cores; {args.model} {args.method} w{args.bits} "
          f"g{args.group_size}, {args.n_samples} x {args.seq_len} calibration tokens"
          + (f", device {args.device}" if args.device else ""))
    print("| processes | threads each | wall s | quantize s | quantize speedup | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['threads']} | {r['wall_s']:.1f} | {r['quantize_s']:.1f} | "
              f"{base['quantize_s'] / r['quantize_s']:.2f}x | {r['ppl']:.4f} |")


if __name__ == "__main__":
    main()
