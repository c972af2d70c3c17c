#!/usr/bin/env python
"""Decode speed of another tool's GPTQ checkpoint: imported by ``qcore.load`` (qcore's kernels)
against the same folder in GPTQModel (its own loader and CPU kernel, its own venv), one run.

Both decode ``--new-tokens`` tokens greedily with the KV cache after the same prompt token ids,
``--rounds`` times after a warm-up; the median tokens/s is printed with the first generated ids
(the two should agree on most of them: same weights, different arithmetic). GPTQModel runs in
``--peer-dtype`` (bfloat16 by default: its float32 CPU kernel is wrong in 7.6.0).

    OMP_NUM_THREADS=2 QCORE_PROGRESS=0 .venv/bin/python bench/import_decode.py CHECKPOINT_DIR \
        [--gptqmodel-python /work/peers/gptqmodel/bin/python] [--json out.json]

A GPTQ checkpoint of SmolLM2-135M is what ``bench/gptq.py`` leaves in its work folder
(``WORKDIR/gptqmodel_4/checkpoint``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PROMPT = "Once upon a time, in a small town by the sea, there lived"
"""Tokenized with the checkpoint's own tokenizer; both readers get the same ids."""


def decode(model: Any, ids: Any, new_tokens: int, rounds: int) -> tuple[float, list[int]]:
    """Median tokens/s over ``rounds`` greedy generations (after one warm-up) and the generated ids."""
    import torch

    def once(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    once(4)
    runs = [once(new_tokens) for _ in range(rounds)]
    return new_tokens / statistics.median(t for t, _ in runs), runs[-1][1]


def peer_main(cfg: dict[str, Any]) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel

    torch.set_num_threads(cfg["threads"])
    model = GPTQModel.load(cfg["dir"], device="cpu", dtype=getattr(torch, cfg["dtype"]))
    kernel = sorted({type(m).__name__ for n, m in model.model.named_modules() if n.endswith("q_proj")})
    tps, toks = decode(model.model, torch.tensor([cfg["ids"]]), cfg["new_tokens"], cfg["rounds"])
    print(json.dumps({"tokens_per_s": tps, "tokens": toks, "version": gptqmodel.__version__, "kernel": kernel}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gptqmodel-python", default="/work/peers/gptqmodel/bin/python")
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.peer_config:
        peer_main(json.loads(args.peer_config))
        return
    import torch

    import qcore
    from qcore.quant.linear import QuantLinear

    torch.set_num_threads(args.threads)
    model = qcore.load(args.dir, dtype=torch.float32)
    backends = sorted({m.select_backend() for m in model.modules() if isinstance(m, QuantLinear)})
    from qcore.checkpoint.loading import load_tokenizer

    ids = load_tokenizer(Path(args.dir))(PROMPT, return_tensors="pt").input_ids
    rows = []
    tps, toks = decode(model, ids, args.new_tokens, args.rounds)
    rows.append({"reader": f"qcore {qcore.__version__} (float32 activations)", "kernel": ", ".join(backends),
                 "tokens/s": round(tps, 1), "first ids": toks[:8]})
    cfg = {"dir": str(Path(args.dir).resolve()), "ids": ids[0].tolist(), "new_tokens": args.new_tokens,
           "rounds": args.rounds, "threads": args.threads, "dtype": args.peer_dtype}
    if Path(args.gptqmodel_python).is_file():
        proc = subprocess.run([args.gptqmodel_python, __file__, "--peer-config", json.dumps(cfg)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode == 0 and last.startswith("{"):
            res = json.loads(last)
            agree = sum(a == b for a, b in zip(res["tokens"], toks)) / len(toks)
            rows.append({"reader": f"GPTQModel {res['version']} ({args.peer_dtype})", "kernel": ", ".join(res["kernel"]),
                         "tokens/s": round(res["tokens_per_s"], 1), "first ids": res["tokens"][:8],
                         "same ids as qcore": f"{agree:.0%}"})
        else:
            rows.append({"reader": "GPTQModel", "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]})
    else:
        rows.append({"reader": "GPTQModel", "error": f"no venv at {args.gptqmodel_python} (bench/requirements-peers.txt)"})
    print(f"{args.dir}: {args.new_tokens} new tokens after a {ids.shape[1]}-token prompt, median of "
          f"{args.rounds}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
