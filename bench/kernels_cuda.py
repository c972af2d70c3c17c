"""QuantLinear's CUDA backends against dense bf16/fp16 matmuls, as ratios from ONE run.

For each shape (in x out) and batch: median time of ``--iters`` calls (CUDA events) of a dense
fp16 and bf16 matmul, the raw kernels (torch's int4 ``_weight_int4pack_mm``, ``torch._int_mm``),
and QuantLinear's forward with ``int4_cuda`` (4-bit, group 128), ``dense`` (the cached-dequant
fallback), ``reference`` (dequantize per call) and ``w8a8`` (dynamic int8 activations).

    python bench/kernels_cuda.py [--iters 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from qcore.eval import format_table  # noqa: E402
from qcore.quant.act import ActQuant  # noqa: E402
from qcore.quant.backends.int4_cuda import INT4_CUDA_MAX_ROWS  # noqa: E402
from qcore.quant.linear import QuantLinear  # noqa: E402
from qcore.quant.primitives import quantize_rtn  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BATCHES = [1, 8, 16, 32, 128, 512]


def cuda_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.02
        q4 = QuantLinear.from_quantized(quantize_rtn(w, 4, 128, False), None).cuda()
        q8 = QuantLinear.from_quantized(quantize_rtn(w, 8, -1, True), None, act=ActQuant(bits=8)).cuda()
        w16, wb = w.half().cuda(), w.bfloat16().cuda()
        q4.backend = "int4_cuda"
        q4(torch.randn(1, k, device="cuda").half())  # builds the kernel pack
        pack = q4._cache
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        for m in BATCHES:
            x16, xb = torch.randn(m, k, device="cuda").half(), torch.randn(m, k, device="cuda").bfloat16()
            x8 = torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8, device="cuda")
            t = {"fp16": cuda_ms(lambda: x16 @ w16.t(), args.iters),
                 "bf16": cuda_ms(lambda: xb @ wb.t(), args.iters),
                 "tinygemm": cuda_ms(lambda: torch.ops.aten._weight_int4pack_mm(
                     xb, pack.packed, pack.kgroup, pack.scale_zeros), args.iters),
                 "_int_mm": cuda_ms(lambda: torch._int_mm(x8, w8.t()), args.iters)}
            for name, mod, backend in (("int4_cuda", q4, "int4_cuda"), ("dense", q4, "dense"),
                                       ("reference", q4, "reference"), ("w8a8", q8, "w8a8")):
                mod.backend = backend
                t[name] = cuda_ms(lambda mod=mod: mod(x16), args.iters)
            row = {"shape": f"{k}x{n}", "batch": m, "fp16 ms": round(t["fp16"], 4), "bf16 ms": round(t["bf16"], 4)}
            for name in ("tinygemm", "_int_mm", "int4_cuda", "dense", "reference", "w8a8"):
                row[f"{name} ms (vs fp16)"] = f"{t[name]:.4f} ({t['fp16'] / t[name]:.2f}x)"
            if m == 1:
                weight_bytes = k * n // 2 + (k // 128) * n * 2 * 2  # 4-bit codes + bf16 scale/offset
                floor = weight_bytes / bw * 1e3
                row["tinygemm / floor"] = round(t["tinygemm"] / floor, 2)
            rows.append(row)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s "
          f"(read+write); median of {args.iters} calls; ratios are speedups over fp16 dense. tinygemm and "
          "_int_mm: the raw kernels; the other columns: QuantLinear.forward with that backend "
          f"(int4_cuda: tinygemm up to {INT4_CUDA_MAX_ROWS} rows, per-call dequantize above)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
