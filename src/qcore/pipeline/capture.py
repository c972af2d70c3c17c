"""Capturing each decoder block's call arguments with one cheap pass over the calibration data.

Every block's ``forward`` is swapped for a recorder that stores its positional and keyword
arguments (attention masks, position embeddings, ``position_ids``, ``cache_position``...; caches
off with ``use_cache=False``) and passes the hidden states through untouched, so only the
embeddings and the mask/rotary code run; the pass stops at the last block. Block 0's hidden
states are the calibration inputs; every block keeps its own keyword arguments (Gemma-2's
sliding-window and global layers get different masks). Nothing is family-specific.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import ArchitectureError
from qcore.progress import get_logger

if TYPE_CHECKING:
    from qcore.arch.introspect import ModelInfo
    from qcore.data import CalibrationData

log = get_logger("capture")

Inputs = list[tuple[tuple, dict]]


class StopForward(Exception):
    """Cuts a forward pass short once what it was run for is recorded."""


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor inside tuples/lists/dicts moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def hidden_of(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states among a block call's arguments."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ArchitectureError(
        "the first decoder block was called without positional arguments or a 'hidden_states' "
        "keyword; qcore cannot tell which argument is the hidden state. Report the model family"
    )


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor | None) -> tuple[tuple, dict]:
    """A copy of a block call's arguments with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return (), kwargs


def first_tensor(out: Any) -> Tensor:
    """The hidden states of a module's output (blocks and attention modules may return tuples)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ArchitectureError(f"a module returned {type(out).__name__}, not a tensor or tuple")
    return out


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@contextmanager
def swapped_forwards(blocks: list[nn.Module], make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """While inside, block ``i``'s ``forward`` is ``make(i)``."""
    for i, blk in enumerate(blocks):
        blk.forward = make(i)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for blk in blocks:
            if "forward" in blk.__dict__:
                del blk.forward


def _recording(blocks: list[nn.Module], store: list[list[tuple[tuple, dict]]]) -> AbstractContextManager[None]:
    """Swap each block's ``forward`` for a recorder of its arguments (identity on hidden states)."""
    last = len(blocks) - 1

    def make(i: int) -> Callable[..., Any]:
        def recorder(*args: Any, **kwargs: Any) -> Any:
            store[i].append((args, kwargs))
            if i == last:
                raise StopForward
            return hidden_of(args, kwargs)
        return recorder

    return swapped_forwards(blocks, make)


def lm_kwargs(model: nn.Module, input_ids: Tensor) -> dict[str, Any]:
    """Keyword arguments of a plain forward of ``model`` on ``input_ids`` (no cache)."""
    fwd = model.forward
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if accepts(fwd, "attention_mask"):
        kwargs["attention_mask"] = torch.ones_like(input_ids)
    if accepts(fwd, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_inputs(model: nn.Module, info: ModelInfo, calibration: CalibrationData, batch_size: int = 8,
                   store_device: torch.device | None = None) -> tuple[list[Tensor], list[Inputs]]:
    """Hidden states entering block 0 (one tensor per batch) and, per block, its call arguments
    per batch with the hidden states set to ``None`` (filled in block by block)."""
    blocks = [b.module for b in info.blocks]
    n_blocks = len(blocks)
    model_device = module_device(model)
    if model_device.type == "meta":  # a streamed model: its embeddings are read onto the CPU when called
        model_device = torch.device("cpu")
    hidden0: list[Tensor] = []
    templates: list[Inputs] = [[] for _ in range(n_blocks)]
    for batch in calibration.batches(batch_size):
        store: list[list[tuple[tuple, dict]]] = [[] for _ in range(n_blocks)]
        try:
            with _recording(blocks, store):
                model(**lm_kwargs(model, batch.to(model_device)))
        except StopForward:
            pass
        except Exception as exc:
            if not store[0]:
                raise ArchitectureError(
                    f"capturing the inputs of the first block failed ({type(exc).__name__}: {exc}); "
                    "the model's forward must accept input_ids"
                ) from exc
            log.debug("capture pass stopped at block %d (%s); later blocks reuse block 0's arguments",
                      sum(1 for s in store if s), exc)
        if not store[0]:
            raise ArchitectureError(
                f"the model never called its first block ({info.blocks_path}[0]); qcore cannot "
                "capture calibration inputs for this architecture"
            )
        args0, kw0 = store[0][0]
        hidden0.append(to_device(hidden_of(args0, kw0).detach(), store_device))
        for i in range(n_blocks):
            a, k = store[i][0] if store[i] else store[0][0]
            a, k = with_hidden(a, k, None)
            k.pop("use_cache", None)
            if accepts(blocks[i].forward, "use_cache"):
                k["use_cache"] = False
            templates[i].append((a, k))
    return hidden0, templates


def block_inputs(hidden: list[Tensor], template: Inputs, device: torch.device | None) -> Inputs:
    """A block's call arguments per batch with ``hidden`` filled in (moved to ``device``)."""
    return [with_hidden(to_device(a, device), to_device(k, device), h) for h, (a, k) in zip(hidden, template)]
