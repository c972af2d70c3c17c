#!/usr/bin/env python
"""GPTQ bench: float, RTN and qcore's GPTQ against GPTQModel and llm-compressor's GPTQ.

qcore's rows are evaluated with qcore's own perplexity protocol (:mod:`qcore.eval`) on
WikiText-2. Each peer runs in a subprocess with its own virtual environment's Python
(``--gptqmodel-python``, ``--llm-compressor-python``, see bench/requirements-peers.txt) on the
same float model (saved once as a Hugging Face folder), the same calibration token ids and the
same evaluation windows (saved as safetensors), and evaluates its whole quantized model in its
own process (bench/peer_eval.py), after its float model, whose perplexity must reproduce qcore's
float row (the row is void otherwise). Wall times are the peers' own quantization call
(``quantize()`` / ``oneshot()``), measured inside the subprocess, next to qcore's
``qcore.quantize`` call; model loading and evaluation are not timed.

Usage (SmolLM2-135M, the numbers in docs/results.md):

    OMP_NUM_THREADS=2 .venv/bin/python bench/gptq.py --model smollm2-135m --bits 3 4 --group-size 64 \
        --n-samples 32 --seq-len 512 --eval-tokens 8192 --json /tmp/gptq_bench.json

The peer mode (``--peer NAME --peer-config JSON``) is what the subprocesses run; it imports only
the peer's packages, torch, safetensors and the standard library.
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
# peer mode: runs inside the peer's virtual environment
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def _run_gptqmodel(cfg: dict, ids: Any, win: Any, pe: Any) -> dict[str, Any]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM

    qc = QuantizeConfig(
        bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"], desc_act=cfg["desc_act"],
        static_groups=cfg["static_groups"], act_group_aware=False, damp_percent=cfg["damp_percent"],
        true_sequential=True, offload_to_disk=False, mse=0.0, dynamic=pe.gptqmodel_dynamic(cfg),
    )
    # GPTQModel 7.6.0's float32 CPU kernel (TorchFusedLinear) computes wrong outputs, also on the
    # checkpoints GPTQModel writes itself; its half-precision one (TorchAtenLinear) is right
    dtype = getattr(torch, cfg["gptqmodel_dtype"])
    float_ppl = pe.window_perplexity(AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=dtype), win)
    model = GPTQModel.load(cfg["float_dir"], qc, device="cpu", dtype=dtype)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    start = time.perf_counter()
    model.quantize(calib, batch_size=cfg["batch_size"])
    seconds = time.perf_counter() - start
    model.save(cfg["out"] + "/checkpoint")  # evaluated as a user gets it: its own loader on its file
    del model
    quantized = GPTQModel.load(cfg["out"] + "/checkpoint", device="cpu", dtype=dtype)
    types = sorted({type(m).__name__ for n, m in quantized.model.named_modules() if n.endswith("_proj")})
    return {"float_ppl": float_ppl, "ppl": pe.window_perplexity(quantized.model, win), "seconds": seconds,
            "version": gptqmodel.__version__, "module_types": types, "dtype": cfg["gptqmodel_dtype"]}


def _run_llmc(cfg: dict, ids: Any, win: Any, pe: Any) -> dict[str, Any]:
    import torch
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=torch.float32)
    float_ppl = pe.window_perplexity(model, win)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    weights = {"num_bits": cfg["bits"], "type": "int", "symmetric": cfg["sym"]}
    if cfg["group_size"] > 0:
        weights.update(strategy="group", group_size=cfg["group_size"])
    else:
        weights.update(strategy="channel")
    if cfg["desc_act"]:
        weights["actorder"] = "static" if cfg["static_groups"] else "group"
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=pe.llmc_ignore(cfg), dampening_frac=cfg["damp_percent"], block_size=128,
    )
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), batch_size=cfg["batch_size"])
    seconds = time.perf_counter() - start
    types = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")})
    return {"float_ppl": float_ppl, "ppl": pe.window_perplexity(model, win), "seconds": seconds,
            "version": llmcompressor.__version__, "module_types": types, "dtype": "float32"}


def peer_main(name: str, cfg: dict) -> None:
    """Quantize with the peer, evaluate its float and its whole quantized model here."""
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    data = load_file(cfg["tensors"])
    run = {"gptqmodel": _run_gptqmodel, "llm-compressor": _run_llmc}[name]
    res = run(cfg, data["calibration"], data["eval"], _peer_eval())
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    (Path(cfg["out"]) / "result.json").write_text(json.dumps(res))


# ================================================================================================
# bench mode: runs in qcore's environment
# ================================================================================================
def _ppl(model: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    from qcore.eval import perplexity

    return perplexity(model, args.eval_text, tokenizer, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl


def bench_main(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import token_stream, windows
    from qcore.models import load_model, save_float

    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcore_gptq_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    def fresh() -> Any:
        m, t = load_model(args.model)
        return m.eval(), t

    model, tok = fresh()
    float_dir = work / "float"
    if args.peers and not (float_dir / "config.json").is_file():
        save_float(model, float_dir, tok)
    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    win = windows(token_stream(args.eval_text, tok)[0], args.eval_seq_len, args.eval_tokens)
    save_file({"calibration": calib.input_ids.contiguous(), "eval": win.contiguous()},
              str(work / "tensors.safetensors"))
    pe = _peer_eval()

    rows: list[dict[str, Any]] = []
    ppl_float = _ppl(model, tok, args)
    rows.append({"bits": "-", "method": "float", "ppl": ppl_float, "seconds": None})
    print(f"float: ppl {ppl_float:.3f}", flush=True)
    del model

    for bits in args.bits:
        common = {"bits": bits, "group_size": args.group_size, "sym": args.sym}
        m, _ = fresh()
        start = time.perf_counter()
        qcore.quantize(m, "rtn", **common)
        rows.append({"bits": bits, "method": "rtn (qcore)", "ppl": _ppl(m, tok, args),
                     "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
        del m

        for clip in args.mse_clip:
            m, _ = fresh()
            opts = {**common, "desc_act": args.desc_act, "static_groups": args.static_groups,
                    "damp_percent": args.damp_percent, "mse_clip": clip}
            start = time.perf_counter()
            qcore.quantize(m, "gptq", calibration=calib, **opts)
            label = "gptq (qcore, min/max scales as the peers)" if clip >= 1.0 else f"gptq (qcore, mse_clip={clip})"
            rows.append({"bits": bits, "method": label, "ppl": _ppl(m, tok, args),
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
            del m

        for peer in args.peers:
            py = getattr(args, f"{peer.replace('-', '_')}_python") or DEFAULT_PEER_PYTHON[peer]
            out = work / f"{peer}_{bits}"
            cfg = {**common, "desc_act": args.desc_act, "static_groups": args.static_groups,
                   "damp_percent": args.damp_percent, "float_dir": str(float_dir),
                   "tensors": str(work / "tensors.safetensors"), "out": str(out),
                   "batch_size": args.batch_size, "gptqmodel_dtype": args.gptqmodel_dtype}
            env = {**os.environ, "PYTHONPATH": ""}
            start = time.perf_counter()
            proc = subprocess.run([py, __file__, "--peer", peer, "--peer-config", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env, timeout=args.peer_timeout)
            total = time.perf_counter() - start
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                print(f"{peer} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
                rows.append({"bits": bits, "method": peer, "ppl": None, "seconds": None,
                             "error": tail.strip().splitlines()[-1] if tail.strip() else "failed"})
                continue
            res = json.loads((out / "result.json").read_text())
            # a half-precision peer's float row differs from qcore's float32 one by more than rounding
            rtol = pe.FLOAT_MATCH_RTOL if res["dtype"] == "float32" else args.half_float_rtol
            ok, note = pe.float_check(res["float_ppl"], ppl_float, rtol)
            rows.append({"bits": bits, "method": f"{peer} {res['version']} ({res['dtype']})", "ppl": res["ppl"] if ok else float("nan"),
                         "peer_ppl": res["ppl"], "peer_float_ppl": res["float_ppl"], "note": note,
                         "seconds": res["seconds"], "subprocess_seconds": total,
                         "module_types": res["module_types"]})
            print(rows[-1], flush=True)

    print()
    print(f"model {args.model}, group {args.group_size}, sym={args.sym}, desc_act={args.desc_act}, "
          f"static_groups={args.static_groups}, damp={args.damp_percent}; calibration {calib.record['source']} "
          f"{args.n_samples}x{args.seq_len} (seed 0); WikiText-2 perplexity over {args.eval_tokens} tokens")
    print()
    print("| bits | method | perplexity | quantize wall time (s) | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else f"failed: {r.get('error', '')}"
        sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        print(f"| {r['bits']} | {r['method']} | {ppl} | {sec} | {r.get('note', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record, "rows": rows},
                                              indent=1, default=str))


def main() -> None:
    # bench/ holds scripts named like packages (bench/hqq.py): keep them off the import path
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    ap.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--damp-percent", type=float, default=0.01)
    ap.add_argument("--mse-clip", type=float, nargs="+", default=[1.0, 0.8],
                    help="one qcore GPTQ row per value: 1.0 = min/max scales, as the peers use; 0.8 = qcore's "
                         "default clipping search")
    ap.add_argument("--calibration", default="c4", help="calibration source (qcore.data name or file)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="peers' calibration batch size")
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--peers", nargs="*", default=["gptqmodel", "llm-compressor"])
    ap.add_argument("--gptqmodel-python", default=None)
    ap.add_argument("--gptqmodel-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype GPTQModel runs in (its float32 CPU kernel is wrong in 7.6.0)")
    ap.add_argument("--half-float-rtol", type=float, default=0.02,
                    help="tolerance of a half-precision peer's float perplexity against qcore's float32 one")
    ap.add_argument("--llm-compressor-python", default=None)
    ap.add_argument("--peer-timeout", type=int, default=3600)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.peer:
        peer_main(args.peer, json.loads(args.peer_config))
    else:
        bench_main(args)


if __name__ == "__main__":
    main()
