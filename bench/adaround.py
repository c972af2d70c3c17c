#!/usr/bin/env python
"""AdaRound bench: float, RTN, qcore's GPTQ and AdaRound, and Intel's AutoRound, in one run.

Every model is evaluated whole on the same WikiText-2 (or other) token windows with qcore's
perplexity formula (summed next-token NLL over all windows / predicted tokens, exponentiated).
AutoRound runs in a subprocess with its own virtual environment's Python (``--autoround-python``,
see bench/requirements-peers.txt) on the same float model (saved once as a Hugging Face folder),
the same calibration token ids and the same evaluation windows (both saved as safetensors); it
quantizes only linears whose both sizes are multiples of 32 (its rule), so a run where it kept
other linears float than ``--ignore`` does is void (stories260K's MLP is 172 wide: use
``--ignore '*.mlp.*'`` there, for every method); it
evaluates its own quantized model in its process (AutoRound leaves the quantized-dequantized
weights in the model after ``quantize()``) and first its float model, which must reproduce
qcore's float perplexity (checked: the comparison is void otherwise). Wall times are the
quantization call only (``qcore.quantize`` / ``AutoRound.quantize``).

Usage (the numbers in docs/results.md):

    OMP_NUM_THREADS=2 .venv/bin/python bench/adaround.py --model stories260k --bits 3 --group-size 32 \
        --ignore '*.mlp.*' --n-samples 32 --seq-len 128 --eval-seq-len 512 --eval-tokens 8192
    OMP_NUM_THREADS=2 .venv/bin/python bench/adaround.py --model smollm2-135m --bits 2 3 4 --group-size 64 \
        --n-samples 32 --seq-len 512 --eval-tokens 8192

The peer mode (``--peer autoround --peer-config JSON``) is what the subprocess runs; it imports
only auto-round, torch, transformers, safetensors and the standard library.
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

# bench/hqq.py would shadow the hqq package (transformers probes it): drop this folder from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DEFAULT_AUTOROUND_PYTHON = "/work/peers/autoround/bin/python"
STORIES = "stories260k"


# ================================================================================================
# peer mode: runs inside AutoRound's virtual environment
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def _on_grid(w: Any, bits: int, group_size: int) -> bool:
    """Whether every group of ``group_size`` weights along the input holds at most 2**bits values."""
    if group_size <= 0 or w.shape[1] % group_size:
        rows = w.reshape(w.shape[0], -1)
    else:
        rows = w.reshape(-1, group_size)
    s = rows.float().sort(dim=1).values
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
    return bool(distinct.max() <= 2 ** bits)


def run_peer(cfg: dict) -> dict:
    """Quantize with AutoRound, evaluate float and quantized in this process."""
    import auto_round
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg["threads"])
    data = load_file(cfg["tensors"])
    calib, win = data["calibration"], data["eval"]
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    pe = _peer_eval()
    float_ppl = pe.window_perplexity(model, win)
    batches = [calib[i:i + cfg["batch_size"]] for i in range(0, len(calib), cfg["batch_size"])]
    layer_config = {name: {"bits": 16} for name in cfg["float_layers"]}
    start = time.perf_counter()
    ar = AutoRound(model, tok, bits=cfg["bits"], group_size=cfg["group_size"], sym=False, dataset=batches,
                   iters=cfg["iters"], nsamples=len(calib), seqlen=calib.shape[1], batch_size=cfg["batch_size"],
                   device_map="cpu", layer_config=layer_config or None)
    out = ar.quantize()
    seconds = time.perf_counter() - start
    qmodel = out[0] if isinstance(out, tuple) else ar.model
    # a linear AutoRound left float has more distinct values in some group than the bit width allows
    # (comparing with the float weights does not tell: AutoRound may round every weight's dtype)
    unchanged = sorted(n for n, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear)
                       and not _on_grid(m.weight.detach(), cfg["bits"], cfg["group_size"]))
    return {"float_ppl": float_ppl, "ppl": pe.window_perplexity(qmodel, win), "seconds": seconds,
            "unchanged": unchanged, "version": getattr(auto_round, "__version__", "?"), "dtype": "float32"}


# ================================================================================================
# main mode
# ================================================================================================
def _float_layers(model: Any, patterns: list[str]) -> list[str]:
    """The block linears that ``patterns`` keep float (the LM head is float for every method)."""
    from fnmatch import fnmatch

    import torch

    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(fnmatch(n, p) for p in patterns)]


def _peer_row(res: dict, bits: int, base: float, float_layers: list[str]) -> dict:
    """AutoRound's row: void when its float model misses qcore's perplexity or when it kept
    other linears float than the ones every method keeps float."""
    ok, note = _peer_eval().float_check(res["float_ppl"], base)
    notes = [note]
    extra = sorted(set(n for n in res["unchanged"] if ".layers." in n) - set(float_layers))
    if extra:
        ok = False
        notes.append(f"void: it kept {len(extra)} more linears float, e.g. {extra[0]}")
    return {"method": "autoround", "bits": bits, "ppl": res["ppl"] if ok else float("nan"),
            "seconds": res["seconds"], "note": "; ".join(notes)}


def _run_autoround(args: argparse.Namespace, model_dir: Path, tensors: Path, bits: int,
                   float_layers: list[str]) -> dict:
    python = args.autoround_python
    if not Path(python).exists():
        return {"error": f"no AutoRound venv at {python} (see bench/requirements-peers.txt)"}
    cfg = {"model_dir": str(model_dir), "tensors": str(tensors), "bits": bits, "group_size": args.group_size,
           "iters": args.autoround_iters, "batch_size": args.autoround_batch, "threads": args.threads,
           "float_layers": float_layers}
    proc = subprocess.run([python, __file__, "--peer", "autoround", "--peer-config", json.dumps(cfg)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        return {"error": f"AutoRound failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    return json.loads(last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help=f"a qcore model name or {STORIES!r}")
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ignore", nargs="*", default=[])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration", default=None, help="calibration text (default: c4, stories: TinyStories)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=None, help="evaluation window (default: --seq-len)")
    ap.add_argument("--adaround", nargs="+", default=["{}"],
                    help="AdaRound option sets to run, each a JSON object ({}: the defaults)")
    ap.add_argument("--autoround-python", default=DEFAULT_AUTOROUND_PYTHON)
    ap.add_argument("--autoround-iters", type=int, default=200, help="AutoRound iterations per block (its default)")
    ap.add_argument("--autoround-batch", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peer-config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        print(json.dumps(run_peer(json.loads(args.peer_config))))
        return

    import torch
    from safetensors.torch import save_file

    import qcore
    from qcore.data import get_calibration, read_texts
    from qcore.eval import format_table, perplexity, token_stream, windows
    from qcore.models import load_model, save_float
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    torch.set_num_threads(args.threads)
    stories = args.model == STORIES
    source = str(STORIES_DIR) if stories else args.model
    model, tok = load_model(source)
    if stories:
        text = TINYSTORIES_TXT.read_text(encoding="utf-8")
        calib_texts, eval_data = [text[len(text) // 2:]], TINYSTORIES_TXT
    else:
        calib_texts, eval_data = read_texts(args.calibration or "c4"), "wikitext2"
    calib = get_calibration(calib_texts, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    eval_len = args.eval_seq_len or args.seq_len
    win = windows(token_stream(eval_data, tok)[0], eval_len, args.eval_tokens)
    ppl = lambda m: perplexity(m, win, seq_len=eval_len).ppl  # noqa: E731
    rows: list[dict[str, Any]] = [{"method": "float", "bits": 16, "ppl": ppl(model), "seconds": 0.0}]
    base = rows[0]["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_float(model, Path(tmp) / "float", tok)
        tensors = Path(tmp) / "tensors.safetensors"
        save_file({"calibration": calib.input_ids.contiguous(), "eval": win.contiguous()}, str(tensors))
        float_layers = _float_layers(model, args.ignore)
        for bits in args.bits:
            runs: list[tuple[str, str, dict]] = [("rtn", "rtn", {}), ("gptq", "gptq", {"calibration": calib})]
            for options in args.adaround:
                extra = json.loads(options)
                label = "adaround" + (f" {options}" if extra else "")
                runs.append((label, "adaround", {"calibration": calib, **extra}))
            for label, method, opts in runs:
                m, _ = load_model(source)
                start = time.perf_counter()
                qcore.quantize(m, method, bits=bits, group_size=args.group_size, ignore=args.ignore, **opts)
                rows.append({"method": label, "bits": bits, "ppl": ppl(m), "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
            if not args.no_peer:
                res = _run_autoround(args, model_dir, tensors, bits, float_layers)
                if "error" in res:
                    rows.append({"method": "autoround", "bits": bits, "ppl": float("nan"), "seconds": float("nan"),
                                 "note": res["error"]})
                else:
                    rows.append(_peer_row(res, bits, base, float_layers))
                print(rows[-1], flush=True)
    for r in rows:
        r["increase"] = r["ppl"] - base
    print(f"\n{args.model}, group {args.group_size}, calibration {args.n_samples}x{args.seq_len}, "
          f"evaluation {win.numel()} tokens in {eval_len}-token windows; CPU threads {args.threads}\n")
    print(format_table(rows, ["method", "bits", "ppl", "increase", "seconds", "note"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
