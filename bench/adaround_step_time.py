"""Time of one AdaRound step on SmolLM2-135M's linear shapes (random weights and inputs).

A step costs one [out, in] x [in, in] product plus elementwise work, whatever the number of
calibration tokens, so random data times it as well as real data. Prints the best of ``--repeat``
runs per shape and the estimate for the 30 blocks at the default 300 steps per linear.

    .venv/bin/python bench/adaround_step_time.py --threads 1
    .venv/bin/python bench/adaround_step_time.py --threads 2 --product float32 bfloat16
    .venv/bin/python bench/adaround_step_time.py --device cuda
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/hqq.py would shadow the hqq package (transformers probes it): drop this folder from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

import torch
from qcore_adaround.adaround import learn_rounding

from qcore.quant import quant_params

SMOLLM2_BLOCK = {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2),
                 "down": ((576, 1536), 1)}
"""Linear shapes [out, in] of one SmolLM2-135M block and how many of each it has."""


def step_ms(out_f: int, in_f: int, steps: int, repeat: int, device: str, product: torch.dtype) -> float:
    """Best time of one step over ``repeat`` runs of ``steps`` steps, in milliseconds."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, in_f, generator=gen).to(device)
    w = (0.05 * torch.randn(out_f, in_f, generator=gen)).to(device)
    h = x.T @ x / x.shape[0]
    scales, zeros = quant_params(w, 3, 64, False)
    options = {"lr": 0.05, "reg_lambda": 30.0, "warmup": 0.2, "beta_start": 20.0, "beta_end": 2.0}
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        learn_rounding(w, h, scales, zeros, 3, 64, iterations=steps, product=product, **options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--product", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="dtype(s) of the step's Hessian product (one table row each, interleaved per shape)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    block_ms = dict.fromkeys(args.product, 0.0)
    for name, ((out_f, in_f), count) in SMOLLM2_BLOCK.items():
        for product in args.product:
            ms = step_ms(out_f, in_f, args.steps, args.repeat, args.device, getattr(torch, product))
            block_ms[product] += ms * count
            print(f"{name:8s} [{out_f}, {in_f}] {product}: {ms:.2f} ms per step", flush=True)
    for product, ms in block_ms.items():
        print(f"{product}: one block at 300 steps per linear: {ms * 0.3:.0f} s; 30 blocks: {ms * 0.3 * 30 / 60:.1f} min")


if __name__ == "__main__":
    main()
