"""Which kernel path each quantized layer takes at a batch size (``qcore info DIR --kernels``).

Backends that choose per call (``int4_native``: its kernel, the AMX kernel, or dequantize + a
dense matmul, measured per CPU and shape on first use) answer through
:meth:`qcore.quant.linear.QuantLinear.kernel_path`; layers of one shape and format share an entry.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from qcore.quant.linear import QuantLinear

ROWS: tuple[int, ...] = (1, 8, 32, 256, 2048)
"""Activation row counts shown by default (decode, small and large batches, a long prefill)."""


def kernel_paths(model: nn.Module, rows: tuple[int, ...] = ROWS) -> list[dict[str, Any]]:
    """One entry per distinct (out, in, bits, group) among the model's quantized layers: how many
    layers share it and the path a forward of each row count in ``rows`` takes on the layers'
    device (measuring it where the backend has not yet)."""
    groups: dict[tuple[int, int, int, int], list[QuantLinear]] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            key = (module.out_features, module.in_features, module.bits, module.group_size)
            groups.setdefault(key, []).append(module)
    out = []
    for (n, k, bits, group), layers in sorted(groups.items()):
        first = layers[0]
        out.append({"shape": f"{n}x{k}", "bits": bits, "group_size": group, "layers": len(layers),
                    "paths": {m: first.kernel_path(m) for m in rows}})
    return out


def format_kernel_paths(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows (header first) for :func:`kernel_paths`' entries: the backend once, then its
    path at each row count (``kernel``, ``amx``, ``bf16``, ...)."""
    rows = sorted({m for e in entries for m in e["paths"]})
    head = ["out x in", "bits", "group", "layers", "backend", *(f"{m} rows" for m in rows)]
    body = []
    for e in entries:
        backends = {p.partition(":")[0] for p in e["paths"].values()}
        backend = backends.pop() if len(backends) == 1 else "mixed"
        cells = [e["paths"][m].partition(":")[2] or "-" if backend != "mixed" else e["paths"][m] for m in rows]
        body.append([e["shape"], str(e["bits"]), str(e["group_size"]), str(e["layers"]), backend, *cells])
    return [head, *body]
