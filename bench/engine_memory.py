"""Peak memory of a calibration run vs model depth: the engine keeps one block's activations.

Two measures, both on CPU and independent of the allocator's caching:

* ``peak_alloc_mb``: the peak of bytes held by tensors created during ``run_chain`` (a
  ``TorchDispatchMode`` that adds each new storage's size when an op creates it and subtracts it
  when the storage is freed). It includes activations, Hessians and temporaries, not the weights;
* ``live_at_block_mb``: bytes of all live non-weight tensors (found through ``gc``) when each
  block's ``process_block`` starts, maximum over blocks.

The workload per block is GPTQ's collection step: the Hessian of every linear. For comparison,
``full_forward_mb`` is the peak of one plain forward with ``output_hidden_states=True`` (what a
naive "run everything, keep every block's activations" approach holds), which grows with depth.

    OMP_NUM_THREADS=1 QCORE_PROGRESS=0 .venv/bin/python bench/engine_memory.py [--json out.json]

Measured (CPU, torch 2.13, tiny llama hidden 128, 16 windows x 128 tokens, batch 16):

| depth | weights_mb | peak_alloc_mb | live_at_block_mb | full_forward_mb | one_block_hidden_mb |
|------:|-----------:|--------------:|-----------------:|----------------:|--------------------:|
|     2 |      1.252 |         10.42 |            2.048 |           12.03 |                   1 |
|     4 |      2.379 |         10.42 |            2.048 |           16.03 |                   1 |
|     8 |      4.633 |         10.42 |            2.048 |           24.03 |                   1 |

The engine's peak does not change with depth; the plain forward's grows by one block's hidden
states (plus temporaries) per layer.
"""
from __future__ import annotations

import argparse
import gc
import json
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qcore.data import CalibrationData
from qcore.pipeline.engine import BlockContext, run_chain
from qcore.eval import format_table
from qcore.plugin import BaseQuantizer, Capabilities, MethodSpec, QuantConfig
from qcore.tiny import tiny_model

MB = 2**20


class PeakTracker(TorchDispatchMode):
    """Peak bytes of storages created by ops under this mode and still alive."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # weights are not activations: ops that return views of them must not count them
        self.exclude = {id(t.untyped_storage()) for t in list(model.parameters()) + list(model.buffers())}
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and key not in self.exclude and st.nbytes():
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


def live_nonweight_bytes(model: nn.Module) -> int:
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    total = 0
    gc.collect()
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not isinstance(obj, nn.Parameter):
            st = obj.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in owned and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


class HessianProbe(BaseQuantizer):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(QuantConfig(), MethodSpec("hessian-probe", "collects Hessians", QuantConfig, "none:none",
                                                   Capabilities(kind="transform")))
        self.model = model
        self.live: list[int] = []

    def process_block(self, block: BlockContext) -> None:
        self.live.append(live_nonweight_bytes(self.model))
        block.observe(block.quantizable(), "hessian")


def measure(depth: int, n: int, seq: int, hidden: int) -> dict[str, Any]:
    model = tiny_model("llama", num_hidden_layers=depth, hidden_size=hidden, intermediate_size=2 * hidden,
                       head_dim=hidden // 4, max_position_embeddings=max(128, seq))
    ids = torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), PeakTracker(model) as tr:
        model(input_ids=ids, output_hidden_states=True)
    full = tr.peak
    probe = HessianProbe(model)
    with PeakTracker(model) as tr:
        run_chain(model, [probe], CalibrationData(ids, {}), batch_size=n)
    return {"depth": depth, "weights_mb": weights / MB, "peak_alloc_mb": tr.peak / MB,
            "live_at_block_mb": max(probe.live) / MB, "full_forward_mb": full / MB,
            "one_block_hidden_mb": n * seq * hidden * 4 / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--n", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [measure(int(d), args.n, args.seq, args.hidden) for d in args.depths.split(",")]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
