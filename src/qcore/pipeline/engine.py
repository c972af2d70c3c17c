"""The block-by-block calibration engine: one pass over the model for a whole chain of methods.

:func:`run_chain` does, in order (see :mod:`qcore.plugin.protocol`):

1. ``prepare(run)`` of each quantizer in chain order;
2. with calibration data, ONE cheap capture pass: every decoder block's ``forward`` is swapped
   for a recorder that stores its positional and keyword arguments (attention masks, position
   embeddings, ``position_ids``, ``cache_position``...; caches off with ``use_cache=False``) and
   passes the hidden states through untouched, so only the embeddings and the mask/rotary code
   run; the pass stops at the last block. Block 0's hidden states are the calibration inputs;
   every block keeps its own keyword arguments (models such as Gemma-2 give sliding-window and
   global layers different masks). Any architecture whose blocks sit in one ``ModuleList``
   works; nothing is family-specific;
3. per block: move it to ``device`` (when given), compute its float outputs, call each
   quantizer's ``process_block`` in chain order, then run the changed block on its inputs to get
   the next block's inputs (``propagate="quantized"``, the sequential protocol of GPTQ and AWQ) or
   hand on the float outputs (``propagate="float"``); free this block's activations and move
   it back. At most one block's activations (its inputs, its float outputs and the outputs being
   built) are alive at a time;
4. ``finalize(run)`` of each quantizer in chain order.

Statistics (:meth:`BlockContext.collect`) come from forward hooks on the block's linears while
the block runs on all captured inputs.
"""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import ArchitectureError, CalibrationError
from qcore.progress import bar, get_logger

if TYPE_CHECKING:
    from qcore.data import CalibrationData
    from qcore.arch.introspect import BlockInfo, ModelInfo
    from qcore.plugin.protocol import Quantizer
    from qcore.quant.linear import QuantLinear
    from qcore.quant.primitives import QuantizedWeight

log = get_logger("engine")

STATS: tuple[str, ...] = ("hessian", "inputs", "absmax", "absmean")
CALIBRATION_BACKEND = "dense_bf16"
"""QuantLinear backend of layers quantized during a block's turn, until the block is done: bf16
like the int4 kernel, faster than it on calibration-sized batches (thousands of rows)."""
"""What :meth:`BlockContext.collect` can gather per linear."""
PROPAGATE: tuple[str, ...] = ("quantized", "float")
ACT_ATTR = "qcore_act"
"""Attribute a transform sets on a float linear to ask for activation quantization."""
ROUTER_ROLE = "router"

Inputs = list[tuple[tuple, dict]]


class _StopCapture(Exception):
    """Cuts a forward pass short once what it was run for is recorded."""


# -- small helpers -----------------------------------------------------------------------------------
def _to(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor inside tuples/lists/dicts moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ArchitectureError(
        "the first decoder block was called without positional arguments or a 'hidden_states' "
        "keyword; qcore cannot tell which argument is the hidden state. Report the model family"
    )


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor | None) -> tuple[tuple, dict]:
    """A copy of a block call's arguments with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return (), kwargs


def _first(out: Any) -> Tensor:
    """The hidden states of a block's output (blocks may return tuples)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ArchitectureError(f"a decoder block returned {type(out).__name__}, not a tensor or tuple")
    return out


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# -- contexts ------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """One run of a chain over a model (what ``prepare``/``finalize`` see)."""

    model: nn.Module
    info: ModelInfo
    chain: list[Quantizer]
    position: int = 0
    calibration: CalibrationData | None = None
    device: torch.device | None = None
    record: dict[str, Any] = field(default_factory=dict)
    propagate: str = "quantized"

    def later_kinds(self) -> list[str]:
        """Kinds (``weight-only``, ``transform``, ...) of the methods after the current one."""
        kinds = []
        for q in self.chain[self.position + 1:]:
            spec = getattr(q, "spec", None)
            kinds.append(spec.capabilities.kind if spec is not None else "")
        return kinds

    def full_name(self, block_name: str, name: str) -> str:
        return f"{block_name}.{name}" if block_name else name


class BlockContext:
    """One decoder block during the pass: its inputs, statistics and module surgery."""

    def __init__(self, index: int, info: BlockInfo, run: RunContext, inputs: Inputs | None) -> None:
        self.index = index
        self.info = info
        self.name: str = info.name
        self.module: nn.Module = info.module
        self.run = run
        self.inputs: Inputs | None = inputs
        self._float_outputs: list[Tensor] | None = None

    # -- running the block ------------------------------------------------------------------------
    def _require_inputs(self, what: str) -> Inputs:
        if self.inputs is None:
            raise CalibrationError(
                f"{what} needs calibration data, but this chain runs without it; pass calibration "
                "(e.g. qcore.quantize(..., calibration=None uses the built-in default text) or "
                "qcore.data.get_calibration(...))"
            )
        return self.inputs

    def call(self, i: int, hidden: Tensor | None = None) -> Tensor:
        """Run the block on captured batch ``i`` (or on ``hidden`` with batch ``i``'s other
        arguments) under the current grad mode; returns the hidden-state output."""
        args, kwargs = self._require_inputs("running a block")[i]
        if hidden is not None:
            args, kwargs = _with_hidden(args, kwargs, hidden)
        return _first(self.module(*args, **kwargs))

    @torch.no_grad()
    def forward(self) -> list[Tensor]:
        """The block's outputs now (one tensor per captured batch)."""
        inputs = self._require_inputs("BlockContext.forward")
        return [self.call(i) for i in range(len(inputs))]

    @property
    def float_outputs(self) -> list[Tensor] | None:
        """The block's outputs before any quantizer of the chain changed it (``None`` without
        calibration data). Computed before the chain touches the block only when some quantizer
        of the chain sets ``needs_float_outputs = True`` (or ``propagate="float"``): an extra
        forward pass per block that methods not using it should not pay."""
        if self._float_outputs is None and self.inputs is not None:
            raise CalibrationError(
                f"block {self.name}: float_outputs was not computed; set the class attribute "
                "needs_float_outputs = True on the quantizer that reads it"
            )
        return self._float_outputs

    def _compute_float_outputs(self) -> None:
        self._float_outputs = self.forward() if self.inputs is not None else None

    def hidden_inputs(self) -> list[Tensor]:
        """The hidden states entering the block, one tensor per captured batch."""
        return [_hidden_of(a, k) for a, k in self._require_inputs("hidden_inputs")]

    # -- modules ----------------------------------------------------------------------------------
    def linear(self, name: str) -> nn.Module:
        """The linear (``nn.Linear`` or ``QuantLinear``) at ``name`` relative to the block."""
        try:
            return self.module.get_submodule(name)
        except AttributeError:
            raise ArchitectureError(
                f"block {self.name} has no module '{name}'; its linears are: {', '.join(self.info.linears)}"
            ) from None

    def quantizable(self, config: Any = None) -> list[str]:
        """Linears of the block a weight method should quantize, in block order: every linear
        except routers, modules already quantized, and names matching ``config.ignore``
        (fnmatch patterns against the full module name, e.g. ``model.layers.0.mlp.*``)."""
        from qcore.quant.linear import QuantLinear

        patterns = list(getattr(config, "ignore", None) or [])
        names = []
        for name, linfo in self.info.linears.items():
            if not getattr(linfo, "quantize", True) or linfo.role.split(".")[-1] == ROUTER_ROLE:
                continue
            full = self.run.full_name(self.name, name)
            if any(fnmatch.fnmatchcase(full, p) for p in patterns):
                continue
            if isinstance(self.module.get_submodule(name), QuantLinear):
                continue
            names.append(name)
        return names

    def quantize_linear(self, name: str, qw: QuantizedWeight) -> QuantLinear:
        """Replace linear ``name`` with ``QuantLinear.from_quantized(qw, bias)``; carries the
        activation quantization a transform asked for (``qcore_act``) and records the meta."""
        from qcore.quant.linear import QuantLinear

        old = self.linear(name)
        if isinstance(old, QuantLinear):
            raise ArchitectureError(
                f"{self.run.full_name(self.name, name)} is already quantized; a chain may hold "
                "one weight-quantizing method"
            )
        weight = old.weight
        if tuple(qw.codes.shape) != tuple(weight.shape):
            raise ArchitectureError(
                f"quantized weight of shape {tuple(qw.codes.shape)} does not match "
                f"{self.run.full_name(self.name, name)} of shape {tuple(weight.shape)}"
            )
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        act = getattr(old, ACT_ATTR, None)
        new = QuantLinear.from_quantized(qw, bias, act=act) if act is not None else \
            QuantLinear.from_quantized(qw, bias)
        new = new.to(weight.device)
        if new.backend == "auto" and new.act is None:  # the engine's forwards (until the block is done)
            new.backend = CALIBRATION_BACKEND
        _set_submodule(self.module, name, new)
        self.run.record.setdefault("modules", {})[self.run.full_name(self.name, name)] = new.meta()
        return new

    # -- statistics -------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, names: Sequence[str], stat: str, stop_early: bool = True) -> dict[str, Any]:
        """Run the block on all captured inputs and gather ``stat`` of each linear's INPUT.

        With ``stop_early`` (default) each batch's forward is cut off as soon as every named
        linear has been reached (q/k/v need almost none of the block, ``down`` most of it); sets
        holding MoE experts always run the whole block, since an expert may get no tokens.

        Returns ``{name: value}``; value by ``stat``:
        ``"hessian"``: ``{"hessian": H, "nsamples": n}``, H float32 ``[in, in]`` = 2/n sum x x^T
        over the n tokens the linear saw (MoE experts see only their routed tokens; n may be 0);
        ``"inputs"``: list of float32 ``[tokens, in]`` tensors, one per batch that reached it;
        ``"absmax"`` / ``"absmean"``: float32 ``[in]``, per input channel over all tokens.
        """
        if stat not in STATS:
            raise ValueError(f"unknown statistic '{stat}'; choose one of {', '.join(STATS)}")
        inputs = self._require_inputs(f"collect('{stat}')")
        acc: dict[str, dict[str, Any]] = {n: {"n": 0, "v": None} for n in names}
        handles = []

        experts = any(getattr(self.info.linears.get(n), "expert", None) is not None for n in names)
        stop = stop_early and not experts
        pending: set[str] = set()

        def make_hook(lname: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                a = acc[lname]
                t = x.shape[0]
                if stat == "hessian":
                    xtx = x.t() @ x
                    a["v"] = xtx if a["v"] is None else a["v"].add_(xtx)
                elif stat == "inputs":
                    a.setdefault("list", []).append(x.clone())
                elif stat == "absmax":
                    m = x.abs().amax(dim=0) if t else torch.zeros(x.shape[-1], device=x.device)
                    a["v"] = m if a["v"] is None else torch.maximum(a["v"], m)
                else:  # absmean
                    s = x.abs().sum(dim=0)
                    a["v"] = s if a["v"] is None else a["v"].add_(s)
                a["n"] += t
                pending.discard(lname)
                if stop and not pending:
                    raise _StopCapture
            return hook

        for lname in names:
            handles.append(self.linear(lname).register_forward_pre_hook(make_hook(lname)))
        try:
            for i in range(len(inputs)):
                pending.update(names)
                try:
                    self.call(i)
                except _StopCapture:
                    pass
        finally:
            for h in handles:
                h.remove()

        out: dict[str, Any] = {}
        for lname in names:
            a = acc[lname]
            in_features = self._in_features(lname)
            dev = _module_device(self.linear(lname))
            if stat == "inputs":
                out[lname] = a.get("list", [])
                continue
            if a["v"] is None:
                shape = (in_features, in_features) if stat == "hessian" else (in_features,)
                a["v"] = torch.zeros(shape, dtype=torch.float32, device=dev)
            if stat == "hessian":
                h = a["v"]
                if a["n"]:
                    h.mul_(2.0 / a["n"])
                out[lname] = {"hessian": h, "nsamples": a["n"]}
            elif stat == "absmean":
                out[lname] = a["v"] / max(a["n"], 1)
            else:
                out[lname] = a["v"]
        return out

    def _in_features(self, name: str) -> int:
        mod = self.linear(name)
        n = getattr(mod, "in_features", None)
        if n is None:
            n = self.info.linears[name].in_features
        return int(n)


# -- capture -----------------------------------------------------------------------------------------
def _blocks_container(model: nn.Module, info: ModelInfo) -> nn.Module:
    try:
        return model.get_submodule(info.blocks_path)
    except AttributeError:
        raise ArchitectureError(f"blocks path '{info.blocks_path}' not found in the model") from None


@contextmanager
def _recording(blocks: list[nn.Module], store: list[list[tuple[tuple, dict]]]) -> Iterator[None]:
    """Swap each block's ``forward`` for a recorder of its arguments (identity on hidden states)."""
    last = len(blocks) - 1

    def make(i: int):
        def recorder(*args: Any, **kwargs: Any) -> Any:
            store[i].append((args, kwargs))
            if i == last:
                raise _StopCapture
            return _hidden_of(args, kwargs)
        return recorder

    for i, blk in enumerate(blocks):
        blk.forward = make(i)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for blk in blocks:
            if "forward" in blk.__dict__:
                del blk.forward


@torch.no_grad()
def capture_inputs(model: nn.Module, info: ModelInfo, calibration: CalibrationData, batch_size: int = 8,
                   store_device: torch.device | None = None) -> tuple[list[Tensor], list[Inputs]]:
    """Hidden states entering block 0 (one tensor per batch) and, per block, its call arguments
    per batch with the hidden states set to ``None`` (filled in block by block)."""
    blocks = [b.module for b in info.blocks]
    n_blocks = len(blocks)
    model_device = _module_device(model)
    fwd = model.forward
    hidden0: list[Tensor] = []
    templates: list[Inputs] = [[] for _ in range(n_blocks)]
    for batch in calibration.batches(batch_size):
        store: list[list[tuple[tuple, dict]]] = [[] for _ in range(n_blocks)]
        kwargs: dict[str, Any] = {"input_ids": batch.to(model_device)}
        if _accepts(fwd, "attention_mask"):
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        if _accepts(fwd, "use_cache"):
            kwargs["use_cache"] = False
        try:
            with _recording(blocks, store):
                model(**kwargs)
        except _StopCapture:
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
        hidden0.append(_to(_hidden_of(args0, kw0).detach(), store_device))
        for i in range(n_blocks):
            a, k = store[i][0] if store[i] else store[0][0]
            a, k = _with_hidden(a, k, None)
            k.pop("use_cache", None)
            if _accepts(blocks[i].forward, "use_cache"):
                k["use_cache"] = False
            templates[i].append((a, k))
    return hidden0, templates


def _block_inputs(hidden: list[Tensor], template: Inputs, device: torch.device | None) -> Inputs:
    return [_with_hidden(_to(a, device), _to(k, device), h) for h, (a, k) in zip(hidden, template)]


# -- the run -----------------------------------------------------------------------------------------
def _new_record() -> dict[str, Any]:
    from qcore import __version__

    return {"format": "qcore", "format_version": 1, "chain": [], "modules": {}, "calibration": None,
            "qcore_version": __version__}


def _chain_entry(q: Any) -> dict[str, Any]:
    spec = getattr(q, "spec", None)
    config = getattr(q, "config", None)
    cfg = config.to_json_dict() if hasattr(config, "to_json_dict") else {}
    return {
        "method": getattr(spec, "name", type(q).__name__),
        "plugin": getattr(spec, "plugin", ""),
        "version": getattr(spec, "version", ""),
        "config": cfg,
    }


def run_chain(model: nn.Module, quantizers: Sequence[Quantizer], calibration: CalibrationData | None = None,
              propagate: str = "quantized", device: torch.device | str | None = None,
              batch_size: int = 8) -> RunContext:
    """Run a chain of quantizers over ``model`` in one block-by-block pass (changes it in place).

    ``calibration``: a ``CalibrationData`` or token ids ``[n, seq_len]`` (``None`` for calibration-free chains: each
    ``process_block`` then sees ``block.inputs is None``). ``propagate``: feed each block the
    outputs of the already-quantized previous blocks (``"quantized"``, GPTQ/AWQ) or of the float
    model (``"float"``). ``device``: where each block runs during its turn (e.g. ``"cuda"``);
    the model stays where it is otherwise. ``batch_size``: calibration windows per forward.
    The quantization record is kept in ``model.qcore_record`` (returned as ``run.record``).
    """
    from qcore.arch.introspect import inspect_model

    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}, got '{propagate}'")
    chain = list(quantizers)
    if isinstance(calibration, Tensor):  # ready token ids [n, seq_len]
        from qcore.data import CalibrationData

        ids = calibration.long() if calibration.dim() == 2 else calibration.long().reshape(1, -1)
        calibration = CalibrationData(ids, {"source": "token ids", "n_samples": ids.shape[0],
                                            "seq_len": ids.shape[1]})
    if calibration is None:
        need = [getattr(q.spec, "name", "?") for q in chain
                if getattr(getattr(q, "spec", None), "capabilities", None) is not None
                and q.spec.capabilities.needs_calibration]
        if need:
            raise CalibrationError(
                f"method(s) {', '.join(need)} need calibration data; pass calibration (see "
                "qcore.data.get_calibration; no source uses the built-in default text)"
            )
    dev = torch.device(device) if device is not None else None
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    if config is not None and old_use_cache is not None:
        config.use_cache = False

    record = getattr(model, "qcore_record", None)
    if not isinstance(record, dict):
        record = _new_record()
        model.qcore_record = record
    record.setdefault("modules", {})
    record.setdefault("chain", [])
    if calibration is not None:
        record["calibration"] = dict(calibration.record)

    info = inspect_model(model)
    run = RunContext(model=model, info=info, chain=chain, calibration=calibration, device=dev,
                     record=record, propagate=propagate)
    try:
        for pos, q in enumerate(chain):
            run.position = pos
            q.prepare(run)
        run.info = info = inspect_model(model)  # prepare may have changed modules

        hidden: list[Tensor] | None = None
        templates: list[Inputs] | None = None
        if calibration is not None:
            hidden, templates = capture_inputs(model, info, calibration, batch_size, store_device=dev)

        pbar = bar(len(info.blocks), desc="qcore blocks", unit="block")
        try:
            for i, binfo in enumerate(info.blocks):
                pbar.set_postfix_str(binfo.name, refresh=False)
                hidden = _process_block(run, i, binfo, hidden, templates[i] if templates else None, dev)
                if templates is not None:
                    templates[i] = []  # this block's arguments are no longer needed
                pbar.update(1)
        finally:
            pbar.close()
        del hidden, templates

        for pos, q in enumerate(chain):
            run.position = pos
            q.finalize(run)
        for q in chain:
            entry = _chain_entry(q)
            extra = q.record() if hasattr(q, "record") and callable(q.record) else {}
            if extra:
                entry["record"] = extra
            record["chain"].append(entry)
    finally:
        if config is not None and old_use_cache is not None:
            config.use_cache = old_use_cache
        model.train(was_training)
    return run


def _restore_backends(module: nn.Module) -> None:
    """Hand the block's new QuantLinears back to ``auto`` and free their calibration caches."""
    from qcore.quant.linear import QuantLinear

    for m in module.modules():
        if isinstance(m, QuantLinear) and m.backend == CALIBRATION_BACKEND:
            m.backend = "auto"
            m.release_cache()


def _process_block(run: RunContext, index: int, binfo: BlockInfo, hidden: list[Tensor] | None,
                   template: Inputs | None, device: torch.device | None) -> list[Tensor] | None:
    """One block's turn; returns the next block's hidden inputs (``None`` without calibration)."""
    module = binfo.module
    home = _module_device(module)
    if device is not None and device != home:
        module.to(device)
    try:
        inputs = _block_inputs(hidden, template, device) if hidden is not None and template is not None else None
        del hidden  # the caller's list is replaced by this block's outputs below
        block = BlockContext(index, binfo, run, inputs)
        if run.propagate == "float" or any(getattr(q, "needs_float_outputs", False) for q in run.chain):
            block._compute_float_outputs()
        for pos, q in enumerate(run.chain):
            run.position = pos
            q.process_block(block)
        if inputs is None:
            return None
        if run.propagate == "float":
            nxt = block._float_outputs
        else:
            block._float_outputs = None
            nxt = block.forward()
        block.inputs = None
        block._float_outputs = None
        return [h.detach() for h in nxt]
    finally:
        _restore_backends(module)
        if device is not None and device != home:
            module.to(home)
