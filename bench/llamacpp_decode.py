"""Greedy decoding speed of a GGUF file in llama.cpp (llama-cpp-python), in its own environment.

Run by bench/dashboard_speed.py with the ``llamacpp`` peer environment's interpreter; prints one
JSON line: tokens/s (median over rounds, prompt prefill included, as bench/decode.py), the
version, and the first tokens' text. Imports only the standard library and llama_cpp.

    .peers/llamacpp/bin/python bench/llamacpp_decode.py FILE.gguf --new-tokens 128 --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPT = "Once upon a time, in a small town by the sea, there lived"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_ctx=512, verbose=False, seed=0)
    times, text = [], ""
    llm(PROMPT, max_tokens=4, temperature=0.0)  # warm-up
    for _ in range(args.rounds):
        llm.reset()
        start = time.perf_counter()
        out = llm(PROMPT, max_tokens=args.new_tokens, temperature=0.0, top_k=1)
        times.append(time.perf_counter() - start)
        text = out["choices"][0]["text"]
        generated = out["usage"]["completion_tokens"]
    print(json.dumps({"tokens_per_s": generated / statistics.median(times), "new_tokens": generated,
                      "version": llama_cpp.__version__, "first_tokens": text[:40]}))


if __name__ == "__main__":
    main()
