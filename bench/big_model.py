"""A model larger than memory, quantized with GPTQ 4-bit g128 through the streaming path.

1. generates a random Llama-architecture checkpoint of ``--size-gb`` GB of bf16 weights on disk
   (width ``--hidden`` x ``--intermediate``, vocabulary 32000, as many layers as the size needs;
   the shape is printed), written one layer at a time in ~1 GB safetensors shards;
2. quantizes it with ``qcore.quantize(DIR, "gptq", out=OUT, bits=4, group_size=128)`` (streamed)
   in a child process, and prints the child's peak RSS (``VmHWM``, plus psutil sampling of its
   RSS), wall time and output size;
3. for the time comparison, quantizes two small models of the same width (``--small-layers`` and
   three times as many layers) that fit in memory, in memory (``load_model`` + ``quantize`` +
   ``save``) and streamed, each in a child process; the in-memory times give a fixed cost and a
   cost per layer, scaled to the big model's layers: that is the reference for the streamed time.

Calibration: ``--n-samples`` random token windows of ``--seq-len`` tokens (random weights, so any
text is as good). The generated checkpoint and the outputs are deleted at the end (``--keep`` keeps them).

    OMP_NUM_THREADS=2 QCORE_PROGRESS=0 flock /work/logs/heavy.lock timeout 900 \\
        .venv/bin/python bench/big_model.py --size-gb 2 --dir /tmp/qcore-big

Measured results are in the README (section "Models larger than memory").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

VOCAB = 32000
SHARD_BYTES = 1 << 30

CHILD = r"""
import json, sys, time
import torch
import qcore
from qcore.data import CalibrationData
src, out, mode, n, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ids = torch.randint(3, 32000, (n, seq), generator=torch.Generator().manual_seed(0))
calib = CalibrationData(ids, {"source": "random tokens", "n_samples": n, "seq_len": seq})
t = time.perf_counter()
if mode == "stream":
    qcore.quantize(src, "gptq", calibration=calib, out=out, bits=4, group_size=128)
else:
    from qcore.models import load_model
    model, _ = load_model(src)
    qcore.quantize(model, "gptq", calibration=calib, bits=4, group_size=128)
    qcore.save(model, out)
seconds = time.perf_counter() - t
# VmHWM: this process's peak resident set (ru_maxrss would keep the forking parent's across exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "maxrss_kb": hwm}))
"""


def cpu_description() -> str:
    """The CPU's model name and its widest matrix/vector extension, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    isa = next((f for f in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags), "no AVX2")
    return f"{name} ({isa})"


def llama_config(hidden: int, intermediate: int, layers: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 128, "head_dim": 128, "vocab_size": VOCAB,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu"}


def layer_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden, hidden),
            "self_attn.v_proj.weight": (hidden, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
            "mlp.down_proj.weight": (hidden, intermediate), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def layers_for(size_gb: float, hidden: int, intermediate: int) -> int:
    per_layer = sum(_numel(s) for s in layer_shapes(hidden, intermediate).values()) * 2
    outer = (2 * VOCAB * hidden + hidden) * 2
    return max(1, round((size_gb * 1e9 - outer) / per_layer))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def generate(folder: Path, hidden: int, intermediate: int, layers: int, seed: int = 0) -> int:
    """Write a random bf16 Llama checkpoint one layer at a time; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(hidden, intermediate, layers), indent=2))
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    files: list[str] = []
    total = 0

    def flush() -> None:
        name = f"part-{len(files):05d}.safetensors"
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in pending})
        pending.clear()

    def add(name: str, shape: tuple[int, ...], norm: bool = False) -> None:
        nonlocal total
        t = torch.ones(shape, dtype=torch.bfloat16) if norm else \
            (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        pending[name] = t
        total += t.nbytes
        if sum(v.nbytes for v in pending.values()) >= SHARD_BYTES:
            flush()

    add("model.embed_tokens.weight", (VOCAB, hidden))
    for i in range(layers):
        for leaf, shape in layer_shapes(hidden, intermediate).items():
            add(f"model.layers.{i}.{leaf}", shape, norm=leaf.endswith("layernorm.weight"))
    add("model.norm.weight", (hidden,), norm=True)
    add("lm_head.weight", (VOCAB, hidden))
    if pending:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def measure(src: Path, out: Path, mode: str, n: int, seq: int) -> dict[str, Any]:
    """Run one quantization in a child process; its time, peak RSS and output size."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), mode, str(n), str(seq)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.2)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 1), "quantize_s": round(res["seconds"], 1),
            "peak_rss_gb": round(res["maxrss_kb"] * 1024 / 1e9, 3), "sampled_rss_gb": round(peak[0] / 1e9, 3),
            "output_gb": round(size / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=8.0, help="bf16 weight bytes of the generated model")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--small-layers", type=int, default=2, help="layers of the in-memory reference model")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dir", default="/tmp/qcore-big", help="work folder (emptied and deleted afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    layers = layers_for(args.size_gb, args.hidden, args.intermediate)
    try:
        t = time.perf_counter()
        big_bytes = generate(work / "big", args.hidden, args.intermediate, layers)
        gen_s = time.perf_counter() - t
        small = (args.small_layers, 3 * args.small_layers)
        for n in small:
            generate(work / f"small{n}", args.hidden, args.intermediate, n)
        print(f"CPU: {cpu_description()}, {os.cpu_count()} cores, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {time.strftime('%Y-%m-%d')}")
        print(f"generated Llama checkpoint: hidden {args.hidden}, intermediate {args.intermediate}, {layers} layers, "
              f"vocab {VOCAB}: {big_bytes / 1e9:.2f} GB bf16 in {gen_s:.0f} s; calibration "
              f"{args.n_samples} x {args.seq_len} tokens; GPTQ 4-bit g128")
        rows = [("big", "stream", layers, measure(work / "big", work / "big-q", "stream", args.n_samples, args.seq_len))]
        for n in small:
            for mode in ("memory", "stream"):
                rows.append((f"small{n}", "in memory" if mode == "memory" else "stream", n,
                             measure(work / f"small{n}", work / f"small{n}-{mode}", mode, args.n_samples,
                                     args.seq_len)))
        print(f"{'model':6} {'path':10} {'layers':>6} {'quantize s':>10} {'s/layer':>8} {'peak RSS GB':>11} "
              f"{'sampled RSS GB':>14} {'output GB':>9}")
        for model, path, n, r in rows:
            print(f"{model:6} {path:10} {n:6d} {r['quantize_s']:10.1f} {r['quantize_s'] / n:8.2f} "
                  f"{r['peak_rss_gb']:11.3f} {r['sampled_rss_gb']:14.3f} {r['output_gb']:9.3f}")
        # in-memory time = fixed + per_layer * layers, from the two small models
        t_a, t_b = rows[1][3]["quantize_s"], rows[3][3]["quantize_s"]
        per_layer = (t_b - t_a) / (small[1] - small[0])
        fixed = t_a - per_layer * small[0]
        scaled = fixed + per_layer * layers
        ratio = rows[0][3]["quantize_s"] / scaled
        print(f"in memory, fitted on {small[0]} and {small[1]} layers: {fixed:.1f} s + {per_layer:.2f} s/layer; "
              f"scaled to {layers} layers: {scaled:.1f} s; streamed / scaled in-memory: {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"layers": layers, "bytes": big_bytes, "time_ratio": ratio,
                                                   "in_memory_fixed_s": fixed, "in_memory_per_layer_s": per_layer,
                                                   "rows": [r for *_, r in rows]}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
