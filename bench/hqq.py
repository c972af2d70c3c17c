#!/usr/bin/env python
"""HQQ bench: float, RTN and qcore's HQQ against the reference ``hqq`` package (0.2.8).

Everything is evaluated here with qcore's own perplexity protocol (:mod:`qcore.eval`) on the
WikiText-2 raw test text. The reference runs in a subprocess with its own virtual environment's
Python (``--hqq-python``, see bench/requirements-peers.txt): it loads the same float model (saved
once here as a Hugging Face folder), quantizes it with ``AutoHQQHFModel.quantize_model`` and
``BaseQuantizeConfig(nbits, group_size)`` (its defaults: axis=1, zero point rounded at the start
at 4 bits only) on the CPU in float32, and evaluates its whole quantized model (its ``HQQLinear``
layers as hqq runs them) in its own process on the evaluation windows computed here
(bench/peer_eval.py), after its float model, whose perplexity must reproduce qcore's float row
(the row is void otherwise). Wall times: the peer's ``quantize_model`` call and qcore's ``qcore.quantize``
call, each timed around that call only (model loading and evaluation are not timed).

Usage (SmolLM2-135M, the numbers in docs/results.md):

    OMP_NUM_THREADS=2 QCORE_PROGRESS=0 .venv/bin/python bench/hqq.py --bits 3 4 2 --group-size 64 \
        --eval-tokens 16384 --json /tmp/hqq_bench.json

The peer mode (``--peer-config JSON``) is what the subprocess runs; it imports only hqq, torch,
transformers, safetensors and the standard library.
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

DEFAULT_HQQ_PYTHON = "/work/peers/hqq/bin/python"


# ================================================================================================
# peer mode: runs inside the hqq virtual environment
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def _hqq_tags(model: Any, qc: dict, ignore: list[str]) -> dict:
    """hqq's per-tag config: every block linear's tag (``self_attn.q_proj``...) except those whose
    modules the bench keeps float (hqq leaves a tag it is not given unquantized)."""
    import re

    import torch

    if not ignore:
        return qc
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    tags = {".".join(n.split(".")[-2:]) for n in names}
    skipped = {".".join(n.split(".")[-2:]) for n in names if any(re.match(r, n) for r in ignore)}
    return {t: qc for t in sorted(tags - skipped)}


def peer_main(cfg: dict) -> None:
    """Quantize with hqq; evaluate the float model, then the whole quantized one, here."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    pe = _peer_eval()
    torch.set_num_threads(int(cfg["threads"]))
    win = load_file(cfg["windows"])["eval"]
    model = AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=torch.float32)
    model.eval()
    float_ppl = pe.window_perplexity(model, win)
    qc = BaseQuantizeConfig(nbits=cfg["bits"], group_size=cfg["group_size"], axis=1)
    start = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=_hqq_tags(model, qc, pe.ignore_regexes(cfg)),
                                  compute_dtype=torch.float32, device="cpu")
    seconds = time.perf_counter() - start
    n_linears = sum(isinstance(m, HQQLinear) for m in model.modules())
    info = {"seconds": seconds, "version": getattr(hqq, "__version__", "?"), "n_linears": n_linears,
            "float_ppl": float_ppl, "ppl": pe.window_perplexity(model, win),
            "config": {k: v for k, v in qc["weight_quant_params"].items() if isinstance(v, (int, float, bool, str))}}
    Path(cfg["out"]).write_text(json.dumps(info))


# ================================================================================================
# bench mode: runs in qcore's environment
# ================================================================================================
def _ppl(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[float, int]:
    from qcore.eval import perplexity

    res = perplexity(model, args.eval_text, tokenizer, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    return res.ppl, res.n_predicted




def _run_peer(args: argparse.Namespace, float_dir: Path, tmp: Path, bits: int) -> dict[str, Any]:
    out = tmp / f"hqq_peer_{bits}.json"
    cfg = {"float_dir": str(float_dir), "bits": bits, "group_size": args.group_size, "out": str(out),
           "windows": str(tmp / "windows.safetensors"), "threads": int(os.environ.get("OMP_NUM_THREADS", "2"))}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([args.hqq_python, __file__, "--peer-config", json.dumps(cfg)], env=env,
                          capture_output=True, text=True, timeout=args.peer_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"hqq peer failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _parse_variant(spec: str) -> dict[str, Any]:
    """``"round_zero=true,lp_norm=0.5"`` -> options for ``qcore.quantize`` (JSON values)."""
    opts: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        opts[key.strip()] = json.loads(value.strip())
    return opts


def bench_main(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    import qcore
    from qcore.eval import token_stream, windows
    from qcore.models import load_model, save_float

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows: list[dict[str, Any]] = []
    model, tok = load_model(args.model)
    ppl, n_pred = _ppl(model, tok, args)
    rows.append({"bits": 32, "method": "float", "ppl": ppl, "seconds": None})
    print(f"float: ppl {ppl:.3f} over {n_pred} predicted tokens", flush=True)

    with tempfile.TemporaryDirectory(prefix="qcore_hqq_bench_") as tmpdir:
        tmp = Path(tmpdir)
        float_dir = tmp / "float"
        if not args.no_peer:
            save_float(model, float_dir)
            win = windows(token_stream(args.eval_text, tok)[0], args.eval_seq_len, args.eval_tokens)
            save_file({"eval": win.contiguous()}, str(tmp / "windows.safetensors"))
        del model
        pe = _peer_eval()

        for bits in args.bits:
            variants: list[tuple[str, str, dict[str, Any]]] = [("rtn", "rtn", {}), ("hqq", "qcore hqq", {})]
            if bits <= 2:
                variants.append(("hqq", "qcore hqq, optimize_scale=False (paper)", {"optimize_scale": False}))
            for spec in args.variant:
                opts = _parse_variant(spec)
                variants.append(("hqq", f"qcore hqq, {spec}", opts))
            for method, label, opts in variants:
                m, _ = load_model(args.model)
                if args.ignore:
                    opts = {**opts, "ignore": args.ignore}
                start = time.perf_counter()
                qcore.quantize(m, method, bits=bits, group_size=args.group_size, **opts)
                seconds = time.perf_counter() - start
                inner = m.qcore_record["chain"][-1].get("record", {}).get("seconds")
                ppl, _ = _ppl(m, tok, args)
                rows.append({"bits": bits, "method": label, "ppl": ppl, "seconds": seconds, "method_seconds": inner})
                print(f"{bits}-bit {label}: ppl {ppl:.3f}, quantize {seconds:.2f} s "
                      f"(of which the method's own per-block work: {inner} s)", flush=True)
                del m
            if args.no_peer:
                continue
            info = _run_peer(args, float_dir, tmp, bits)
            ok, note = pe.float_check(info["float_ppl"], rows[0]["ppl"])
            label = f"hqq {info['version']} (reference)"
            rows.append({"bits": bits, "method": label, "ppl": info["ppl"] if ok else float("nan"),
                         "seconds": info["seconds"], "peer_ppl": info["ppl"], "peer_float_ppl": info["float_ppl"],
                         "note": note, "peer_config": info["config"], "n_linears": info["n_linears"]})
            print(f"{bits}-bit {label}: ppl {info['ppl']:.3f} ({note}), quantize {info['seconds']:.2f} s "
                  f"({info['n_linears']} linears)", flush=True)

    print()
    print(f"{args.model}, group size {args.group_size}, WikiText-2 raw test: {n_pred} predicted tokens "
          f"(first {args.eval_tokens} tokens, windows of {args.eval_seq_len}), "
          f"{os.environ.get('OMP_NUM_THREADS', '2')} CPU threads")
    print()
    print("| bits | method | perplexity | quantize wall time (s) | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"| {r['bits'] if r['bits'] != 32 else 'fp32'} | {r['method']} | {r['ppl']:.3f} | {secs} | "
              f"{r.get('note', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "group_size": args.group_size,
                                               "eval_tokens": n_pred, "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-text", default=None, help="default: ../shared/data/wikitext2_raw_test.txt")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--hqq-python", default=DEFAULT_HQQ_PYTHON, help="python of the venv holding hqq==0.2.8")
    ap.add_argument("--no-peer", action="store_true", help="skip the reference hqq package")
    ap.add_argument("--peer-timeout", type=int, default=3600)
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra qcore hqq row with these options, e.g. round_zero=true,optimize_scale=true")
    ap.add_argument("--ignore", nargs="*", default=[], help="module patterns every method keeps in float")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.peer_config:
        peer_main(json.loads(args.peer_config))
        return
    if args.eval_text is None:
        args.eval_text = str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2_raw_test.txt")
    if not Path(args.eval_text).is_file():
        raise SystemExit(f"no eval text at {args.eval_text}; pass --eval-text FILE")
    if not args.no_peer and not Path(args.hqq_python).is_file():
        raise SystemExit(f"no python at {args.hqq_python}: install the peer (bench/requirements-peers.txt) "
                         "or pass --no-peer")
    bench_main(args)


if __name__ == "__main__":
    # this file is named hqq.py: drop its folder from sys.path, so that `import hqq` (the peer) and
    # transformers' probe for an installed hqq find the package, not this script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _here]
    main()
