"""Running a model larger than memory forward one block at a time, straight from its files.

:func:`open_lazy` builds the model of a qcore checkpoint (as :func:`qcore.load` builds it: the
serialized modules rebuilt empty) or of a float Hugging Face folder of safetensors files, with
every tensor on the meta device. :meth:`LazyModel.load` reads one module's tensors from the
weight files and assigns them as :func:`qcore.load` does; :meth:`LazyModel.free` puts them back
on meta.

:func:`blockwise_logits` runs windows of token ids through it: the capture pass of the block
engine (:func:`qcore.pipeline.capture.capture_inputs`, with the modules before the blocks read
when called) gives every block's call arguments (attention masks, position embeddings) and the
hidden states entering block 0; each block is then read, runs every batch's hidden states and is
freed; finally the model's own forward runs with its blocks replaced by the finished hidden
states, so the final norm, the LM head and any post-processing (e.g. logit soft-capping) are the
model's. Peak memory: one block, the hidden states of all windows, and the modules outside the
blocks.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import CheckpointError
from qcore.progress import bar

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from qcore.checkpoint.loading import OpenCheckpoint
    from qcore.checkpoint.streaming import InputShards


# -- moving modules between the files and meta ------------------------------------------------------
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the allocation size from which ``malloc`` maps fresh pages."""
LARGE_ALLOCATION = 1 << 20
"""Allocations of this many bytes or more get their own pages in a streamed run (see
:func:`map_large_allocations`)."""


@functools.lru_cache(maxsize=None)
def _libc(name: str) -> Callable[..., int] | None:
    """A glibc function (``malloc_trim``, ``mallopt``), or None (another C library, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name, None)
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc("malloc_trim")


def map_large_allocations() -> None:
    """Have glibc serve every allocation of :data:`LARGE_ALLOCATION` bytes or more (weights,
    Hessians, activations) from pages of its own, returned to the OS when freed. By default glibc
    raises that threshold to 32 MB as it sees large blocks freed and then carves them from its
    heap, where one block's leftovers fragment the next block's space: peak memory then grows with
    depth even with :func:`return_freed_memory` after each block. Process-wide and kept after the
    run; a no-op off glibc."""
    mallopt = _libc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``). Without it the
    freed float weights of each finished block stay in the resident set (the heap keeps them for
    reuse, fragmented), and peak memory grows with depth: measured on a 75-layer model, 2 GB at
    2 layers to 6 GB at 75."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def own_tensors(module: nn.Module) -> list[Tensor]:
    """The parameters and buffers a module holds itself (not its submodules')."""
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def to_meta(module: nn.Module, recurse: bool) -> None:
    """Put a module's parameters and persistent buffers back on meta (computed buffers stay);
    run-time caches (a packed layer's kernel pack, ``release_cache``) are dropped with them."""
    mods = module.modules() if recurse else [module]
    for m in mods:
        release = getattr(m, "release_cache", None)
        if callable(release):
            release()
        for leaf, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for leaf, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and leaf not in m._non_persistent_buffers_set:
                m._buffers[leaf] = torch.empty_like(b, device="meta")


def hook_outer(model: nn.Module, blocks: Sequence[str],
               load: Callable[[nn.Module, str], None]) -> list[RemovableHandle]:
    """Forward pre-hooks that call ``load(module, name)`` on each module outside ``blocks`` holding
    meta tensors of its own, when it is called (the embeddings in a capture pass)."""
    def inside(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in blocks)

    handles = []
    for name, module in model.named_modules():
        if inside(name) or not any(t.device.type == "meta" for t in own_tensors(module)):
            continue

        def pre(m: nn.Module, _args: Any, prefix: str = name) -> None:
            load(m, prefix)
        handles.append(module.register_forward_pre_hook(pre))
    return handles


class LazyModel:
    """A model whose tensors stay on meta until :meth:`load` reads a module's from the weight files."""

    def __init__(self, ckpt: OpenCheckpoint, shards: InputShards, kind: str) -> None:
        self.ckpt = ckpt
        self.shards = shards
        self.kind = kind
        """``"qcore"`` (a qcore checkpoint: tensors as stored) or ``"hf"`` (float, cast to the model's dtypes)."""
        self._layout = {k: (t.dtype, tuple(t.shape)) for k, t in ckpt.model.state_dict().items()}

    @property
    def model(self) -> nn.Module:
        return self.ckpt.model

    @property
    def root(self) -> Path:
        return self.ckpt.root

    def tokenizer(self) -> Any:
        """The tokenizer saved in the folder."""
        if self.kind == "qcore":
            from qcore.checkpoint.loading import load_tokenizer

            return load_tokenizer(self.root)
        from qcore.models import _load_tokenizer, offline

        with offline():
            return _load_tokenizer(self.root, None)

    def load(self, scope: str, recurse: bool = True) -> None:
        """Read the tensors of module ``scope`` (with its submodules when ``recurse``) from the files."""
        from qcore.checkpoint.loading import assign_tensors, in_scope, post_load

        names = self.shards.keys() if self.kind == "qcore" else list(self._layout)
        tied = self.ckpt.tied
        state = {}
        for name in dict.fromkeys([*names, *tied]):
            if not in_scope(name, scope, recurse):
                continue
            kept = tied.get(name)
            if kept is not None and in_scope(kept, scope, recurse):
                continue  # the tie is set once ``kept`` is assigned
            state[name] = self._read(kept or name, name)
        assign_tensors(self.ckpt, state, scope, recurse)
        post_load(self.ckpt, scope, recurse)

    def _read(self, key: str, name: str) -> Tensor:
        if self.kind == "qcore":
            return self.shards.get(key)
        dtype, shape = self._layout[name]
        value = self.shards.get(key, dtype=dtype)
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{self.root}: {key} is {tuple(value.shape)} on disk but {shape} in the model "
                                  "(a Conv1D or fused layout qcore rewrites); it cannot be read block by block: "
                                  "load the model whole")
        return value

    def free(self, scope: str, recurse: bool = True) -> None:
        """Put module ``scope``'s tensors back on meta, dropping run-time caches (kernel packs)."""
        to_meta(self.model.get_submodule(scope), recurse)
        return_freed_memory()

    @contextmanager
    def outer(self, blocks: Sequence[str]) -> Iterator[None]:
        """While inside, the modules outside ``blocks`` are read when called; freed on exit."""
        loaded: list[str] = []

        def load(module: nn.Module, name: str) -> None:
            if any(t.device.type == "meta" for t in own_tensors(module)):
                self.load(name, recurse=False)
                loaded.append(name)

        handles = hook_outer(self.model, blocks, load)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for name in loaded:
                self.free(name, recurse=False)


def open_lazy(src: str | os.PathLike[str]) -> LazyModel:
    """The model of a qcore checkpoint or of a float Hugging Face safetensors folder, on meta."""
    from qcore.checkpoint.loading import OpenCheckpoint, open_checkpoint
    from qcore.checkpoint.streaming import InputShards
    from qcore.models import resolve_model

    kind, path, _ = resolve_model(src)
    if kind == "qcore" and path is not None:
        ckpt = open_checkpoint(path)
        return LazyModel(ckpt, InputShards(ckpt.root), kind)
    if kind != "hf" or path is None:
        raise CheckpointError(f"{src} is a {kind} model; only a qcore checkpoint or a Hugging Face folder of "
                              "safetensors files can be read block by block: evaluate it whole (without "
                              "--stream / perplexity_streamed)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} has no safetensors files, and only those can be read block by block: "
                              "convert it (save_pretrained(..., safe_serialization=True)) or evaluate it whole")
    from qcore.arch.surgery import prepare_model
    from qcore.pipeline.stream import _skeleton, _ties

    model, _ = _skeleton(path, torch.float32)  # the dtype qcore.models.load_model loads in
    prepare_model(model)
    shards = InputShards(path)
    return LazyModel(OpenCheckpoint(model, path, shards.files, _ties(model), {}), shards, kind)


# -- the forward ------------------------------------------------------------------------------------
@contextmanager
def _replaying(blocks: list[nn.Module], outputs: Iterator[Tensor]) -> Iterator[None]:
    """Blocks that pass their input through, the last one returning the next of ``outputs``."""
    from qcore.pipeline.capture import hidden_of, swapped_forwards

    last = len(blocks) - 1

    def make(i: int) -> Callable[..., Tensor]:
        def replay(*args: Any, **kwargs: Any) -> Tensor:
            return next(outputs) if i == last else hidden_of(args, kwargs)
        return replay

    with swapped_forwards(blocks, make):
        yield


@torch.no_grad()
def blockwise_logits(lazy: LazyModel, windows: Tensor, batch_size: int,
                     logits: Callable[[nn.Module, Tensor], Tensor]) -> Iterator[Tensor]:
    """``logits(model, batch)`` for each batch of ``batch_size`` rows of ``windows`` (token ids
    ``[n, seq_len]``), the model run one block at a time (see the module doc)."""
    from qcore.arch.introspect import inspect_model
    from qcore.data import CalibrationData
    from qcore.pipeline.capture import block_inputs, capture_inputs, first_tensor

    map_large_allocations()
    model = lazy.model
    info = inspect_model(model)
    names = [b.name for b in info.blocks]
    data = CalibrationData(windows)
    with lazy.outer(names):
        hidden, templates = capture_inputs(model, info, data, batch_size)
    pbar = bar(len(info.blocks), desc="qcore eval blocks", unit="block")
    try:
        for i, binfo in enumerate(info.blocks):
            lazy.load(binfo.name)
            try:
                hidden = [first_tensor(binfo.module(*a, **k)) for a, k in block_inputs(hidden, templates[i], None)]
            finally:
                lazy.free(binfo.name)
            templates[i] = []
            pbar.update(1)
    finally:
        pbar.close()
    with lazy.outer(names), _replaying([b.module for b in info.blocks], iter(hidden)):
        for batch in data.batches(batch_size):
            yield logits(model, batch)
