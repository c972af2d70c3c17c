#!/usr/bin/env python
"""QuantLinear backends against dense fp32/bf16 matmuls, on CPU, as ratios from ONE run.

For batches 1 and 32 (``--batches``) over LLaMA-7B-sized shapes (``in x out``: 4096x4096,
4096x11008, 11008x4096; ``--shapes``) it times each column as a decode step meets it: a CHAIN of copies of the layer
(distinct memory, together at least twice the last-level cache) called one after another, so
that every call streams its weight from memory while the code around it stays warm; the time
per call is the chain's time over its length. Columns are timed round-robin (load from other
processes hits every column alike) and the median of the rounds is reported. (Two other
set-ups were tried and rejected: one layer called repeatedly runs from cache; one layer after
a 64 MiB cache flush also evicts the Python and dispatcher state every layer keeps warm in a
real model -- the int4 kernel then took 0.60 ms of which 0.15 ms was the cold module call.)
A batch whose call does more than :data:`CHAIN_FLOP` of work is compute-bound: its chains are cut
to as many copies as that budget holds (at least one).

* ``fp32`` / ``bf16``: ``F.linear`` with a dense weight (fp32 / bf16 activations);

every quantized column is timed twice, with fp32 activations (its ratio against ``fp32``) and with
bf16 activations, as a bf16 model feeds it (its ratio against ``bf16``);

* ``int4``: QuantLinear 4-bit group-128 with the backend ``auto`` picks (``int4_native``, qcore's
  own kernel, where the CPU has AVX512-BF16 and a C compiler is found; else ``int4_cpu``);
* ``int4_torch``: the same layer forced to ``int4_cpu`` (torch's packed int4 kernel, bf16 inside);
* ``int8``: QuantLinear 8-bit per-channel, backend ``int8_cpu``;
* ``w8a8``: 8-bit per-channel weights + dynamic per-token int8 activations (backend ``w8a8``);
* ``fbgemm``: ``quantized::linear_dynamic`` (per-TENSOR dynamic uint8 activations): measured
  to justify the w8a8 choice, not used by QuantLinear;
* ``int3``: 3-bit group-128 (stored 3-bit; ``auto`` runs it on the int4 kernel as 4-bit codes);
* ``dense``: the cached-dense-weight fallback (4-bit weights forced to ``dense``);
* ``ref``: dequantize-then-matmul on every call (batch 1, 4096x4096, one call; never a default).

``int4 path`` is the path the ``int4`` column's layer takes at that batch
(``QuantLinear.kernel_path``: ``int4_native:kernel``, ``:amx`` for the AMX kernel, or ``:bf16`` /
``:fp32`` for dequantize + dense matmul, from the steps measured for this CPU and shape); the measured crossovers are
printed after the table. ``--columns`` restricts the quantized columns (fp32 and bf16 always run).

The batch-1 bandwidth floor is the int4 layer's resident bytes (its kernel pack: packed codes +
bf16 scale/zero table) divided by the copy bandwidth (bytes read + bytes written per second),
measured as one more column of the same round-robin -- a copy of twice the last-level cache --
so that the floor and the kernel see the same memory system (this VM's bandwidth drifts by
tens of percent within minutes); the header also gives a 256 MiB copy timed before the run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kernels.py [--rounds 30] [--json out.json] [--clock cpu]
        [--shapes 4096x4096,4096x11008] [--batches 1,8,32,256,2048] [--columns int4,int4_torch]
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qcore.quant.act import ActQuant
from qcore.quant.linear import QuantLinear
from qcore.quant.primitives import quantize_rtn

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BATCHES = [1, 32]
COLUMNS = ("int4", "int4_torch", "int3", "int8", "w8a8", "dense")
CHAIN_FLOP = 2e10
"""Most multiply-add FLOPs one chain runs per round (large batches: fewer copies)."""


def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / statistics.median(times[1:])


def read_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Bytes read per second by a reduction over a large tensor (no writes): a check that the
    read+write copy bandwidth is the right yardstick for a matmul that only streams weights."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return 4 * src.numel() / statistics.median(times[1:])


CLOCK: Callable[[], float] = time.perf_counter


def llc_bytes() -> int:
    """The last-level cache size (sysfs), 32 MiB when unknown."""
    best = 0
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(f).read().strip().upper()
        mult = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 32 * 2**20


def chain_length(layer_bytes: int) -> int:
    """Copies of a layer whose weights together are at least twice the last-level cache."""
    return max(2, -(-2 * llc_bytes() // max(layer_bytes, 1)))


def interleaved(chains: dict[str, list[Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each chain's functions, timed round-robin with :data:`CLOCK`."""
    for fs in chains.values():
        for f in fs:
            f()
    times: dict[str, list[float]] = {k: [] for k in chains}
    for _ in range(rounds):
        for k, fs in chains.items():
            t = CLOCK()
            for f in fs:
                f()
            times[k].append((CLOCK() - t) / len(fs))
    return {k: statistics.median(v) for k, v in times.items()}


def fbgemm_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    import warnings

    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
    try:
        scale = (w.abs().amax(1) / 127).double()
        qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    except Exception:  # noqa: BLE001 - build without fbgemm
        return None
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def bench_shape(k: int, n: int, rounds: int, bw: float, batches: list[int] = BATCHES,
                columns: tuple[str, ...] = COLUMNS) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    specs = {  # column: (bits, group, sym, act, backend)
        "int4": (4, 128, False, None, "auto"), "int4_torch": (4, 128, False, None, "int4_cpu"),
        "int3": (3, 128, False, None, "auto"), "int8": (8, -1, True, None, "int8_cpu"),
        "w8a8": (8, -1, True, ActQuant(8), "w8a8"), "dense": (4, 128, False, None, "dense"),
    }
    specs = {name: spec for name, spec in specs.items() if name in columns}
    qws = {key: quantize_rtn(w, bits, gs, sym) for key, (bits, gs, sym, _, _) in specs.items()}
    x1 = torch.randn(1, k, generator=g)

    def copies(name: str) -> list[QuantLinear]:
        bits, gs, sym, act, backend = specs[name]
        first = QuantLinear.from_quantized(qws[name], None, act=act)
        first.backend = backend
        with torch.inference_mode():
            first(x1)  # builds the kernel pack (releasing the packed buffers it replaces)
        # the others are copies of its memory (kernel pack included): as built, and quicker
        return [first] + [copy.deepcopy(first) for _ in range(chain_length(first.resident_bytes()) - 1)]

    mods = {name: copies(name) for name in specs}
    dense32 = [w.clone() for _ in range(chain_length(w.numel() * 4))]
    dense16 = [w.bfloat16() for _ in range(chain_length(w.numel() * 2))]
    fbs = ([fb for fb in (fbgemm_linear(w) for _ in range(chain_length(w.numel()))) if fb is not None]
           if "fbgemm" in columns else [])
    copy_src = torch.ones(2 * llc_bytes(), dtype=torch.uint8)
    copy_dst = torch.empty_like(copy_src)
    ref = QuantLinear.from_quantized(qws["int4"], None)
    ref.backend = "reference"
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        most = max(1, int(CHAIN_FLOP // (2 * m * k * n)))
        chains: dict[str, list[Callable[[], object]]] = {
            "fp32": [(lambda wi: lambda: F.linear(x, wi))(wi) for wi in dense32[:most]],
            "bf16": [(lambda wi: lambda: F.linear(xb, wi))(wi) for wi in dense16[:most]],
        }
        for name in specs:  # each with fp32 activations (against fp32) and bf16 ones (against bf16)
            chains[name] = [(lambda mod: lambda: mod(x))(mod) for mod in mods[name][:most]]
            chains[f"{name}@bf16"] = [(lambda mod: lambda: mod(xb))(mod) for mod in mods[name][:most]]
        if fbs:
            chains["fbgemm"] = [(lambda fb: lambda: fb(x))(fb) for fb in fbs[:most]]
        if m == 1:
            chains["copy"] = [lambda: copy_dst.copy_(copy_src)]
        with torch.inference_mode():
            t = interleaved(chains, rounds)
            copy_s = t.pop("copy", None)
            if m == 1 and k * n <= 4096 * 4096 and "ref" in columns:  # one call: it is slow by design
                t0 = CLOCK()
                ref(x)
                t["ref"] = CLOCK() - t0
        int4 = mods["int4"][0]
        int4_bytes = int4.resident_bytes()
        row = {"shape": f"{k}x{n}", "batch": m, "int4_backend": int4.select_backend(),
               "int4_path": int4_path(int4, m), "crossover": crossover_of(int4),
               "chain": {name: len(c) for name, c in chains.items()},
               "ms": {kk: v * 1e3 for kk, v in t.items()},
               "copy_bandwidth_Bps": 2 * copy_src.numel() / copy_s if copy_s else None,
               "floor_ms": int4_bytes * copy_s / (2 * copy_src.numel()) * 1e3 if copy_s else None,
               "floor_ms_start": int4_bytes / bw * 1e3 if m == 1 else None}
        rows.append(row)
    return rows


def int4_path(mod: QuantLinear, rows: int) -> str:
    """``QuantLinear.kernel_path`` where the layer has it, else its backend's name."""
    path = getattr(mod, "kernel_path", None)
    return path(rows) if path is not None else mod.select_backend()


def crossover_of(mod: QuantLinear) -> dict | None:
    """The measured crossover of an ``int4_native`` layer (None for other backends)."""
    found = getattr(mod._cache, "crossover", None)
    return found[1].to_json() if found is not None else None


def table(rows: list[dict], columns: tuple[str, ...] = (*COLUMNS, "fbgemm", "ref")) -> str:
    cols = [c for c in ["int4", "int4_torch", "int3", "int8", "w8a8", "fbgemm", "dense", "ref"] if c in columns]
    head = ("| shape (in x out) | batch | int4 path | fp32 ms | bf16 ms | "
            + " | ".join(f"{c} ms fp32-in / bf16-in (vs fp32 / vs bf16)" for c in cols)
            + " | copy GB/s | floor ms | int4 / floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = r["ms"]
        cells = [r["shape"], str(r["batch"]), r["int4_path"], f"{ms['fp32']:.2f}", f"{ms['bf16']:.2f}"]
        for c in cols:
            if c in ms and f"{c}@bf16" in ms:
                b = ms[f"{c}@bf16"]
                cells.append(f"{ms[c]:.2f} / {b:.2f} ({ms['fp32'] / ms[c]:.2f}x / {ms['bf16'] / b:.2f}x)")
            elif c in ms:
                cells.append(f"{ms[c]:.2f} ({ms['fp32'] / ms[c]:.2f}x / {ms['bf16'] / ms[c]:.2f}x)")
            else:
                cells.append("-")
        if r["floor_ms"] and "int4" in ms:
            cells += [f"{r['copy_bandwidth_Bps'] / 1e9:.1f}", f"{r['floor_ms']:.2f}", f"{ms['int4'] / r['floor_ms']:.2f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, comma-separated")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--columns", default=",".join((*COLUMNS, "fbgemm", "ref")),
                    help="quantized columns to time (int4 is always timed; fp32 and bf16 always run)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter (the real speed); cpu: process CPU time, less sensitive to "
                         "other processes on a shared machine (run with OMP_WAIT_POLICY=PASSIVE so idle "
                         "threads do not spin); the bandwidth floor is always wall-clock")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    bw = copy_bandwidth()
    read_bw = read_bandwidth()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    columns = tuple(dict.fromkeys(["int4", *args.columns.split(",")]))
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, args.rounds, bw, batches, columns)
    load_end = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.clock} clock, {args.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{load_start:.1f} at start / {load_end:.1f} at end, copy bandwidth before the run {bw / 1e9:.1f} GB/s "
          f"(read+write; a read-only sum reads {read_bw / 1e9:.1f} GB/s); ratios are speedups (>1 = faster than the dense matmul)\n")
    print(f"int4 = QuantLinear's auto backend: {rows[0]['int4_backend']}; int4_torch = int4_cpu\n")
    print(table(rows, columns))
    seen = set()
    for r in rows:
        if r["crossover"] and r["shape"] not in seen:
            seen.add(r["shape"])
            c = r["crossover"]
            raced = [p for p in ("kernel", "amx", c["dense"]) if p in c["ms"]]
            probes = ", ".join(f"{m}: " + " / ".join(str(c["ms"][p].get(m, "-")) for p in raced)
                               for m in sorted({m for p in raced for m in c["ms"][p]}, key=int))
            steps = ", ".join(f"{p} from {m}" for m, p in c["steps"])
            print(f"\n{r['shape']}: {steps} rows (measured ms, {' / '.join(raced)}: {probes})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clock": args.clock, "threads": args.threads, "copy_bandwidth_Bps": bw, "read_bandwidth_Bps": read_bw,
                       "load_average": [load_start, load_end],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
