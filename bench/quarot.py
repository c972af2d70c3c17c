#!/usr/bin/env python
"""QuaRot bench: perplexity of float, RTN and GPTQ weights with and without QuaRot's rotations,
then per-token activations (A8, A4) and a 4-bit KV cache, and the per-rotation ablation.

Rows, all evaluated with qcore's perplexity protocol (:func:`qcore.eval.perplexity`) on the same
token windows:

* float;
* W4A16 per-channel RTN: ``quarot`` with ``rotate=False`` (the same RTN, no rotations) and rotated;
* W4A16 GPTQ (``--group-size``): ``gptq`` alone and ``["quarot", "gptq"]``;
* W4A8, W4A4 and W4A4KV4 on those two GPTQ models: as QuaRot's reference does, GPTQ is calibrated
  with float activations and KV cache, and the activation and KV quantization are then added to
  the same weights (``QuantLinear.act``, a ``QKVTransform`` attached to each attention: R3 when
  rotated, KV quantization in both) — the GPTQ models are reused, not recomputed;
* W4A4KV4 in one call, ``qcore.quantize(model, ["quarot", "gptq"], bits=4, a_bits=4, kv_bits=4)``
  (there GPTQ's calibration already sees the quantized activations and KV cache of earlier blocks);
* the ablation at W4A4KV4: R1 only (``r2=False, r4=False``), R1+R2 (``r4=False``), R1+R2+R4
  (KV4 without R3), R1+R2+R4+R3;
* with ``--peers spinquant quip``: llm-compressor's ``SpinQuantModifier`` (R1, R2, R4) and
  ``QuIPModifier`` (input rotations "v"), each followed by its ``GPTQModifier`` at W4A16 and W4A4
  (same weight grid and group size, per-token symmetric activations), run in llm-compressor's own
  virtual environment (``--peer-python``, see bench/requirements-peers.txt) on the same float model
  (saved once), the same calibration windows and the same evaluation windows, scored with qcore's
  formula there (the peers' fake-quantized modules and online rotations cannot be moved into
  qcore's model).

Times: ``qcore.quantize`` wall time per quantizing run, and the rotation's own seconds (quarot's
record ``rotation_seconds``: norm folds, R1/R2/R4 fusion, attaching R3; RTN and GPTQ excluded);
the peers' rotation time is their transform modifier's ``on_calibration_start`` (norm folds,
fusion, online hooks). Evaluation is not timed.

SmolLM2-135M (the numbers in docs/results.md):

    OMP_NUM_THREADS=2 QCORE_PROGRESS=0 .venv/bin/python bench/quarot.py --model smollm2-135m \\
        --group-size 64 --calibration c4 --n-samples 32 --seq-len 512 --eval-text wikitext2 --eval-tokens 8192 \\
        --peers spinquant quip

Where rotation helps or hurts W4 RTN, per linear role (and SmolLM2's massive-activation channels):

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 .venv/bin/python bench/quarot.py --model smollm2-135m --layer-error --tokens 512

stories260K (down_proj reads 172 columns, so per-channel GPTQ; calibration from the second half
of the TinyStories head, evaluation on its first 8,192 tokens, as the plugins' tests):

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 .venv/bin/python bench/quarot.py --model stories260k \\
        --group-size -1 --calibration second-half --n-samples 32 --seq-len 128 --eval-text tinystories \\
        --peers spinquant quip
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PEER_PYTHON = "/work/peers/llmc/bin/python"
"""llm-compressor's own virtual environment (bench/requirements-peers.txt)."""
PEERS: tuple[str, ...] = ("spinquant", "quip")


# ================================================================================================
# peer mode: runs inside llm-compressor's virtual environment (its packages, torch, safetensors)
# ================================================================================================
def _peer_eval() -> Any:
    """bench/peer_eval.py as a namespace (bench/ is kept off sys.path: it holds scripts named like packages)."""
    from runpy import run_path
    from types import SimpleNamespace

    return SimpleNamespace(**run_path(str(Path(__file__).with_name("peer_eval.py"))))


def peer_main(name: str, cfg: dict[str, Any]) -> None:
    """llm-compressor's SpinQuantModifier (R1, R2, R4) or QuIPModifier (input rotations "v"), then
    its GPTQModifier with cfg's scheme (int weights, per-token dynamic int activations), on the
    saved float model and calibration windows; perplexity of its float model, then of its whole
    quantized model, on the given evaluation windows (bench/peer_eval.py). Writes result.json."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = load_file(cfg["calib"])["input_ids"]
    windows = load_file(cfg["eval"])["windows"]
    pe = _peer_eval()
    model = AutoModelForCausalLM.from_pretrained(cfg["float_dir"], dtype=torch.float32)
    float_ppl = pe.window_perplexity(model, windows)
    weights: dict[str, Any] = {"num_bits": cfg["w_bits"], "type": "int", "symmetric": cfg["w_sym"]}
    weights.update(strategy="group", group_size=cfg["group_size"]) if cfg["group_size"] > 0 else \
        weights.update(strategy="channel")
    scheme: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if cfg["a_bits"] < 16:
        scheme["input_activations"] = {"num_bits": cfg["a_bits"], "type": "int", "symmetric": True,
                                       "strategy": "token", "dynamic": True}
    if name == "spinquant":
        transform = SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type=cfg["transform_type"])
    else:
        transform = QuIPModifier(rotations=["v"], transform_type=cfg["transform_type"], ignore=["lm_head"])
    rotation = [0.0]
    apply = type(transform).on_calibration_start  # where both fold norms, fuse and hook their rotations

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return apply(self, *a, **k)
        finally:
            rotation[0] += time.perf_counter() - t0

    type(transform).on_calibration_start = timed
    recipe = [transform, GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                      dampening_frac=0.01, block_size=128)]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), batch_size=1)
    seconds = time.perf_counter() - start
    Path(cfg["out"]).write_text(json.dumps({"ppl": pe.window_perplexity(model, windows), "float_ppl": float_ppl,
                                            "quant_seconds": seconds, "rotation_seconds": rotation[0],
                                            "version": llmcompressor.__version__}))


def run_peer(name: str, cfg: dict[str, Any], python: str, timeout: int) -> dict[str, Any]:
    """``peer_main`` in a subprocess of the peer's Python; ``{"ppl", "quant_seconds", "version"}``
    or ``{"error"}`` (the last line of its output)."""
    import os
    import subprocess

    if not Path(python).is_file():
        return {"error": f"no peer venv at {python} (see bench/requirements-peers.txt)"}
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([python, __file__, "--peer", name, "--peer-config", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()
        print(f"{name} failed (rc {proc.returncode}):\n{tail[-3000:]}", file=sys.stderr, flush=True)
        return {"error": tail.splitlines()[-1] if tail else f"rc {proc.returncode}"}
    return json.loads(Path(cfg["out"]).read_text())


ABLATION: tuple[tuple[str, dict[str, Any]], ...] = (
    ("R1", {"r2": False, "r4": False}),
    ("R1+R2", {"r4": False}),
)
"""Rotation subsets that need their own GPTQ run (R1+R2+R4 is the main rotated model)."""


def _calibration(args: argparse.Namespace, tok: Any) -> Any:
    from qcore.data import get_calibration, read_texts

    if args.calibration == "second-half":  # the second half of the evaluation text (disjoint from it)
        text = "\n\n".join(read_texts(args.eval_text))
        return get_calibration([text[len(text) // 2:]], tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    return get_calibration(args.calibration, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)


def with_act_kv(model: Any, a_bits: int, kv_bits: int, r3: bool, seed: int, a_clip: float | None = None,
                kv_clip: float = 1.0) -> Any:
    """A copy of a weight-quantized ``model`` whose block linears quantize their inputs per token
    at ``a_bits`` (symmetric, clipped at ``a_clip``: None = quarot's default for ``a_bits``) and whose
    attentions carry R3 (when ``r3``) and the ``kv_bits`` KV quantization: what ``quarot`` would
    add, on the same weights."""
    from qcore.arch.introspect import inspect_model
    from qcore.plugin import ActQuant, QuantLinear
    from qcore.quant.attention import attach
    from qcore_quarot.hadamard import hadamard_block
    from qcore_quarot.layout import head_dim
    from qcore_quarot.modules import QKVTransform

    from qcore_quarot.config import QuaRotConfig

    clip = QuaRotConfig.from_options(a_bits=a_bits, a_clip=a_clip).act_clip
    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, QuantLinear):
            module.act = ActQuant(a_bits, dynamic=True, sym=True, clip=clip) if a_bits < 16 else None
    if kv_bits < 16 or r3:
        width = head_dim(None, out.config)
        block, kind = hadamard_block(width, seed)
        shared = block.float() if r3 else None
        for b in inspect_model(out).blocks:
            for name, info in b.linears.items():
                if info.role == "o":
                    attach(out, f"{b.name}.{name.rpartition('.')[0]}",
                           QKVTransform.of(width, shared, kind if r3 else "", kv_bits, -1, kv_clip))
    return out


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    import qcore
    from qcore.eval import perplexity
    from qcore.models import load_model

    torch.manual_seed(0)
    base, tok = load_model(args.model)
    base.eval()
    if getattr(base.config, "quantization_config", None) is not None:  # a GGUF file, dequantized to float on load
        del base.config.quantization_config
    calib = _calibration(args, tok)
    rows: list[dict[str, Any]] = []

    def ppl(model: Any) -> float:
        return perplexity(model, args.eval_text, tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl

    def add(section: str, label: str, model: Any, seconds: float | None = None, rotation: float | None = None) -> None:
        rows.append({"section": section, "row": label, "ppl": ppl(model), "seconds": seconds,
                     "rotation_seconds": rotation})
        print(json.dumps(rows[-1]), flush=True)

    def run(method: Any, **options: Any) -> tuple[Any, float, float | None]:
        model = copy.deepcopy(base)
        extra = {"calibration": calib} if "gptq" in method else {}
        start = time.perf_counter()
        qcore.quantize(model, method, **extra, **options)
        seconds = time.perf_counter() - start
        rec = next((c.get("record", {}) for c in model.qcore_record["chain"] if c["method"] == "quarot"), None)
        return model, seconds, (rec or {}).get("rotation_seconds")

    seed = {"rotation_seed": args.rotation_seed}
    add("float", "float", base)
    if args.only_peers:  # qcore's rows are deterministic: the peers beside an earlier table's run
        return rows + peers(args, base, tok, calib, rows[0]["ppl"])
    for rotate in (False, True):
        model, sec, rot = run("quarot", w_bits=4, group_size=-1, rotate=rotate, **seed)
        add("W4A16 RTN per channel", "rotated" if rotate else "no rotation", model, sec, rot)
        del model
    gptq = {"bits": 4, "group_size": args.group_size}
    plain, sec, _ = run("gptq", **gptq)
    add(f"W4A16 GPTQ g{args.group_size}", "no rotation", plain, sec)
    rotated, sec, rot = run(["quarot", "gptq"], **gptq, **seed)
    add(f"W4A16 GPTQ g{args.group_size}", "rotated (R1+R2+R4)", rotated, sec, rot)
    for a_bits, kv_bits in ((8, 16), (4, 16), (4, 4)):
        section = f"W4A{a_bits}" + (f"KV{kv_bits}" if kv_bits < 16 else "") + " (GPTQ weights reused)"
        add(section, "no rotation", with_act_kv(plain, a_bits, kv_bits, False, args.rotation_seed))
        add(section, "rotated (R1+R2+R4" + ("+R3)" if kv_bits < 16 else ")"),
            with_act_kv(rotated, a_bits, kv_bits, kv_bits < 16, args.rotation_seed))
    del plain
    one, sec, rot = run(["quarot", "gptq"], a_bits=4, kv_bits=4, **gptq, **seed)
    add("W4A4KV4, one qcore.quantize call", "rotated (R1+R2+R4+R3)", one, sec, rot)
    del one
    for label, options in ABLATION:
        model, sec, rot = run(["quarot", "gptq"], **gptq, **options, **seed)
        add("ablation W4A4KV4", label, with_act_kv(model, 4, 4, False, args.rotation_seed), sec, rot)
        del model
    add("ablation W4A4KV4", "R1+R2+R4", with_act_kv(rotated, 4, 4, False, args.rotation_seed))
    add("ablation W4A4KV4", "R1+R2+R4+R3", with_act_kv(rotated, 4, 4, True, args.rotation_seed))
    del rotated
    if args.peers:
        rows += peers(args, base, tok, calib, rows[0]["ppl"])
    return rows


CLIPS_A: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
CLIPS_KV: tuple[float, ...] = (1.0, 0.95, 0.9)


def clip_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Activation and KV clip ratios on one rotated GPTQ model (weights quantized once, with float
    activations, as the table's reused rows): W4A4 at each ``a_clip``, then W4A4KV4 at each
    ``kv_clip`` with the best ``a_clip``."""
    import torch

    import qcore
    from qcore.eval import perplexity
    from qcore.models import load_model

    torch.manual_seed(0)
    base, tok = load_model(args.model)
    base.eval()
    calib = _calibration(args, tok)
    qcore.quantize(base, ["quarot", "gptq"], calibration=calib, bits=4, group_size=args.group_size,
                   rotation_seed=args.rotation_seed)
    rows: list[dict[str, Any]] = []

    def add(label: str, a_clip: float, kv_bits: int, kv_clip: float) -> float:
        model = with_act_kv(base, 4, kv_bits, kv_bits < 16, args.rotation_seed, a_clip, kv_clip)
        ppl = perplexity(model, args.eval_text, tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens).ppl
        rows.append({"section": label, "row": f"a_clip={a_clip} kv_clip={kv_clip}", "ppl": ppl, "seconds": None,
                     "rotation_seconds": None})
        print(json.dumps(rows[-1]), flush=True)
        return ppl

    best = min(CLIPS_A, key=lambda c: add("W4A4 rotated, GPTQ weights", c, 16, 1.0))
    for kv_clip in CLIPS_KV:
        add("W4A4KV4 rotated, GPTQ weights", best, 4, kv_clip)
    return rows


def peers(args: argparse.Namespace, base: Any, tok: Any, calib: Any, float_ppl: float) -> list[dict[str, Any]]:
    """llm-compressor's SpinQuant and QuIP with GPTQ weights at W4A16 and W4A4 (KV16), on the same
    float model, calibration windows and evaluation windows; a row is void (NaN) when the peer's
    float model misses ``float_ppl``."""
    import tempfile

    from safetensors.torch import save_file

    from qcore.eval import token_stream, windows
    from qcore.models import save_float

    work = Path(tempfile.mkdtemp(prefix="qcore_quarot_bench_"))
    save_float(base, work / "float", tok)
    save_file({"input_ids": calib.input_ids.contiguous()}, str(work / "calib.safetensors"))
    ids = token_stream(args.eval_text, tok)[0]
    save_file({"windows": windows(ids, args.eval_seq_len, args.eval_tokens).contiguous()},
              str(work / "eval.safetensors"))
    rows = []
    pe = _peer_eval()
    for name in args.peers:
        for a_bits in (16, 4):
            cfg = {"float_dir": str(work / "float"), "calib": str(work / "calib.safetensors"),
                   "eval": str(work / "eval.safetensors"), "w_bits": 4, "w_sym": False,
                   "group_size": args.group_size, "a_bits": a_bits, "transform_type": args.peer_transform,
                   "out": str(work / f"{name}_{a_bits}.json")}
            res = run_peer(name, cfg, args.peer_python, args.peer_timeout)
            label = f"llm-compressor {res.get('version', '')} {name} ({args.peer_transform}) + GPTQ".replace("  ", " ")
            ok, note = pe.float_check(res["float_ppl"], float_ppl) if "ppl" in res else (False, "")
            rows.append({"section": f"peer W4A{a_bits} GPTQ g{args.group_size}", "row": f"{label}, {note}" if note else label,
                         "ppl": (res["ppl"] if ok else float("nan")) if "ppl" in res else None,
                         "seconds": res.get("quant_seconds"), "rotation_seconds": res.get("rotation_seconds"),
                         "error": res.get("error")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -- where rotation helps or hurts RTN weights (--layer-error) ------------------------------------
def rtn_errors(model: Any, ids: Any, bits: int) -> dict[str, float]:
    """Relative output error of RTN on each block linear, on the inputs ``ids`` give it."""
    import torch

    from qcore.plugin import quantize_rtn

    errors: dict[str, float] = {}

    def measure(module: Any, args: tuple, name: str) -> None:
        x = args[0].reshape(-1, module.in_features)
        transform = getattr(module, "input_transform", None)
        x = transform(x) if transform is not None else x
        w = module.weight.detach().float()
        q = quantize_rtn(w, bits, -1, False).dequantize()
        errors[name] = float((x @ (q - w).T).norm() / (x @ w.T).norm())

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: measure(mod, args, n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return errors


def massive_channels(model: Any, ids: Any) -> list[tuple[int, float, float]]:
    """Per block: (dominant channel, share of tokens where it holds > half of ||x_hat||^2, its
    MLP-input norm weight / the median weight)."""
    import torch

    rows: list[tuple[int, float, float]] = []

    def measure(module: Any, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        share = x.pow(2) / x.pow(2).sum(-1, keepdim=True)
        channel = int(share.mean(0).argmax())
        w = module.weight.detach().float().abs()
        rows.append((channel, float((share[:, channel] > 0.5).float().mean()), float(w[channel] / w.median())))

    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(measure) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return rows


def layer_error(args: argparse.Namespace) -> None:
    """Per linear role, the relative output error ``||x (Q(W) - W).T|| / ||x W.T||`` of
    per-channel RTN on ``--tokens`` real tokens, in the float model and in the rotated one
    (``quarot`` with ``quantize=False``; down_proj's input taken after R4); then, per block, the
    share of tokens whose normalized MLP input is dominated by one channel and the MLP-input
    norm's weight on that channel against its median."""
    from collections import defaultdict

    import qcore
    from qcore.eval import token_stream
    from qcore.models import load_model

    base, tok = load_model(args.model)
    ids = token_stream(args.eval_text, tok)[0][: args.tokens].reshape(1, -1)
    rotated = copy.deepcopy(base)
    qcore.quantize(rotated, "quarot", quantize=False, rotation_seed=args.rotation_seed)
    plain, rot = rtn_errors(base, ids, 4), rtn_errors(rotated, ids, 4)
    by_role: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, err in plain.items():
        by_role[name.rsplit(".", 1)[1]].append((err, rot[name]))
    for role, pairs in by_role.items():
        print(f"{role:10s} plain {sum(p for p, _ in pairs) / len(pairs):.3f}  "
              f"rotated {sum(r for _, r in pairs) / len(pairs):.3f}")
    for i, (channel, share, weight) in enumerate(massive_channels(base, ids)):
        print(f"block {i:2d}: channel {channel:4d} dominates {share:.1%} of tokens; its norm weight is "
              f"{weight:.2f}x the median")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | rotations | perplexity | quantize wall (s) | rotation (s) |", "|---|---|---|---|---|"]
    for r in rows:
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        rot = f"{r['rotation_seconds']:.2f}" if r["rotation_seconds"] is not None else "-"
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") is not None else f"failed: {r.get('error', '')}"
        lines.append(f"| {r['section']} | {r['row']} | {ppl} | {sec} | {rot} |")
    return "\n".join(lines)


def main() -> None:
    here = Path(__file__).resolve().parent  # bench/ holds scripts named like packages: off the path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64, help="GPTQ group size (-1 = per channel)")
    ap.add_argument("--calibration", default="c4", help="qcore.data source, or 'second-half' of --eval-text")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default="wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--rotation-seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--peers", nargs="*", default=[], choices=PEERS,
                    help="llm-compressor peers run in their own venv (--peer-python)")
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    ap.add_argument("--only-peers", action="store_true",
                    help="float and the peers only (qcore's rows of the same command are deterministic)")
    ap.add_argument("--peer-transform", default="random-hadamard", choices=("hadamard", "random-hadamard", "random-matrix"),
                    help="the peers' transform_type: 'hadamard' refuses sizes that are not powers of two; "
                    "'random-matrix' followed by quantization gave broken models on stories260K")
    ap.add_argument("--peer-timeout", type=int, default=3600)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--peer-config", help=argparse.SUPPRESS)
    ap.add_argument("--layer-error", action="store_true", help="instead of the table: per-role W4 RTN output "
                    "error, float vs rotated, on --tokens tokens of --eval-text, and the massive-activation channels")
    ap.add_argument("--tokens", type=int, default=512, help="tokens for --layer-error")
    ap.add_argument("--clip-sweep", action="store_true", help="instead of the table: W4A4 and W4A4KV4 perplexity "
                    "at each activation and KV clip ratio, on one rotated GPTQ model")
    args = ap.parse_args()
    if args.peer:
        peer_main(args.peer, json.loads(args.peer_config))
        return
    if args.layer_error:
        layer_error(args)
        return
    import torch

    start = time.perf_counter()
    rows = clip_sweep(args) if args.clip_sweep else bench(args)
    wall = time.perf_counter() - start
    print()
    print(f"model {args.model}; GPTQ group {args.group_size}; calibration {args.calibration} "
          f"{args.n_samples}x{args.seq_len} (seed 0); {args.eval_text} perplexity over {args.eval_tokens} tokens "
          f"({args.eval_seq_len}-token windows); rotation seed {args.rotation_seed}; torch threads "
          f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}; bench wall {wall:.0f} s")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "wall_seconds": wall}, indent=1))


if __name__ == "__main__":
    main()
