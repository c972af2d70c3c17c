"""Quantizing a model larger than memory, straight from its safetensors files, resumably.

:func:`quantize_streaming` (``qcore.quantize(DIR, method, out=OUT)``, ``qcore quantize DIR --stream
--out OUT``) builds the model from ``config.json`` with its parameters on the meta device
(:mod:`qcore.checkpoint.skeleton`). The modules that run before the first block (embeddings) are
read from the shards when the capture pass calls them and freed after it; each block is read when
its turn comes, quantized by the block engine, written to the state folder and put back on meta.
Peak memory is about one block's float weights, the calibration activations and the embeddings,
whatever the depth. The checkpoint is then assembled into the atomic temporary folder tensor by
tensor (the float tensors outside blocks, such as the LM head, are read from the input only then)
and renamed into place: its weight files equal, byte for byte, those of an in-memory run of the
same options (``load_model`` + ``quantize`` + ``save``).

Resume: the state folder ``.<OUT>.qcore-partial`` beside the output holds the finished blocks, the
next block's input activations and ``state.json`` (the number of finished blocks, the record and
the methods' own JSON state, and a fingerprint of the options, the model files and the calibration
tokens). After ``kill -9`` or Ctrl-C, rerunning the same command continues after the last finished
block and gives the same checkpoint; a run with other options, model or data refuses to resume and
says what differs (``restart=True``, ``--restart``, starts over). A lock in the folder keeps two
processes from writing one state; the folder is deleted once the checkpoint is in place.

Refused in streaming (with the reason): methods whose quantizer defines ``prepare`` or ``finalize``
(they may need the whole model, e.g. QuaRot's rotations), gradient passes, size budgets, and weights
whose on-disk shape differs from the model's modules (GPT-2's Conv1D layout).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.checkpoint.atomic import LOCK_FILE, PARTIAL_INFIX, atomic_dir, atomic_file, check_target, write_json
from qcore.pipeline.blockwise import hook_outer, map_large_allocations, return_freed_memory, to_meta
from qcore.plugin.errors import CheckpointError, CompatibilityError, ConfigError, NonFiniteError
from qcore.progress import get_logger

if TYPE_CHECKING:
    from qcore.arch.introspect import BlockInfo
    from qcore.checkpoint.streaming import InputShards
    from qcore.pipeline.engine import RunContext
    from qcore.plugin.protocol import Propagation, Quantizer

log = get_logger("stream")

STATE_FILE = "state.json"
STATE_VERSION = 1
BLOCK_PART = "block-{index:05d}.safetensors"
HIDDEN_FILE = "hidden-{index:05d}.safetensors"
_QUANTIZER_FIXED = ("config", "spec")
"""Quantizer attributes rebuilt from the options, not kept in the state."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a streamed run; the message says how to resume."""


# -- the entry point ---------------------------------------------------------------------------------
def quantize_streaming(src: str | os.PathLike[str], method: str | Sequence[str], *, out: str | os.PathLike[str],
                       config: Any = None, calibration: Any = None, tokenizer: Any = None, n_samples: int = 128,
                       seq_len: int | None = None, seed: int = 0, propagate: Propagation | None = None,
                       device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                       overwrite: bool = False, restart: bool = False, max_shard_size: int | str = "2GB",
                       batch_size: int = 8, **options: Any) -> Path:
    """Quantize the safetensors checkpoint folder ``src`` block by block into the qcore checkpoint
    ``out`` without loading the model whole; returns the checkpoint's path (see the module doc).

    ``dtype``: the float dtype the blocks are computed in (float32, as ``qcore.models.load_model``
    loads). ``restart``: discard the state of an interrupted run instead of resuming it.
    """
    from qcore.checkpoint.saving import parse_size
    from qcore.pipeline import validate
    from qcore.pipeline.api import _attach_record, _calibration
    from qcore.pipeline.budget import split_budget
    from qcore.pipeline.chain import resolve_chain

    root = _source_dir(src)
    target = check_target(out, overwrite, (root,))
    validate.check_run_options(n_samples, seq_len, seed)
    validate.check_device(device)
    max_bytes = parse_size(max_shard_size)
    if split_budget(options) is not None:
        raise ConfigError("a size budget (budget_bits/budget_bytes) measures every layer of the whole model first; "
                          "streaming cannot: quantize in memory, or give the bits per layer with bits=...")
    chain = resolve_chain(method, config, options)
    chain.raise_if_failed()
    _refuse_whole_model(chain.specs)

    from qcore.checkpoint.streaming import InputShards

    map_large_allocations()
    shards = InputShards(root)
    model, tok = _skeleton(root, dtype)
    from qcore.compat import check_chain

    check_chain(model, chain).raise_if_failed()
    tied = _ties(model)
    calib = None
    if any(s.capabilities.needs_calibration for s in chain.specs):
        calib = _calibration(model, calibration, tokenizer if tokenizer is not None else tok, n_samples,
                             seq_len, seed, chain.names)
    quantizers = [spec.load_quantizer()(cfg, spec) for spec, cfg in zip(chain.specs, chain.ready_configs())]
    from qcore.pipeline.engine import _chain_entry, combine_needs, run_chain

    if combine_needs(quantizers, propagate).gradients:
        raise CompatibilityError(f"{' + '.join(chain.names)} needs a gradient pass through the whole model, which "
                                 "streaming cannot run: quantize in memory")
    fingerprint = {
        "qcore": _version(), "chain": [_chain_entry(q) for q in quantizers], "propagate": propagate,
        "device": str(device) if device is not None else None, "dtype": str(dtype), "batch_size": batch_size,
        "model": shards.fingerprint(), "calibration": _calibration_fingerprint(calib),
    }
    state_dir = target.parent / f".{target.name}{PARTIAL_INFIX}"
    if restart and state_dir.exists():
        log.info("discarding the state of an earlier run in %s (restart)", state_dir)
        shutil.rmtree(state_dir)
    streamer = StreamedRun(shards, model, state_dir, fingerprint)
    try:
        start = time.perf_counter()
        try:
            run = run_chain(model, quantizers, calibration=calib, propagate=propagate, device=device,
                            batch_size=batch_size, stream=streamer)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped after {streamer.done} of {streamer.n_blocks} blocks; the finished blocks "
                              f"are kept in {state_dir}: rerun the same command to resume (--restart, "
                              "restart=True, starts over)") from None
        _attach_record(model, chain.specs, run, time.perf_counter() - start)
        written = assemble(model, shards, state_dir, target, tied, overwrite, root, tok, max_bytes)
    finally:
        streamer.close()
        shards.close()
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("streamed %s with %s into %s", root, " + ".join(chain.names), written)
    return written


def _source_dir(src: str | os.PathLike[str]) -> Path:
    from qcore.models import resolve_model

    kind, path, _ = resolve_model(src)
    if kind != "hf" or path is None:
        raise CheckpointError(f"streaming reads a float Hugging Face folder of safetensors files; {src} is a "
                              f"{kind} model: quantize it in memory (without out= / --stream)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} has no safetensors files; streaming reads safetensors only: convert it "
                              "(save_pretrained(..., safe_serialization=True)) or quantize in memory")
    return path


def _refuse_whole_model(specs: Sequence[Any]) -> None:
    """Methods whose quantizer prepares or finalizes the whole model cannot stream."""
    from qcore.plugin.protocol import BaseQuantizer

    for spec in specs:
        cls = spec.load_quantizer()
        hooks = [h for h in ("prepare", "finalize")
                 if getattr(cls, h, None) is not getattr(BaseQuantizer, h)]
        if hooks:
            raise CompatibilityError(f"method '{spec.name}' works on the whole model in {' and '.join(hooks)}() "
                                     "(before or after the block pass), and a streamed run holds one block at a "
                                     "time: quantize in memory (without out= / --stream)")


def _skeleton(root: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The model of ``root/config.json`` with its parameters on meta, and ``root``'s tokenizer."""
    from qcore.checkpoint.format import GENERATION_CONFIG_FILE, read_config
    from qcore.checkpoint.skeleton import build_empty
    from qcore.models import _load_tokenizer, offline

    config_dict = read_config(root)
    if config_dict.get("quantization_config") is not None:
        raise CheckpointError(f"{root} is already quantized (its config.json has a quantization_config); "
                              "streaming quantizes float checkpoints")
    with offline():
        model = build_empty(config_dict, root, dtype)
        if (root / GENERATION_CONFIG_FILE).is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(root)
        tok = _load_tokenizer(root, None)
    model.name_or_path = model.config._name_or_path = str(root)  # as from_pretrained names it
    return model.eval(), tok


def _ties(model: nn.Module) -> dict[str, str]:
    """``{name: earlier name}`` of tensors that are one tensor (tied embeddings), as ``save`` stores them."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]
        else:
            seen[id(t)] = name
    return tied


def _version() -> str:
    from qcore import __version__

    return __version__


def _calibration_fingerprint(calib: Any) -> dict[str, Any] | None:
    if calib is None:
        return None
    ids = calib.input_ids.contiguous().to(torch.int64)
    return {"shape": list(ids.shape), "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


# -- moving tensors between the shards and meta -------------------------------------------------------
def _load_module_tensors(module: nn.Module, prefix: str, shards: InputShards, recurse: bool) -> list[str]:
    """Read ``module``'s meta parameters and buffers from ``shards`` in their model dtype; returns the names."""
    from qcore.pipeline.validate import count_nonfinite, describe_counts

    loaded = []
    mods = module.named_modules() if recurse else [("", module)]
    for sub, m in mods:
        for store in (m._parameters, m._buffers):
            for leaf, t in list(store.items()):
                if t is None or t.device.type != "meta":
                    continue
                full = ".".join(p for p in (prefix, sub, leaf) if p)
                value = shards.get(full, dtype=t.dtype)
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(f"{shards.root}: {full} is {tuple(value.shape)} on disk but "
                                          f"{tuple(t.shape)} in the model (a Conv1D or fused layout qcore "
                                          "rewrites); streaming cannot load it: quantize in memory")
                nan, inf = count_nonfinite(value)
                if nan or inf:
                    raise NonFiniteError(f"non-finite values in the model's weights: {full} "
                                         f"({describe_counts(nan, inf)}); repair or re-download the float model")
                store[leaf] = nn.Parameter(value, requires_grad=t.requires_grad) if store is m._parameters else value
                loaded.append(full)
    return loaded


# -- the engine's stream -------------------------------------------------------------------------------
class StreamedRun:
    """The :class:`qcore.pipeline.engine.BlockStream` of a streamed run, with its state on disk."""

    def __init__(self, shards: InputShards, model: nn.Module, state_dir: Path, fingerprint: dict[str, Any]) -> None:
        self.shards = shards
        self.model = model
        self.dir = state_dir
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.done = 0
        self.n_blocks = 0
        self.run: RunContext | None = None
        self.modules: dict[str, dict[str, Any]] = {}
        """Serialized modules of the finished blocks (rebuilt on meta when a run resumes)."""
        self._outer: list[nn.Module] = []
        self._hooks: list[Any] = []
        self._lock_fd: int | None = None
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.saved = self._read_state()
        except BaseException:
            self.close()
            raise

    # -- state folder ---------------------------------------------------------------------------------
    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(f"another qcore process is writing {self.dir} (the state of a streamed run of "
                                  "the same output); wait for it or pick another output folder") from None
        self._lock_fd = fd

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_state(self) -> dict[str, Any] | None:
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(f"{path} is damaged; delete {self.dir} (or pass --restart / restart=True) to "
                                  "start over") from None
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{self.dir} was written by another qcore version; pass --restart "
                                  "(restart=True) to start over")
        diff = _differences(state.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise CheckpointError(f"{self.dir} holds an interrupted run with other {', '.join(diff)}, so it "
                                  "cannot be resumed with these: rerun it with the same ones, or pass --restart "
                                  "(restart=True) to discard it and start over")
        unsaved = {m: names for m, names in state.get("unsaved", {}).items() if names}
        if unsaved and state.get("done", 0):
            raise CheckpointError(f"{self.dir} cannot be resumed: {', '.join(unsaved)} keep(s) state that is not "
                                  f"JSON ({'; '.join(', '.join(v) for v in unsaved.values())}); pass --restart "
                                  "(restart=True) to start over")
        return state

    def _write_state(self) -> None:
        assert self.run is not None
        quantizers, unsaved = {}, {}
        for q in self.run.chain:
            quantizers[q.spec.name], unsaved[q.spec.name] = _quantizer_state(q)
        write_json(self.dir / STATE_FILE, {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                                           "done": self.done, "n_blocks": self.n_blocks, "record": self.run.record,
                                           "modules": self.modules, "quantizers": quantizers, "unsaved": unsaved})

    # -- BlockStream ----------------------------------------------------------------------------------
    def begin(self, run: RunContext) -> tuple[int, list[Tensor] | None]:
        self.run = run
        self.n_blocks = len(run.info.blocks)
        self._hook_outer(run)
        saved = self.saved
        if not saved or not saved.get("done"):
            self.done = 0
            self._write_state()
            return 0, None
        self.done = int(saved["done"])
        from qcore.arch.introspect import inspect_model
        from qcore.checkpoint.loading import rebuild_modules

        self.modules = saved.get("modules", {})
        rebuild_modules(self.model, self.modules, self.dir)  # the finished blocks as they were written
        run.info = inspect_model(self.model)
        run.record.clear()
        run.record.update(saved["record"])
        for q in run.chain:
            for k, v in saved["quantizers"].get(q.spec.name, {}).items():
                setattr(q, k, v)
        hidden = None
        if run.calibration is not None and self.done < self.n_blocks:
            hidden = _read_hidden(self.dir / HIDDEN_FILE.format(index=self.done))
        log.warning("resuming the streamed run in %s after block %d of %d", self.dir, self.done, self.n_blocks)
        return self.done, hidden

    def _hook_outer(self, run: RunContext) -> None:
        """Modules outside the blocks read their weights when first called (the capture pass)."""
        def load(m: nn.Module, prefix: str) -> None:
            if _load_module_tensors(m, prefix, self.shards, recurse=False):
                self._outer.append(m)

        self._hooks += hook_outer(self.model, [b.name for b in run.info.blocks], load)

    def captured(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._outer:
            to_meta(m, recurse=False)
        self._outer.clear()

    def load_block(self, index: int, binfo: BlockInfo) -> None:
        _load_module_tensors(binfo.module, binfo.name, self.shards, recurse=True)

    def finish_block(self, index: int, binfo: BlockInfo, hidden: list[Tensor] | None) -> None:
        from safetensors.torch import save_file

        from qcore.checkpoint.saving import module_entries

        prefix = f"{binfo.name}." if binfo.name else ""
        self.modules.update({prefix + k: v for k, v in module_entries(binfo.module).items()})
        part = {prefix + k: v.detach().contiguous() for k, v in binfo.module.state_dict().items()}
        with atomic_file(self.dir / BLOCK_PART.format(index=index)) as tmp:
            save_file(part, str(tmp), metadata={"format": "pt"})
        del part
        if hidden is not None and index + 1 < self.n_blocks:
            with atomic_file(self.dir / HIDDEN_FILE.format(index=index + 1)) as tmp:
                save_file({str(i): h.detach().cpu().contiguous() for i, h in enumerate(hidden)}, str(tmp))
        self.done = index + 1
        self._write_state()  # the block counts as finished from here on
        (self.dir / HIDDEN_FILE.format(index=index)).unlink(missing_ok=True)
        to_meta(binfo.module, recurse=True)
        return_freed_memory()


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    words = {"chain": "methods or options", "calibration": "calibration data", "model": "model files",
             "qcore": "qcore version", "propagate": "propagation", "device": "device", "dtype": "dtype",
             "batch_size": "batch size"}
    return [words.get(k, k) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _quantizer_state(q: Quantizer) -> tuple[dict[str, Any], list[str]]:
    """A quantizer's own attributes that are JSON (kept across a resume), and the names of those that are not."""
    state, unsaved = {}, []
    for k, v in vars(q).items():
        if k in _QUANTIZER_FIXED:
            continue
        try:
            state[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            unsaved.append(k)
    return state, unsaved


def _read_hidden(path: Path) -> list[Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing, so the interrupted run cannot continue; pass --restart "
                              "(restart=True) to start over")
    data = load_file(str(path))
    return [data[str(i)] for i in range(len(data))]


# -- the checkpoint ------------------------------------------------------------------------------------
def assemble(model: nn.Module, shards: InputShards, state_dir: Path, target: Path, tied: dict[str, str],
             overwrite: bool, root: Path, tokenizer: Any, max_bytes: int) -> Path:
    """Write the checkpoint from the finished blocks and the input's other tensors, one tensor at a time."""
    from qcore.checkpoint.saving import _quantization_config, write_config_files
    from qcore.checkpoint.streaming import TensorSpec, dtype_of, part_tensors, write_shards

    parts: dict[str, Any] = {}
    for path in sorted(state_dir.glob(BLOCK_PART.replace("{index:05d}", "*"))):
        parts.update(part_tensors(path))
    specs = []
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        if name in parts:
            dtype_name, shape, raw = parts[name]
            specs.append(TensorSpec(name, dtype_of(dtype_name), shape, lambda raw=raw: raw))
        elif t.device.type != "meta":
            specs.append(TensorSpec(name, t.dtype, tuple(t.shape), lambda t=t: t))
        else:
            specs.append(TensorSpec(name, t.dtype, tuple(t.shape), lambda n=name, d=t.dtype: shards.get(n, d)))
    qconfig = _quantization_config(model, model.qcore_record, tied)
    with atomic_dir(target, overwrite, "checkpoint", (root,)) as tmp:
        files = write_shards(specs, tmp, max_bytes)
        write_config_files(model, qconfig, files, tmp, tokenizer)
    return target
