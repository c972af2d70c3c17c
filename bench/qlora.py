"""QLoRA on real weights: fine-tune stories260K's NF4 base on tiny-shakespeare, then deploy.

Measures held-out perplexity (last 10% of tinyshakespeare.txt, cut at a blank line, never
trained on) of: the float model, its NF4 base (QLoRA before training), the fine-tuned adapter
model, the merged float model, and the merged model re-quantized to 4 bits by other qcore
methods (packed qcore checkpoints). Prints a markdown table; ``--json`` writes the numbers.

    OMP_NUM_THREADS=2 .venv/bin/python bench/qlora.py --steps 200 --json bench/qlora.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
# bench/ holds scripts named like packages (hqq.py, gptq.py): keep them from shadowing the real ones.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    p.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--then", nargs="*", default=["rtn", "gptq"], help="methods for merged -> 4-bit")
    p.add_argument("--group-size", type=int, default=-1, help="group size for --then (stories260K: 172 = 4*43)")
    p.add_argument("--out", help="output directory (default: a temporary one)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qcore
    from qcore.data import TEXT_SEPARATOR, read_texts, tokenize_text
    from qcore_qlora.finetune import DEFAULT_HELDOUT_FRACTION, heldout_perplexity, split_heldout
    from qcore_qlora.merge import merge_and_quantize, merge_and_unload_to_float

    if not Path(args.model).is_dir() or not Path(args.data).is_file():
        print(f"needs {args.model} and {args.data} (the development ../shared folder)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    text = TEXT_SEPARATOR.join(read_texts(args.data))
    train_text, heldout, cut = split_heldout(text, DEFAULT_HELDOUT_FRACTION)
    n_heldout = len(tokenize_text(tok, heldout))

    def ppl(m: torch.nn.Module) -> float:
        return heldout_perplexity(m, tok, heldout, args.seq_len)

    rows: list[tuple[str, float, str]] = []
    t0 = time.perf_counter()
    rows.append(("float (original stories260K)", ppl(model), "fp32"))
    qcore.quantize(model, "qlora", r=args.r, alpha=args.alpha)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qcore-qlora-bench-"))
    result = qcore.finetune(model, args.data, tokenizer=tok, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, seq_len=args.seq_len, save_every=max(1, args.steps // 4),
                            output_dir=out, seed=args.seed, resume=False)
    train_s = result.seconds
    rows.append(("NF4 base (QLoRA, step 0)", result.base_perplexity, "NF4 + zero adapter"))
    rows.append((f"NF4 + LoRA after {args.steps} steps", result.final_perplexity, f"NF4 + r={args.r} adapter"))
    merged = merge_and_unload_to_float(model)
    rows.append(("merged float", ppl(merged), "fp32"))
    n_cal = min(128, len(tokenize_text(tok, train_text)) // args.seq_len)
    for method in args.then:
        q = merge_and_quantize(model, method, tokenizer=tok, bits=4, group_size=args.group_size,
                               calibration=[train_text], n_samples=n_cal, seq_len=args.seq_len)
        path = qcore.save(q, out / f"merged-{method}", tokenizer=tok)
        loaded = qcore.load(path)
        rows.append((f"merged + {method} 4-bit (reloaded)", ppl(loaded),
                     f"packed qcore, group {args.group_size}"))
    total_s = time.perf_counter() - t0

    base = result.base_perplexity
    print(f"held-out: last {DEFAULT_HELDOUT_FRACTION:.0%} of {Path(args.data).name} from char {cut} "
          f"({n_heldout} tokens), windows of {args.seq_len}; train: {result.record['n_train_tokens']} tokens, "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len}, lr {args.lr}, r {args.r}, alpha {args.alpha}\n")
    print("| model | held-out ppl | vs NF4 base | weights |")
    print("|---|---|---|---|")
    for name, value, kind in rows:
        print(f"| {name} | {value:.3f} | {value / base - 1:+.1%} | {kind} |")
    print(f"\nfine-tuning took {train_s:.0f} s (incl. 2 evaluations); whole bench {total_s:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(["bench/qlora.py", *(argv if argv is not None else sys.argv[1:])]),
            "rows": [{"model": n, "perplexity": v, "weights": k} for n, v, k in rows],
            "heldout": {"fraction": DEFAULT_HELDOUT_FRACTION, "from_char": cut, "tokens": n_heldout},
            "finetune": result.to_json_dict(), "seconds": total_s,
        }, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
