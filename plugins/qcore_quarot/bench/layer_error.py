#!/usr/bin/env python
"""Where rotation helps or hurts RTN weights: per linear role, the relative output error
``||x (Q(W) - W).T|| / ||x W.T||`` of per-channel RTN on real tokens, in the float model and in
the rotated one (``quarot`` with ``quantize=False``; down_proj's input taken after R4). Also, per
block, the share of tokens whose normalized MLP input is dominated by one channel (a massive
activation) and the MLP-input norm's weight on that channel against its median.

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 .venv/bin/python plugins/qcore_quarot/bench/layer_error.py \\
        --model smollm2-135m --data wikitext2 --tokens 512
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from typing import Any

import torch


def rtn_errors(model: Any, ids: torch.Tensor, bits: int) -> dict[str, float]:
    """Relative output error of RTN on each block linear, on the inputs ``ids`` give it."""
    from qcore.quant import quantize_rtn

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


def massive_channels(model: Any, ids: torch.Tensor) -> list[tuple[int, float, float]]:
    """Per block: (dominant channel, share of tokens where it holds > half of ||x_hat||^2, its
    MLP-input norm weight / the median weight)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    import qcore
    from qcore.eval import token_stream
    from qcore.models import load_model

    base, tok = load_model(args.model)
    ids = token_stream(args.data, tok)[0][: args.tokens].reshape(1, -1)
    rotated = copy.deepcopy(base)
    qcore.quantize(rotated, "quarot", quantize=False)
    plain, rot = rtn_errors(base, ids, args.bits), rtn_errors(rotated, ids, args.bits)
    by_role: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, err in plain.items():
        by_role[name.rsplit(".", 1)[1]].append((err, rot[name]))
    for role, pairs in by_role.items():
        print(f"{role:10s} plain {sum(p for p, _ in pairs) / len(pairs):.3f}  rotated {sum(r for _, r in pairs) / len(pairs):.3f}")
    for i, (channel, share, weight) in enumerate(massive_channels(base, ids)):
        print(f"block {i:2d}: channel {channel:4d} dominates {share:.1%} of tokens; its norm weight is {weight:.2f}x the median")


if __name__ == "__main__":
    main()
