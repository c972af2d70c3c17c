"""Calibration spread over processes with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Under ``torchrun --nproc-per-node N -m qcore quantize ...`` (or any program that initialized a
process group before ``qcore.quantize``) each process takes every N-th calibration window
(:func:`shard`), runs the block pass on its share, and the statistics are combined across the
processes before any method reads them:

* observers (:mod:`qcore.pipeline.observers`) implement ``all_reduce()``: Hessians, means and
  Fisher sums are summed with their token counts, maxima take the maximum, sampled input rows are
  gathered from every process;
* a method's own sums over the calibration data (AWQ's search losses) go through
  ``BlockContext.all_reduce``.

Every process then takes the same decisions on the same combined statistics, so the quantized
model is the single-process one up to the order of floating-point sums; process 0 writes the
checkpoint. Only methods whose ``Capabilities.distributed`` is true run this way; the others, a
gradient pass and streamed runs are refused with the reason.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from qcore.plugin.errors import CalibrationError, ConfigError

if TYPE_CHECKING:
    from torch import Tensor

    from qcore.data import CalibrationData

ReduceOp = Literal["sum", "max"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_distributed() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (NCCL for a CUDA ``device``,
    gloo otherwise), unless one is initialized already; returns ``(rank, world size)``."""
    import torch.distributed as dist

    if launched_distributed() and not dist.is_initialized():
        backend = "nccl" if device is not None and str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def shard(calibration: CalibrationData, rank: int, size: int) -> CalibrationData:
    """This process's share of the windows: every ``size``-th one from ``rank`` (the record is the
    whole set's, so every process writes the same one)."""
    from qcore.data import CalibrationData

    if calibration.n_samples < size:
        raise CalibrationError(f"{calibration.n_samples} calibration windows cannot be shared by {size} processes; "
                               f"use at least {size} windows (n_samples) or fewer processes")
    return CalibrationData(calibration.input_ids[rank::size].contiguous(), dict(calibration.record))


def all_reduce(t: Tensor, op: ReduceOp = "sum") -> Tensor:
    """Combine ``t`` across the processes in place (its sum or maximum) and return it; unchanged in
    one process. A CUDA tensor under gloo is combined through the CPU."""
    import torch.distributed as dist

    if world()[1] == 1:
        return t
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if t.is_cuda and dist.get_backend() == "gloo":
        host = t.cpu()
        dist.all_reduce(host, op=red)
        return t.copy_(host)
    dist.all_reduce(t, op=red)
    return t


def all_reduce_count(n: int) -> int:
    """The sum of an integer count over the processes."""
    import torch

    if world()[1] == 1:
        return n
    return int(all_reduce(torch.tensor([n], dtype=torch.float64)).item())


def all_gather_rows(rows: Tensor) -> list[Tensor]:
    """Every process's ``[n_i, features]`` tensor (``n_i`` may differ), in rank order."""
    import torch
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [rows]
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], dtype=torch.int64))
    longest = max(int(c) for c in counts)
    src = rows.cpu() if dist.get_backend() == "gloo" else rows
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=src.device)
    padded[: rows.shape[0]] = src
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return [o[: int(c)].to(rows.device) for o, c in zip(out, counts)]


def combine_observer(observer: Any, name: str) -> None:
    """Call ``observer.all_reduce()`` when several processes share the calibration windows."""
    if world()[1] == 1:
        return
    reduce = getattr(observer, "all_reduce", None)
    if reduce is None:
        raise ConfigError(f"the observer '{name}' cannot combine its statistics across processes (it has no "
                          "all_reduce()); run this method in one process")
    reduce()


def check_chain(specs: list[Any], gradients: bool, streamed: bool) -> None:
    """Refuse, before any work, what cannot run on several processes."""
    _, size = world()
    if size == 1:
        return
    bad = [s.name for s in specs if not s.capabilities.distributed]
    if bad:
        raise ConfigError(f"method(s) {', '.join(bad)} cannot share the calibration over {size} processes (their "
                          "statistics are not combined across processes); run them in one process (without torchrun)")
    if gradients:
        raise ConfigError("this chain needs a gradient pass, which is not shared across processes; run it in one "
                          "process (without torchrun)")
    if streamed:
        raise ConfigError("streamed runs (--stream / out=) keep one state folder and cannot be shared by several "
                          "processes; run them in one process, or load the model whole under torchrun")
