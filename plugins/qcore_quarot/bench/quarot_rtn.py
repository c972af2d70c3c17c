#!/usr/bin/env python
"""QuaRot bench: perplexity of float and of RTN weights with per-token activations, rotated
(``quarot``) and not (``quarot`` with ``rotate=False``: the same quantization, no rotations).

Weights: per-channel RTN at ``w_bits`` (``--group-size`` for groups); activations: dynamic
per-token symmetric at ``a_bits`` (16 = float). Every row is evaluated with qcore's perplexity
protocol (``qcore.eval.perplexity``) on the same token windows; times are the
``qcore.quantize`` calls.

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 .venv/bin/python plugins/qcore_quarot/bench/quarot_rtn.py \\
        --model smollm2-135m --data wikitext2 --eval-tokens 4096 --configs 4:16 4:8 4:4 8:4
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any


def parse_config(text: str) -> tuple[int, int]:
    """``"4:8"`` -> ``(w_bits, a_bits)``."""
    w, a = text.split(":")
    return int(w), int(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2", help="anything qcore.eval.perplexity takes")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=["4:16", "4:8", "4:4"], help="w_bits:a_bits")
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--rotation-seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import qcore
    from qcore.eval import perplexity
    from qcore.models import load_model

    base, tok = load_model(args.model)

    def ppl(model: Any) -> float:
        return perplexity(model, args.data, tok, seq_len=args.seq_len, max_tokens=args.eval_tokens).ppl

    rows: list[dict[str, Any]] = [{"w_bits": 16, "a_bits": 16, "rotate": None, "ppl": ppl(base), "seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for w_bits, a_bits in map(parse_config, args.configs):
        for rotate in (False, True):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            qcore.quantize(model, "quarot", w_bits=w_bits, a_bits=a_bits, group_size=args.group_size,
                           rotate=rotate, rotation_seed=args.rotation_seed)
            seconds = time.perf_counter() - start
            rows.append({"w_bits": w_bits, "a_bits": a_bits, "rotate": rotate, "ppl": ppl(model),
                         "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
            del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
