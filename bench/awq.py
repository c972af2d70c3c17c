#!/usr/bin/env python
"""AWQ bench: float, RTN, qcore's AWQ and AWQ+GPTQ on SmolLM2-135M / WikiText-2, beside peers' AWQ.

qcore's rows are evaluated with qcore's perplexity protocol (:mod:`qcore.eval`). AWQ's search
time is reported per block (scale search + clip search, from the method's record) and in total,
next to the wall time of the whole ``qcore.quantize`` call (input capture and propagation
included). Peers (llm-compressor, GPTQModel) run in their own virtual environments as
subprocesses on the same float model (saved once as a Hugging Face folder), the same
calibration token ids and the same evaluation windows (saved as safetensors). Each peer
evaluates its whole quantized model in its own process (bench/peer_eval.py: AWQ folds its scales
into norms and producer layers, so copying the linears' weights back would be wrong), after its
float model, whose perplexity must reproduce qcore's float row (the row is void otherwise). A
peer that fails is reported with its error, not hidden.

On a CPU-only machine llm-compressor's AWQ needs one workaround, applied inside its process
only: its ``IntermediatesCache`` pins host memory (``torch.Tensor.pin_memory``), which needs an
accelerator; the bench replaces ``pin_memory`` by the identity there (nothing else pins).
GPTQModel's torch AWQ kernel packs only float16/bfloat16 models: it runs in ``--gptqmodel-dtype``
(bfloat16 by default), so its float row is that dtype's and is compared at a looser tolerance.

Usage (the numbers in docs/results.md):

    OMP_NUM_THREADS=2 .venv/bin/python bench/awq.py --bits 3 4 --group-size 64 \
        --n-samples 8 --seq-len 512 --eval-tokens 4096 --json /tmp/awq_bench.json

``--peer NAME --peer-config JSON`` is the mode the peer subprocesses run (peer packages only).
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

DEFAULT_PEER_PYTHON = {
    "gptqmodel": "/work/peers/gptqmodel/bin/python",
    "llm-compressor": "/work/peers/llmc/bin/python",
}


# ================================================================================================
# peer mode (inside the peer's virtual environment)
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def _peer_gptqmodel(cfg: dict, ids: Any, win: Any, pe: Any) -> dict[str, Any]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from transformers import AutoModelForCausalLM

    qc = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                        quant_method=METHOD.AWQ, format=FORMAT.GEMM, offload_to_disk=False,
                        dynamic=pe.gptqmodel_dynamic(cfg))
    dtype = getattr(torch, cfg["gptqmodel_dtype"])
    float_ppl = pe.window_perplexity(AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=dtype), win)
    model = GPTQModel.load(cfg["float_dir"], qc, device="cpu", dtype=dtype)
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids]
    start = time.perf_counter()
    # the default AWQ kernels need CUDA; AWQ_TORCH is GPTQModel's device-agnostic one (float16/bfloat16 only)
    model.quantize(calib, batch_size=1, backend=BACKEND.AWQ_TORCH)
    seconds = time.perf_counter() - start
    model.save(cfg["out"] + "/checkpoint")  # evaluated as a user gets it: its own loader on its file
    del model
    quantized = GPTQModel.load(cfg["out"] + "/checkpoint", device="cpu", dtype=dtype, backend=BACKEND.AWQ_TORCH)
    return {"float_ppl": float_ppl, "ppl": pe.window_perplexity(quantized.model, win), "seconds": seconds,
            "version": gptqmodel.__version__, "dtype": cfg["gptqmodel_dtype"]}


def _peer_llmc(cfg: dict, ids: Any, win: Any, pe: Any) -> dict[str, Any]:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    # IntermediatesCache pins host memory, which needs an accelerator; identity on a CPU-only machine
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    model = AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=torch.float32)
    float_ppl = pe.window_perplexity(model, win)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    weights = {"num_bits": cfg["bits"], "type": "int", "symmetric": cfg["sym"], "strategy": "group",
               "group_size": cfg["group_size"]}
    recipe = AWQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                         ignore=pe.llmc_ignore(cfg))
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), batch_size=1)
    seconds = time.perf_counter() - start
    return {"float_ppl": float_ppl, "ppl": pe.window_perplexity(model, win), "seconds": seconds,
            "version": llmcompressor.__version__, "dtype": "float32"}


def peer_main(name: str, cfg: dict) -> None:
    """Quantize with the peer, evaluate its float and its whole quantized model here."""
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    data = load_file(cfg["tensors"])
    res = {"gptqmodel": _peer_gptqmodel, "llm-compressor": _peer_llmc}[name](cfg, data["calibration"],
                                                                            data["eval"], _peer_eval())
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    (Path(cfg["out"]) / "result.json").write_text(json.dumps(res))


# ================================================================================================
# bench mode (qcore's environment)
# ================================================================================================

def _awq_times(model: Any) -> dict[str, Any]:
    rec = next(c for c in model.qcore_record["chain"] if c["method"] == "awq")["record"]
    per_block = [b["search_s"] for b in rec["blocks"]]
    scale = [b["scale_search_s"] for b in rec["blocks"]]
    clip = [b["clip_search_s"] for b in rec["blocks"]]
    statuses: dict[str, int] = {}
    for b in rec["blocks"]:
        for g in b["groups"]:
            key = f"{g['role']}: {g['status'].split(':')[0]}"
            statuses[key] = statuses.get(key, 0) + 1
    return {"search_total_s": rec["search_seconds_total"], "per_block_mean_s": sum(per_block) / len(per_block),
            "per_block_min_s": min(per_block), "per_block_max_s": max(per_block),
            "scale_search_total_s": sum(scale), "clip_search_total_s": sum(clip), "groups": statuses}


def bench_main(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model, save_float

    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcore_awq_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    def fresh() -> Any:
        return load_model(args.model)[0].eval()

    model, tok = load_model(args.model)

    def ppl(m: Any) -> float:
        return perplexity(m, args.eval_text, tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl

    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    rows: list[dict[str, Any]] = [{"bits": "-", "method": "float", "ppl": ppl(model), "seconds": None}]
    print(rows[-1], flush=True)
    if args.peers:
        save_float(model, work / "float", tok, overwrite=True)
        win = windows(token_stream(args.eval_text, tok)[0], args.eval_seq_len, args.eval_tokens)
        save_file({"calibration": calib.input_ids.contiguous(), "eval": win.contiguous()},
                  str(work / "tensors.safetensors"))
    pe = _peer_eval()
    del model

    for bits in args.bits:
        common = {"bits": bits, "group_size": args.group_size, "sym": args.sym}
        for label, method in (("rtn", "rtn"), ("awq", "awq"), ("awq+gptq", ["awq", "gptq"])):
            if label not in args.methods:
                continue
            if label == "awq+gptq" and "gptq" not in qcore.list_methods():
                rows.append({"bits": bits, "method": label, "ppl": None, "error": "qcore-quant-gptq not installed"})
                continue
            m = fresh()
            start = time.perf_counter()
            qcore.quantize(m, method, calibration=None if method == "rtn" else calib,
                           propagate=args.propagate, **common)
            row = {"bits": bits, "method": f"{label} (qcore)", "seconds": time.perf_counter() - start}
            if label != "rtn":
                row.update(_awq_times(m))
            row["ppl"] = ppl(m)
            rows.append(row)
            print(row, flush=True)
            del m

        for peer in args.peers:
            py = getattr(args, f"{peer.replace('-', '_')}_python") or DEFAULT_PEER_PYTHON[peer]
            out = work / f"{peer}_{bits}"
            cfg = {**common, "float_dir": str(work / "float"), "tensors": str(work / "tensors.safetensors"),
                   "out": str(out), "gptqmodel_dtype": args.gptqmodel_dtype}
            row = {"bits": bits, "method": f"{peer} AWQ", "ppl": None}
            if not Path(py).is_file():
                row["error"] = f"peer environment not found ({py}); see bench/requirements-peers.txt"
                rows.append(row)
                continue
            start = time.perf_counter()
            try:
                proc = subprocess.run([py, __file__, "--peer", peer, "--peer-config", json.dumps(cfg)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                                      timeout=args.peer_timeout)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
            except subprocess.TimeoutExpired:
                rc, tail = -1, f"timed out after {args.peer_timeout} s"
            if rc != 0:
                (work / f"{peer}_{bits}.log").write_text(tail)
                lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
                row["error"] = (lines[-1] if lines else "failed")[:300]
                print(f"{peer} failed (rc {rc}); log {work / f'{peer}_{bits}.log'}: {row['error']}", flush=True)
                rows.append(row)
                continue
            res = json.loads((out / "result.json").read_text())
            # a half-precision peer's float row differs from qcore's float32 one by more than rounding
            rtol = pe.FLOAT_MATCH_RTOL if res["dtype"] == "float32" else args.half_float_rtol
            ok, note = pe.float_check(res["float_ppl"], rows[0]["ppl"], rtol)
            row.update({"method": f"{peer} {res['version']} AWQ ({res['dtype']})", "seconds": res["seconds"],
                        "ppl": res["ppl"] if ok else float("nan"), "peer_ppl": res["ppl"],
                        "peer_float_ppl": res["float_ppl"], "note": note,
                        "subprocess_seconds": time.perf_counter() - start})
            rows.append(row)
            print(row, flush=True)

    print()
    print(f"model {args.model}, group {args.group_size}, sym={args.sym}, propagate={args.propagate}; "
          f"calibration {calib.record.get('source')} {args.n_samples}x{args.seq_len} (seed 0); "
          f"{args.eval_text} perplexity over the first {args.eval_tokens} tokens in {args.eval_seq_len}-token "
          f"windows; torch threads {torch.get_num_threads()}")
    print()
    print("| bits | method | perplexity | quantize wall (s) | AWQ search total (s) | per block mean / max (s) | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = f"{r['ppl']:.3f}" if r.get("ppl") is not None else f"did not run: {r.get('error', '')}"
        sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        srch = f"{r['search_total_s']:.1f}" if "search_total_s" in r else "-"
        blk = f"{r['per_block_mean_s']:.2f} / {r['per_block_max_s']:.2f}" if "per_block_mean_s" in r else "-"
        print(f"| {r['bits']} | {r['method']} | {p} | {sec} | {srch} | {blk} | {r.get('note', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record, "rows": rows},
                                              indent=1, default=str))


def main() -> None:
    here = Path(__file__).resolve().parent  # keep bench/*.py (named like packages) off the path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq", "awq+gptq"])
    ap.add_argument("--propagate", default="quantized", choices=["quantized", "float"])
    ap.add_argument("--calibration", default="c4")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--peers", nargs="*", default=["llm-compressor", "gptqmodel"])
    ap.add_argument("--gptqmodel-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="dtype GPTQModel's AWQ runs in (its torch AWQ kernel packs only half precision)")
    ap.add_argument("--half-float-rtol", type=float, default=0.02,
                    help="tolerance of a half-precision peer's float perplexity against qcore's float32 one")
    ap.add_argument("--gptqmodel-python", default=None)
    ap.add_argument("--llm-compressor-python", default=None)
    ap.add_argument("--peer-timeout", type=int, default=1800)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.peer:
        peer_main(args.peer, json.loads(args.peer_config))
    else:
        bench_main(args)


if __name__ == "__main__":
    main()
