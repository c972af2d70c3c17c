"""qcore's ONNX export in onnxruntime against qcore's PyTorch model, in one run: perplexity on the
same token windows and greedy decoding speed with the KV cache.

SOURCE is a qcore checkpoint (exported as it is) or a model name / float folder (``load_model``),
quantized here with RTN (``--bits``, ``--group-size``, ``--ignore``). The export is written twice:
as ``qcore export --format onnx`` writes it (MatMulNBits ``accuracy_level`` 0: float32 compute, qcore's
numbers) and with ``accuracy_level`` 4 (onnxruntime quantizes activations to int8 per block: its
fastest CPU path, no longer qcore's numbers); ``--lm-head-bits 8 4`` adds both exports again with a
float LM head quantized at export (``onnx.write(..., lm_head_bits=N)``: symmetric RTN, 8 bits per
channel or 4 bits in blocks of 32, as MatMulNBits; the embedding still reads the float table).
Perplexity: non-overlapping ``--seq-len`` windows of ``--data`` (``qcore.eval``'s protocol);
onnxruntime's logits come from one prefill per window batch.
Decoding: ``--new-tokens`` greedy tokens after a fixed prompt, prompt prefill included (as
bench/decode.py), median of ``--rounds``; onnxruntime runs the loop here (numpy in and out, the
presents fed back as the past), qcore ``model.generate``.

``--genai-python PY`` (an environment with onnxruntime-genai and its builder's dependencies, torch
and transformers) adds onnxruntime-genai's own int4 export of the float model (``PY -m
onnxruntime_genai.models.builder -i FLOAT_DIR -o OUT -p int4 -e cpu``: RTN, symmetric, block 32,
lm_head quantized too, accuracy_level 4), evaluated by the same loop; ``--float-dir`` names the float
folder when SOURCE is a checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_runtime.py ../shared/models/stories260K \\
        --ignore '*.mlp.down_proj' --genai-python /tmp/genai-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qcore  # noqa: E402
from qcore.eval import format_table, perplexity, token_stream, window_nll, windows  # noqa: E402
from qcore.formats import onnx as onnx_format  # noqa: E402
from qcore.models import load_model  # noqa: E402
from qcore.testing import TINYSTORIES_TXT  # noqa: E402

PROMPT = "Once upon a time, in a small town by the sea, there lived"
EVAL_BATCH = 4
FAST_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level of the second export (int8 activations per block)."""
GENAI_BUILDER = "onnxruntime_genai.models.builder"


@dataclass
class OrtModel:
    """An onnxruntime session of a decoder with onnxruntime-genai's input and output names."""

    session: Any
    past_names: list[str]
    past_shape: tuple[int, int]
    """``(kv_heads, head_dim)`` of each past tensor."""
    present_names: list[str]

    @classmethod
    def open(cls, folder: Path, threads: int) -> OrtModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(folder / onnx_format.MODEL_FILE), options, providers=["CPUExecutionProvider"])
        pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        presents = [p.name.replace("past_key_values.", "present.") for p in pasts]
        genai = json.loads((folder / onnx_format.GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
        return cls(sess, [p.name for p in pasts], (int(pasts[0].shape[1]), int(genai["head_size"])), presents)

    def step(self, ids: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(logits, presents)`` of ``ids`` [batch, seq] after ``past`` (empty when None)."""
        batch, seq = ids.shape
        if past is None:
            past = [np.zeros((batch, *self.past_shape[:1], 0, self.past_shape[1]), np.float32)] * len(self.past_names)
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past[0].shape[2] + seq), np.int64), **dict(zip(self.past_names, past))}
        out = self.session.run([onnx_format.LOGITS, *self.present_names], feeds)
        return out[0], out[1:]


def ort_perplexity(model: OrtModel, win: torch.Tensor) -> float:
    """Perplexity over ``win`` (summed next-token NLL of every window, as ``qcore.eval``)."""
    total = 0.0
    for batch in win.split(EVAL_BATCH):
        logits, _ = model.step(batch.numpy(), None)
        total += float(window_nll(torch.from_numpy(logits), batch).double().sum())
    return float(np.exp(total / (win.shape[0] * (win.shape[1] - 1))))


def ort_decode(model: OrtModel, ids: np.ndarray, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds to prefill ``ids`` and decode ``new_tokens`` greedy tokens; the tokens."""
    start = time.perf_counter()
    logits, past = model.step(ids, None)
    tokens: list[int] = []
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
        logits, past = model.step(np.array([[token]], np.int64), past)
    return time.perf_counter() - start, tokens


@torch.no_grad()
def qcore_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=model.config.eos_token_id)
    return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()


def load_source(args: argparse.Namespace) -> tuple[nn.Module, Any, str, Path | None]:
    """``(quantized model, tokenizer, description, float folder or None)``."""
    path = Path(args.source)
    config = path / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        from qcore.checkpoint import load_tokenizer

        return qcore.load(path), load_tokenizer(path), f"checkpoint {path.name}", args.float_dir
    model, tok = load_model(args.source)
    qcore.quantize(model, "rtn", bits=args.bits, group_size=args.group_size, sym=args.sym,
                   ignore=args.ignore or None)
    desc = f"{path.name or args.source} rtn w{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'}"
    return model, tok, desc, args.float_dir or (path if path.is_dir() else None)


def genai_export(python: str, float_dir: Path, out: Path) -> str:
    """Run onnxruntime-genai's builder (int4, CPU) on ``float_dir``; '' or why it failed."""
    cmd = [python, "-m", GENAI_BUILDER, "-i", str(float_dir), "-o", str(out), "-p", "int4", "-e", "cpu",
           "-c", str(out.parent / "genai-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1][:200]


def measure(name: str, run: Any, ppl: float, ids: Any, args: argparse.Namespace, tok: Any,
            ref_ppl: float) -> dict[str, Any]:
    """One table row: perplexity against qcore's, and decode tokens/s (median over rounds)."""
    run(ids, 4)  # warm-up
    times, tokens = [], []
    for _ in range(args.rounds):
        sec, tokens = run(ids, args.new_tokens)
        times.append(sec)
    return {"runtime": name, "perplexity": round(ppl, 5), "vs qcore": f"{(ppl / ref_ppl - 1) * 100:+.3f}%",
            "tokens/s": round(args.new_tokens / statistics.median(times), 1),
            "first tokens": tok.decode(tokens[:16]).replace("\n", " ")[:40]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="qcore checkpoint, or a model name / float folder (quantized here with RTN)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--ignore", nargs="*", default=[], help="layer patterns left in float (e.g. '*.mlp.down_proj')")
    ap.add_argument("--data", default=str(TINYSTORIES_TXT), help="evaluation text file")
    ap.add_argument("--max-chars", type=int, default=60_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-head-bits", type=int, nargs="*", default=[], choices=onnx_format.LM_HEAD_BITS,
                    help="also export with a float LM head quantized to these bits (MatMulNBits), e.g. 8 4")
    ap.add_argument("--genai-python", help="python of an environment with onnxruntime-genai (adds its builder's int4)")
    ap.add_argument("--float-dir", type=Path, help="the float model folder for --genai-python, when SOURCE is a checkpoint")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, desc, float_dir = load_source(args)
    text = Path(args.data).read_text()[: args.max_chars]
    ids, _, _ = token_stream([text], tok)
    win = windows(ids, args.seq_len)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    ref_ppl = perplexity(model, win, seq_len=args.seq_len).ppl
    rows = [measure("qcore (PyTorch)", lambda i, n: qcore_decode(model, i, n), ref_ppl, prompt, args, tok, ref_ppl)]
    notes = []
    with tempfile.TemporaryDirectory(prefix="qcore-onnx-bench-") as tmp:
        exports: list[tuple[str, int, int | None]] = []
        for head_bits in [None, *args.lm_head_bits]:
            head = "" if head_bits is None else f", lm_head int{head_bits}"
            exports += [(f"onnxruntime (qcore export{head})", onnx_format.ACCURACY_LEVEL, head_bits),
                        (f"onnxruntime (qcore export, accuracy_level {FAST_ACCURACY_LEVEL}{head})",
                         FAST_ACCURACY_LEVEL, head_bits)]
        exact_level = onnx_format.ACCURACY_LEVEL
        for i, (name, level, head_bits) in enumerate(exports):
            setattr(onnx_format, "ACCURACY_LEVEL", level)
            if head_bits is None:
                out = qcore.export(model, Path(tmp) / f"qcore-{i}", "onnx", tokenizer=tok)
            else:
                out = Path(tmp) / f"qcore-{i}"
                onnx_format.write(model, out, tok, lm_head_bits=head_bits)
            setattr(onnx_format, "ACCURACY_LEVEL", exact_level)
            ort_model = OrtModel.open(out, args.threads)
            rows.append(measure(name, lambda i, n, m=ort_model: ort_decode(m, i.numpy(), n),
                                ort_perplexity(ort_model, win), prompt, args, tok, ref_ppl))
        if args.genai_python and float_dir is None:
            notes.append("onnxruntime-genai builder: skipped (SOURCE is a checkpoint: pass --float-dir)")
        elif args.genai_python:
            out = Path(tmp) / "genai-int4"
            failed = genai_export(args.genai_python, float_dir, out)
            if failed:
                notes.append(f"onnxruntime-genai builder failed: {failed}")
            else:
                try:
                    genai = OrtModel.open(out, args.threads)
                    rows.append(measure("onnxruntime (genai builder int4)",
                                        lambda i, n: ort_decode(genai, i.numpy(), n), ort_perplexity(genai, win),
                                        prompt, args, tok, ref_ppl))
                except Exception as exc:  # noqa: BLE001 - report the peer's failure in the table's notes
                    notes.append(f"onnxruntime-genai builder's model does not run: {str(exc).strip()[-200:]}")
    import onnxruntime as ort

    print(f"{desc}; torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s); "
          f"perplexity over {win.shape[0]} x {args.seq_len} tokens of {Path(args.data).name}; decode: prompt "
          f"{prompt.shape[1]} tokens + {args.new_tokens} new, median of {args.rounds}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(format_table(rows))
    for note in notes:
        print(note)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
