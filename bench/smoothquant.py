#!/usr/bin/env python
"""SmoothQuant bench: perplexity of float, naive WxAy (no smoothing) and qcore's SmoothQuant
(fixed alpha and alpha grid search) at A8/A6/A4, next to llm-compressor's SmoothQuant + W8A8.

Every model is evaluated with qcore's perplexity protocol (:mod:`qcore.eval`: non-overlapping
windows, mean next-token NLL) on the same WikiText-2 token windows. Weights are 8-bit per-channel
symmetric RTN in every row; activations dynamic per-token symmetric (``--static`` for per-tensor
calibrated scales). qcore's W8A8 rows run QuantLinear's ``w8a8`` int8 backend; A6/A4 rows are
fake-quantized.

llm-compressor runs in a subprocess with its own virtual environment (``--llmc-python``, see
bench/requirements-peers.txt) on the same float model (saved once as a Hugging Face folder) and the
same calibration windows: ``SmoothQuantModifier(smoothing_strength=alpha)`` then
``QuantizationModifier`` (int8 per-channel symmetric weights, dynamic per-token symmetric int
activations of the same width). Its perplexity is computed inside the subprocess on its own
(fake-quantizing) forward, over the same windows, with the same formula; the subprocess also
evaluates its float model first (bench/peer_eval.py): a peer row whose float perplexity misses
qcore's float row is void (NaN). Times are
the quantization calls only (``qcore.quantize`` / ``oneshot``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/smoothquant.py --model smollm2-135m \\
        --calibration ../shared/data/c4_sample.jsonl --n-samples 32 --seq-len 512 \\
        --eval-tokens 16384 --eval-seq-len 512 --json /tmp/sq_smollm2.json
    OMP_NUM_THREADS=2 .venv/bin/python bench/smoothquant.py --model ../shared/models/stories260K \\
        --calibration ../shared/data/tinystories_train_head.txt --n-samples 32 --seq-len 256 \\
        --eval-tokens 65536 --eval-seq-len 512 --json /tmp/sq_stories.json

Speed (``--speed``): the int8 path against fp32 and bf16 ``F.linear`` on one 4096x4096 weight at
batch 1, 32 and 512, timed round-robin in one run (median of the rounds):

    OMP_NUM_THREADS=2 .venv/bin/python bench/smoothquant.py --speed --rounds 15 --json /tmp/sq_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_LLMC_PYTHON = "/work/peers/llmc/bin/python"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# ================================================================================================
# peer mode: runs inside llm-compressor's virtual environment (torch, transformers, llmcompressor)
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def peer_main(cfg: dict) -> None:
    import torch
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = load_file(cfg["calib"])["input_ids"]
    win = load_file(cfg["eval"])["windows"]
    pe = _peer_eval()
    model = AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=torch.float32).eval()
    float_ppl = pe.window_perplexity(model, win, cfg["eval_batch"])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    scheme = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": cfg["a_bits"], "type": "int", "symmetric": True,
                              "strategy": "token", "dynamic": True},
    }
    recipe = [QuantizationModifier(config_groups={"group_0": scheme}, ignore=pe.llmc_ignore(cfg))]
    if cfg["smooth"]:
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=cfg["alpha"]))
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), batch_size=cfg["batch_size"])
    seconds = time.perf_counter() - start
    ppl = pe.window_perplexity(model, win, cfg["eval_batch"])
    Path(cfg["out"]).write_text(json.dumps({"ppl": ppl, "float_ppl": float_ppl, "seconds": seconds,
                                            "version": llmcompressor.__version__}))


# ================================================================================================
# speed mode: the int8 matmul against fp32 / bf16 (one run, interleaved rounds)
# ================================================================================================
def speed_main(args: argparse.Namespace) -> None:
    import statistics
    import warnings

    import torch
    import torch.nn.functional as F

    from qcore.quant.act import ActQuant, quantize_act_int8
    from qcore.quant.backends.int8_cpu import build_int8
    from qcore.quant.backends.w8a8 import w8a8_mm
    from qcore.quant.linear import QuantLinear
    from qcore.quant.primitives import quantize_rtn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = k = args.size
    w = torch.randn(n, k) / k**0.5
    wb = w.bfloat16()
    ql = QuantLinear.from_quantized(quantize_rtn(w, 8, -1, True), None, act=ActQuant(8, dynamic=True))
    pack = build_int8(ql.codes(), ql.scales, ql.qzeros)
    warnings.filterwarnings("ignore")
    packed = None
    try:  # fbgemm dynamic int8 linear (per-TENSOR dynamic activations): for comparison only
        qw = torch.quantize_per_channel(w, (w.abs().amax(1) / 127).double(), torch.zeros(n, dtype=torch.long), 0,
                                        torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    except Exception:  # noqa: BLE001 - torch without fbgemm
        pass
    rows = []
    for m in args.batches:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        xq, sx = quantize_act_int8(x)
        fns = {
            "fp32": lambda: F.linear(x, w),
            "bf16": lambda: F.linear(xb, wb),
            "w8a8 QuantLinear": lambda: ql(x),
            "int8 kernel only": lambda: w8a8_mm(xq, sx, pack, torch.float32),
            "torch._int_mm only": lambda: torch._int_mm(xq, pack.weight.t()),
        }
        if packed is not None:
            fns["fbgemm linear_dynamic"] = lambda: torch.ops.quantized.linear_dynamic(x, packed, True)
        with torch.inference_mode():
            assert ql.select_backend() == "w8a8"
            for f in fns.values():
                f()
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        for name, t in med.items():
            rows.append({"batch": m, "path": name, "ms": 1e3 * t, "vs_fp32": med["fp32"] / t, "vs_bf16": med["bf16"] / t,
                         "gflops": 2 * m * n * k / t / 1e9})
    print(f"torch {torch.__version__}, {args.threads} threads, {n}x{k} weight, median of {args.rounds} interleaved rounds")
    print()
    print("| batch | path | ms | speed-up vs fp32 | vs bf16 | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['path']} | {r['ms']:.2f} | {r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x | {r['gflops']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))


# ================================================================================================
# bench mode: runs in qcore's environment
# ================================================================================================

def bench_main(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model, save_float
    from qcore.quant.linear import QuantLinear

    if args.qcore_backend:  # e.g. "dense": fp32 fake quantization for every qcore row (study, not speed)
        os.environ["QCORE_QLINEAR_BACKEND"] = args.qcore_backend
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcore_sq_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    def fresh() -> Any:
        m, t = load_model(args.model)
        return m.eval(), t  # load_model gives float32 (GGUF models refuse .float())

    model, tok = fresh()
    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    ids, desc, _ = token_stream(args.eval_text, tok)
    win = windows(ids, args.eval_seq_len, args.eval_tokens)
    n_tokens = int(win.numel())

    def ppl(m: Any) -> float:
        return perplexity(m, win.reshape(-1), seq_len=args.eval_seq_len, batch_size=args.eval_batch).ppl

    rows: list[dict[str, Any]] = []
    rows.append({"a_bits": "-", "method": "float", "ppl": ppl(model), "seconds": None})
    print(rows[-1], flush=True)
    float_dir = work / "float"
    if args.peers:
        save_float(model, float_dir, tok, overwrite=True)
        save_file({"input_ids": calib.input_ids.contiguous()}, str(work / "calib.safetensors"))
        save_file({"windows": win.contiguous()}, str(work / "eval.safetensors"))
    del model

    variants: list[tuple[str, dict[str, Any]]] = [
        ("naive (no smoothing)", {"smooth": False}),
        (f"smoothquant a={args.alpha:g}", {"alpha": args.alpha}),
        ("smoothquant a-grid", {"alpha_grid": args.alpha_grid}),
    ]
    for a_bits in args.a_bits:
        for label, opts in variants:
            m, _ = fresh()
            start = time.perf_counter()
            qcore.quantize(m, "smoothquant", calibration=calib, w_bits=8, a_bits=a_bits,
                           act_dynamic=not args.static, **opts)
            seconds = time.perf_counter() - start
            backends = sorted({q.select_backend() for q in m.modules() if isinstance(q, QuantLinear)})
            rec = m.qcore_record["chain"][-1].get("record", {})
            rows.append({"a_bits": a_bits, "method": f"{label} (qcore)", "ppl": ppl(m), "seconds": seconds,
                         "backends": backends, "alphas": rec.get("alphas")})
            print(rows[-1], flush=True)
            del m
        if args.peers:
            for smooth in (False, True):
                out = work / f"llmc_a{a_bits}_{int(smooth)}.json"
                cfg = {"float_dir": str(float_dir), "calib": str(work / "calib.safetensors"),
                       "eval": str(work / "eval.safetensors"), "out": str(out), "a_bits": a_bits,
                       "alpha": args.alpha, "smooth": smooth, "batch_size": 8, "eval_batch": args.eval_batch}
                env = {**os.environ, "PYTHONPATH": ""}
                env.pop("QCORE_QLINEAR_BACKEND", None)
                proc = subprocess.run([args.llmc_python, __file__, "--peer", json.dumps(cfg)], capture_output=True,
                                      text=True, env=env, timeout=args.peer_timeout)
                label = f"llm-compressor {'SmoothQuant a=%g + ' % args.alpha if smooth else ''}W8A{a_bits}"
                if proc.returncode != 0:
                    tail = (proc.stdout + proc.stderr)[-3000:]
                    print(f"llm-compressor failed (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
                    rows.append({"a_bits": a_bits, "method": label, "ppl": None, "seconds": None,
                                 "error": tail.strip().splitlines()[-1] if tail.strip() else "failed"})
                    continue
                res = json.loads(out.read_text())
                ok, note = _peer_eval().float_check(res["float_ppl"], rows[0]["ppl"])
                rows.append({"a_bits": a_bits, "method": f"{label} ({res['version']}; {note})",
                             "ppl": res["ppl"] if ok else float("nan"), "peer_ppl": res["ppl"],
                             "peer_float_ppl": res["float_ppl"], "seconds": res["seconds"]})
                print(rows[-1], flush=True)

    print()
    print(f"QuantLinear backend forced: {args.qcore_backend or 'no (auto)'}")
    print(f"model {args.model}; W8 per-channel sym RTN; activations {'static per-tensor' if args.static else 'dynamic per-token'}"
          f" sym; calibration {calib.record['source']} {args.n_samples}x{args.seq_len} (seed 0); "
          f"{desc}: perplexity over {n_tokens} tokens in {args.eval_seq_len}-token windows")
    print()
    print("| weights/acts | method | perplexity | quantize time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        p = f"{r['ppl']:.3f}" if r["ppl"] is not None else f"failed: {r.get('error', '')}"
        sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        wa = "float" if r["a_bits"] == "-" else f"W8A{r['a_bits']}"
        print(f"| {wa} | {r['method']} | {p} | {sec} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record,
                                               "eval_tokens": n_tokens, "rows": rows}, indent=1, default=str))


def main() -> None:
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default=str(SHARED / "data" / "c4_sample.jsonl"))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext2_raw_test.txt"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--a-bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--alpha-grid", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--static", action="store_true", help="static per-tensor activation scales (qcore rows)")
    ap.add_argument("--qcore-backend", help="force a QuantLinear backend for qcore's rows (QCORE_QLINEAR_BACKEND)")
    ap.add_argument("--peers", nargs="*", default=["llm-compressor"])
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON)
    ap.add_argument("--peer-timeout", type=int, default=1800)
    ap.add_argument("--workdir")
    ap.add_argument("--speed", action="store_true", help="time the int8 matmul against fp32/bf16 instead")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.peer:
        peer_main(json.loads(args.peer))
    elif args.speed:
        speed_main(args)
    else:
        bench_main(args)


if __name__ == "__main__":
    main()
