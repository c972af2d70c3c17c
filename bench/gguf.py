#!/usr/bin/env python
"""GGUF bench: qcore's RTN / GPTQ / AWQ GGUF exports beside llama.cpp's own quantization, in llama.cpp.

On SmolLM2-135M (default) and the first ``--eval-tokens`` WikiText-2 tokens in ``--eval-seq-len``
windows, in one run:

1. the float model's perplexity under qcore's protocol (:mod:`qcore.eval`);
2. the float model written as an F32 GGUF (``qcore export`` refuses a model without quantized
   layers, so this bench writes it with the helpers of :mod:`qcore.formats.gguf`: the same
   hyperparameters, tensor names, q/k permutation and tokenizer as qcore's export, every tensor
   in float), then quantized by llama.cpp itself (``llama_cpp.llama_model_quantize``) to Q4_0 and
   Q4_1, without calibration. Two llama.cpp variants per type: its defaults (the tied
   embedding / output tensor becomes Q6_K by llama.cpp's rule for ``output.weight``; Q8_0 on
   SmolLM2, whose 576 columns are no multiple of the K-quants' 256), and
   ``output_tensor_type = token_embedding_type = F32``, which gives the same tensor types and the
   same file size as qcore's export (qcore keeps the float32 embeddings of the model). The same
   four again with an importance matrix (``--no-imatrix`` leaves them out): the bindings take one
   (``llama_model_quantize_params.imatrix``, an array of ``llama_model_imatrix_data``) but do not
   compute one, so this bench computes llama-imatrix's statistic in torch (per input column of
   each linear, the mean of x^2 over the float model's activations on the same calibration qcore
   uses);
3. qcore's RTN, GPTQ and AWQ at ``--bits`` 4, ``--group-size`` 32, symmetric (exported as Q4_0)
   and asymmetric (Q4_1), calibration c4 8x512 (seed 0), each exported with ``qcore.export``;
4. for every GGUF file, in llama.cpp (llama-cpp-python, its own environment, a subprocess of this
   script with ``--peer-config``): perplexity from llama.cpp's logits on the same token windows
   (``Llama(logits_all=True, n_ctx=512, n_batch=512)``, reset per window, NLL by a float64
   log-softmax, exp(summed NLL / predicted tokens), every window's first token not predicted),
   the file size, and greedy decode tokens/s (bench/llamacpp_decode.py's measurement, all files
   in one process with their rounds interleaved, so that other load on the machine falls on every
   file alike: median and best round); for qcore's models also
   qcore's own perplexity of the same quantized model and the gap (llama.cpp quantizes
   activations to 8 bits per 32 in its Q4 / Q8 matmuls and keeps an F16 KV cache by default, so
   a small gap is expected);
5. a markdown table, and ``--json``.

Usage:

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/gguf.py --json /tmp/gguf_bench.json

``--peer-config JSON`` is the mode run in llama.cpp's environment (standard library, numpy and
llama_cpp only).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like packages (gguf.py is this file, hqq.py ...): keep it off the path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

DEFAULT_LLAMACPP_PYTHON = "/work/peers/llamacpp/bin/python"
GAP_LIMIT = 0.01
"""llama.cpp's perplexity of a qcore file should be qcore's within this relative gap."""


# ================================================================================================
# peer mode (llama.cpp's environment: standard library, numpy, llama_cpp)
# ================================================================================================
def _peer_quantize(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['type']}")
    params.nthread = int(job.get("threads", 2))
    if job.get("float_embeddings"):
        params.output_tensor_type = llama_cpp.GGML_TYPE_F32
        params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    keep = []
    if job.get("imatrix"):  # {GGUF tensor name: per-input-column mean of x^2}, a null-named entry last
        import ctypes

        imat = json.loads(Path(job["imatrix"]).read_text())
        entries = (llama_cpp.llama_model_imatrix_data * (len(imat) + 1))()
        for i, (name, values) in enumerate(imat.items()):
            buf = (ctypes.c_float * len(values))(*values)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            entries[i].size = len(values)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"seconds": time.perf_counter() - start}


def _peer_perplexity(job: dict[str, Any], rows: list[list[int]]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=job["file"], logits_all=True, n_ctx=job["seq_len"], n_batch=job["seq_len"],
                          n_threads=job["threads"], verbose=False, seed=0, **job.get("llama_kwargs", {}))
    total, count = 0.0, 0
    start = time.perf_counter()
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)[:-1]
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        target = np.asarray(ids[1:])
        total += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    seconds = time.perf_counter() - start
    llm.close()
    return {"ppl": math.exp(total / count), "nll_sum": total, "predicted": count, "seconds": seconds,
            "version": llama_cpp.__version__}


def _peer_decode(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """bench/llamacpp_decode.py's measurement (its prompt, greedy, prefill included, warm-up first)
    on every file, the rounds interleaved across files (round r of every file, then round r + 1),
    so that load from other processes on the machine falls on all files alike; each file's median
    and best round."""
    import statistics
    from runpy import run_path

    import llama_cpp

    prompt = run_path(str(Path(__file__).with_name("llamacpp_decode.py")))["PROMPT"]
    models, times, out = {}, {}, {}
    for f in cfg["files"]:
        models[f] = llama_cpp.Llama(model_path=f, n_threads=cfg["threads"], n_ctx=512, verbose=False, seed=0)
        models[f](prompt, max_tokens=4, temperature=0.0)  # warm-up
        times[f] = []
    for _ in range(cfg["rounds"]):
        for f, llm in models.items():
            llm.reset()
            start = time.perf_counter()
            res = llm(prompt, max_tokens=cfg["new_tokens"], temperature=0.0, top_k=1)
            times[f].append(time.perf_counter() - start)
            out[f] = (res["usage"]["completion_tokens"], res["choices"][0]["text"][:40])
    for llm in models.values():
        llm.close()
    return [{"file": f, "new_tokens": out[f][0], "first_tokens": out[f][1], "round_s": times[f],
             "tokens_per_s": out[f][0] / statistics.median(times[f]), "best_tokens_per_s": out[f][0] / min(times[f])}
            for f in cfg["files"]]


def peer_main(cfg: dict[str, Any]) -> None:
    """Run the jobs of ``cfg`` (quantize / perplexity) and write one JSON of results."""
    if cfg.get("decode"):
        Path(cfg["out"]).write_text(json.dumps(_peer_decode(cfg["decode"])))
        return
    rows = json.loads(Path(cfg["windows"]).read_text()) if cfg.get("windows") else []
    out = []
    for job in cfg["jobs"]:
        try:
            res = _peer_quantize(job) if job["kind"] == "quantize" else _peer_perplexity(job, rows)
        except Exception as exc:  # reported in the table, not hidden
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.append({**job, **res})
        print(json.dumps(out[-1]), flush=True)
    Path(cfg["out"]).write_text(json.dumps(out))


# ================================================================================================
# bench mode (qcore's environment)
# ================================================================================================
def write_float_gguf(model: Any, tokenizer: Any, target: Path) -> None:
    """``model`` (float) as an F32 GGUF, with :mod:`qcore.formats.gguf`'s helpers (its export
    refuses a model without quantized layers): same metadata, names and layouts as qcore's files."""
    import gguf
    import torch

    import qcore
    from qcore.formats import gguf as g

    arch = g.ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    g.write_hparams(writer, model)
    writer.add_quantized_by(f"qcore {qcore.__version__} (float, bench/gguf.py)")
    state = model.state_dict()
    for key in g._tensor_keys(model, {}):
        name = g.gguf_name(model, key)
        if name is None:
            raise RuntimeError(f"no GGUF name for {key}")
        tensor = state[key].detach().float()
        order = g.qk_permutation(model, key, tensor.shape[0])
        if order is not None:
            tensor = tensor[order]
        if key.endswith("norm.weight") and arch.norm_shift:
            tensor = tensor + arch.norm_shift
        writer.add_tensor(name, tensor.to(torch.float32).contiguous().numpy())
    factors = g.rope_freqs(model)
    if factors is not None:
        writer.add_tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors.numpy())
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    g.write_vocab(writer, g.tokenizer_vocab(tokenizer, int(model.config.vocab_size)))
    g.write_file(writer)


def importance_matrix(model: Any, calib: Any, target: Path) -> None:
    """llama-imatrix's statistic, computed in torch: per input column of every linear (the tied
    lm_head left out), the mean of x^2 over the calibration tokens, keyed by GGUF tensor name
    (q/k rows are permuted in the file, their input columns are not)."""
    import torch

    from qcore.formats import gguf as g

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            def hook(mod: Any, inp: Any, out: Any, name: str = name) -> None:
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for row in calib.input_ids:
                model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    target.write_text(json.dumps({g.gguf_name(model, f"{n}.weight"): (sums[n] / counts[n]).float().tolist()
                                  for n in sums}))


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """``{GGML type name: tensor count}`` of a GGUF file (gguf's reader)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def run_peer(py: str, cfg: dict[str, Any], work: Path, tag: str, timeout: int) -> list[dict[str, Any]]:
    """Run ``cfg`` in llama.cpp's environment; its results (a job that failed carries ``error``)."""
    cfg = {**cfg, "out": str(work / f"{tag}.result.json")}
    proc = subprocess.run([py, __file__, "--peer-config", json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=timeout)
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
        err = (lines[-1] if lines else f"rc {proc.returncode}")[:300]
        return [{**job, "error": err} for job in cfg.get("jobs", [{}])]
    return json.loads(Path(cfg["out"]).read_text())


def bench_main(args: argparse.Namespace) -> None:
    import torch

    import qcore
    from qcore.data import get_calibration
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model

    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcore_gguf_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    py = args.llamacpp_python
    t_start = time.perf_counter()

    model, tok = load_model(args.model)
    model.eval()

    def ppl(m: Any) -> float:
        return perplexity(m, args.eval_text, tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl

    win = windows(token_stream(args.eval_text, tok)[0], args.eval_seq_len, args.eval_tokens)
    (work / "windows.json").write_text(json.dumps(win.tolist()))
    rows: list[dict[str, Any]] = []
    float_ppl = ppl(model)
    float_file = work / "float-f32.gguf"
    write_float_gguf(model, tok, float_file)
    rows.append({"method": "float", "source": "qcore model, F32 GGUF (bench writer)", "file": str(float_file),
                 "qcore_ppl": float_ppl})
    print(rows[-1], flush=True)
    calib = get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    if not args.no_imatrix:
        importance_matrix(model, calib, work / "imatrix.json")
    del model

    # llama.cpp's own quantization of the float file
    jobs = []
    for imatrix in (False,) if args.no_imatrix else (False, True):
        for qtype in args.llamacpp_types:
            for float_emb in (False, True):
                dst = work / f"llamacpp-{qtype.lower()}{'-imatrix' if imatrix else ''}{'-f32emb' if float_emb else ''}.gguf"
                jobs.append({"kind": "quantize", "src": str(float_file), "dst": str(dst), "type": qtype,
                             "float_embeddings": float_emb, "threads": args.threads,
                             "imatrix": str(work / "imatrix.json") if imatrix else None})
    for res in run_peer(py, {"jobs": jobs}, work, "quantize", args.peer_timeout):
        label = ("llama.cpp quantize" + (" + imatrix" if res.get("imatrix") else "")
                 + (" (embeddings F32)" if res["float_embeddings"] else " (defaults)"))
        row = {"method": label, "source": "llama.cpp", "file": res["dst"], "type": res["type"],
               "quantize_s": res.get("seconds")}
        if "error" in res:
            row["error"] = res["error"]
        rows.append(row)
        print(row, flush=True)

    # qcore's methods
    for sym in args.sym:
        for method in args.methods:
            label = f"qcore {method}"
            qtype = "Q4_0" if sym else "Q4_1"
            row = {"method": label, "source": "qcore", "sym": sym, "type": qtype}
            try:
                m = load_model(args.model)[0].eval()
                start = time.perf_counter()
                qcore.quantize(m, method, calibration=None if method == "rtn" else calib,
                               bits=args.bits, group_size=args.group_size, sym=sym)
                row["quantize_s"] = time.perf_counter() - start
                out = work / f"qcore-{method}-{'sym' if sym else 'asym'}.gguf"
                qcore.export(m, out, "gguf", tokenizer=tok)
                row["file"] = str(out)
                row["qcore_ppl"] = ppl(m)
                del m
            except Exception as exc:  # reported in the table, not hidden
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(row, flush=True)

    # every file in llama.cpp: perplexity (one process), then decode speed (one process per file)
    files = [r for r in rows if "file" in r and "error" not in r]
    jobs = [{"kind": "perplexity", "file": r["file"], "seq_len": args.eval_seq_len, "threads": args.threads,
             "llama_kwargs": ({"type_k": 0, "type_v": 0} if args.kv_f32 else {})} for r in files]
    results = run_peer(py, {"jobs": jobs, "windows": str(work / "windows.json")}, work, "perplexity",
                       args.peer_timeout)
    for r, res in zip(files, results):
        if "error" in res:
            r["error"] = "llama.cpp perplexity: " + res["error"]
            continue
        r["llamacpp_ppl"] = res["ppl"]
        r["llamacpp_eval_s"] = res["seconds"]
        r["llamacpp_version"] = res["version"]
        r["bytes"] = Path(r["file"]).stat().st_size
        r["tensor_types"] = gguf_tensor_types(Path(r["file"]))
        if r.get("qcore_ppl"):
            r["gap_pct"] = 100.0 * (r["llamacpp_ppl"] / r["qcore_ppl"] - 1.0)
    load_before = os.getloadavg()
    dec = {"files": [r["file"] for r in files], "threads": args.threads, "rounds": args.rounds,
           "new_tokens": args.new_tokens}
    speeds = run_peer(py, {"decode": dec}, work, "decode", args.peer_timeout)
    load_after = os.getloadavg()
    by_file = {d.get("file"): d for d in speeds}
    for r in files:
        d = by_file.get(r["file"], speeds[0] if speeds else {"error": "no result"})
        if "error" in d:
            r["decode_error"] = d["error"]
        else:
            r.update({"decode_tok_s": d["tokens_per_s"], "decode_best_tok_s": d["best_tokens_per_s"],
                      "decode_round_s": d["round_s"], "decode_text": d["first_tokens"]})
        print({k: r.get(k) for k in ("method", "type", "llamacpp_ppl", "qcore_ppl", "decode_tok_s",
                                     "decode_best_tok_s")}, flush=True)

    print()
    print(f"model {args.model}; {args.eval_text}, first {win.numel()} tokens in {win.shape[0]} windows of "
          f"{args.eval_seq_len}; qcore W{args.bits} g{args.group_size}, calibration {calib.record.get('source')} "
          f"{args.n_samples}x{args.seq_len} (seed 0); llama.cpp {results[0].get('version', '?') if results else '?'} "
          f"(llama-cpp-python), {args.threads} threads, KV cache {'F32' if args.kv_f32 else 'F16 (default)'}; "
          f"decode: {args.new_tokens} greedy tokens, median (best) of {args.rounds} rounds interleaved across files, "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print()
    print("| method | GGUF type | tensor types | file MB | llama.cpp ppl | qcore ppl | gap % | decode tok/s (best) |")
    print("|---|---|---|---|---|---|---|---|")

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r.get('type', 'F32')} | - | - | did not run: {r['error']} | "
                  f"{f(r.get('qcore_ppl'), '.3f')} | - | - |")
            continue
        types = ", ".join(f"{n} {t}" for t, n in sorted(r.get("tensor_types", {}).items()))
        gap = f(r.get("gap_pct"), "+.2f")
        if isinstance(r.get("gap_pct"), float) and r.get("source") == "qcore" and abs(r["gap_pct"]) > 100 * GAP_LIMIT:
            gap += " (>1%)"
        print(f"| {r['method']}{' sym' if r.get('sym') is True else ' asym' if r.get('sym') is False else ''} | "
              f"{r.get('type', 'F32')} | {types} | {f(r.get('bytes', 0) / 1e6 if r.get('bytes') else None, '.2f')} | "
              f"{f(r.get('llamacpp_ppl'), '.3f')} | {f(r.get('qcore_ppl'), '.3f')} | {gap} | "
              f"{f(r.get('decode_tok_s'), '.1f')} ({f(r.get('decode_best_tok_s'), '.1f')}){' (' + r['decode_error'] + ')' if 'decode_error' in r else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib.record,
                                               "eval_tokens": int(win.numel()),
                                               "load_avg_decode": [load_before, load_after], "rows": rows}, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    ap.add_argument("--sym", nargs="+", type=lambda s: s.lower() in ("1", "true", "sym", "yes"),
                    default=[True, False], help="true (Q4_0) and/or false (Q4_1)")
    ap.add_argument("--llamacpp-types", nargs="+", default=["Q4_0", "Q4_1"])
    ap.add_argument("--no-imatrix", action="store_true", help="leave out llama.cpp's importance-matrix rows")
    ap.add_argument("--calibration", default="c4")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (perplexity, decode, quantize)")
    ap.add_argument("--kv-f32", action="store_true", help="llama.cpp F32 KV cache (default: its F16 one)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llamacpp-python", default=DEFAULT_LLAMACPP_PYTHON)
    ap.add_argument("--peer-timeout", type=int, default=1800)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.peer_config:
        peer_main(json.loads(args.peer_config))
    else:
        bench_main(args)


if __name__ == "__main__":
    main()
