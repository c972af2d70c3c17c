"""The block-by-block calibration engine: one pass over the model for a whole chain of methods.

:func:`run_chain` implements the protocol of :mod:`qcore.plugin.protocol`:

1. each quantizer's ``needs()`` is read once and combined (conflicting propagation modes are
   refused before any work);
2. ``prepare(run)`` of each quantizer in chain order;
3. with calibration data, one cheap capture pass (:mod:`qcore.pipeline.capture`); with
   ``Needs.gradients``, one gradient pass of the model's loss (:mod:`qcore.pipeline.gradients`);
4. per block: move it to ``device`` (when given), compute its float outputs when needed, call each
   quantizer's ``process_block`` in chain order, then run the changed block on its inputs to get
   the next block's inputs (quantized propagation, GPTQ's and AWQ's protocol) or hand on the float
   outputs; free this block's activations and move it back. At most one block's activations are
   alive at a time;
5. ``finalize(run)`` of each quantizer in chain order, then each ``record()`` is kept.

Statistics come from registered observers (:mod:`qcore.pipeline.observers`) hooked on the block's
linears while the block runs on all captured inputs.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from qcore.arch.surgery import set_submodule
from qcore.pipeline.capture import (
    Inputs,
    StopForward,
    block_inputs,
    capture_inputs,
    first_tensor,
    hidden_of,
    module_device,
    with_hidden,
)
from qcore.pipeline.distributed import ReduceOp, all_reduce, check_chain, combine_observer, shard, world
from qcore.pipeline.observers import as_rows, observer_spec, weight_input
from qcore.pipeline.validate import first_nonfinite, nonfinite_tensors
from qcore.plugin.config import LayerPrecision, WeightQuantConfig
from qcore.plugin.errors import ArchitectureError, CalibrationError, ConfigError, NonFiniteError
from qcore.plugin.protocol import PROPAGATIONS, Needs
from qcore.progress import bar, get_logger

if TYPE_CHECKING:
    from qcore.arch.introspect import BlockInfo, ModelInfo
    from qcore.data import CalibrationData
    from qcore.plugin.config import QuantConfig
    from qcore.plugin.protocol import Propagation, Quantizer
    from qcore.plugin.spec import MethodSpec
    from qcore.quant.act import ActQuant
    from qcore.quant.linear import QuantLinear
    from qcore.quant.primitives import QuantizedWeight

log = get_logger("engine")

CALIBRATION_BACKEND = "dense_bf16"
"""QuantLinear backend of layers quantized during a block's turn, until the block is done: bf16
like the int4 kernel, faster than it on calibration-sized batches (thousands of rows)."""
ROUTER_ROLE = "router"
_ACTIVATION_FIX = ("look for an overflowing dtype (run in float32), broken weights, or calibration text the "
                   "model cannot read; qcore quantizes nothing from non-finite values")


# -- contexts ------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """One run of a chain over a model (implements :class:`qcore.plugin.RunContext`)."""

    model: nn.Module
    info: ModelInfo
    chain: list[Quantizer]
    position: int = 0
    calibration: CalibrationData | None = None
    device: torch.device | None = None
    record: dict[str, Any] = field(default_factory=dict)
    needs: Needs = field(default_factory=Needs)
    """The chain's needs combined (see :func:`combine_needs`)."""
    gradients: dict[str, list[Tensor]] = field(default_factory=dict)
    """Block name -> per-batch gradients of the loss w.r.t. its output (``Needs.gradients``)."""
    grad_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Full linear name -> {observer: result} from the gradient pass."""

    def later_methods(self) -> list[MethodSpec]:
        return [q.spec for q in self.chain[self.position + 1:]]

    def weights_quantized_later(self) -> bool:
        return any(s.capabilities.quantizes_weights for s in self.later_methods())

    def full_name(self, block_name: str, name: str) -> str:
        return f"{block_name}.{name}" if block_name else name


class BlockContext:
    """One decoder block during the pass (implements :class:`qcore.plugin.BlockContext`)."""

    def __init__(self, index: int, info: BlockInfo, run: RunContext, inputs: Inputs | None) -> None:
        self.index = index
        self.info = info
        self.name: str = info.name
        self.module: nn.Module = info.module
        self.run = run
        self.inputs: Inputs | None = inputs
        self._float_outputs: list[Tensor] | None = None
        self.propagation: Propagation = run.needs.propagation or "quantized"

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
        args, kwargs = self._require_inputs("running a block")[i]
        if hidden is not None:
            args, kwargs = with_hidden(args, kwargs, hidden)
        return first_tensor(self.module(*args, **kwargs))

    @torch.no_grad()
    def forward(self) -> list[Tensor]:
        inputs = self._require_inputs("BlockContext.forward")
        return [self.call(i) for i in range(len(inputs))]

    @property
    def float_outputs(self) -> list[Tensor] | None:
        if self._float_outputs is None and self.inputs is not None:
            raise CalibrationError(
                f"block {self.name}: float_outputs was not computed; return Needs(float_outputs=True) "
                "from the quantizer's needs()"
            )
        return self._float_outputs

    def _compute_float_outputs(self) -> None:
        self._float_outputs = self.forward() if self.inputs is not None else None

    def hidden_inputs(self) -> list[Tensor]:
        return [hidden_of(a, k) for a, k in self._require_inputs("hidden_inputs")]

    def output_gradients(self) -> list[Tensor]:
        if self.name not in self.run.gradients:
            raise CalibrationError(f"block {self.name}: no output gradients; return Needs(gradients=True) "
                                   "from the quantizer's needs() (it runs a gradient pass)")
        return self.run.gradients[self.name]

    @torch.no_grad()
    def module_calls(self, name: str) -> list[tuple[tuple, dict]]:
        calls: list[tuple[tuple, dict]] = []
        if name == "":
            return list(self._require_inputs("module_calls"))

        def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            # a KV cache must not be replayed (it would grow on every replay)
            calls.append((args, {k: (None if k in ("past_key_value", "past_key_values") else v)
                                 for k, v in kwargs.items()}))

        handle = self.module.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True)
        try:
            self.forward()
        finally:
            handle.remove()
        return calls

    @torch.no_grad()
    def call_module(self, name: str, calls: Sequence[tuple[tuple, dict]]) -> list[Tensor]:
        module = self.module if name == "" else self.module.get_submodule(name)
        return [first_tensor(module(*a, **k)) for a, k in calls]

    # -- modules ----------------------------------------------------------------------------------
    def linear(self, name: str) -> nn.Module:
        try:
            return self.module.get_submodule(name)
        except AttributeError:
            raise ArchitectureError(
                f"block {self.name} has no module '{name}'; its linears are: {', '.join(self.info.linears)}"
            ) from None

    def quantizable(self, config: QuantConfig | None = None) -> list[str]:
        from qcore.quant.linear import QuantLinear

        names = []
        for name, linfo in self.info.linears.items():
            if not linfo.quantize or linfo.role.split(".")[-1] == ROUTER_ROLE:
                continue
            if config is not None and config.ignores(self.run.full_name(self.name, name)):
                continue
            if isinstance(self.module.get_submodule(name), QuantLinear):
                continue
            names.append(name)
        return names

    def precision(self, name: str, config: QuantConfig) -> LayerPrecision:
        if not isinstance(config, WeightQuantConfig):
            raise ConfigError(f"{type(config).__name__} has no bits/group_size (not a WeightQuantConfig)")
        return config.precision(self.run.full_name(self.name, name))

    def quantize_linear(self, name: str, qw: QuantizedWeight) -> QuantLinear:
        from qcore.quant.linear import QuantLinear
        from qcore.quant.transformed import TransformedLinear

        old = self.linear(name)
        full = self.run.full_name(self.name, name)
        if isinstance(old, QuantLinear):
            raise ArchitectureError(f"{full} is already quantized; a chain may hold one weight-quantizing method")
        weight = old.weight
        bad = first_nonfinite({"scales": qw.scales, "zeros": qw.zeros})
        if bad is not None:
            raise NonFiniteError(f"quantizing {full} gave non-finite {bad[0]} ({bad[1]}); its weights "
                                 "or the method's statistics overflow: check the layer's weights (qcore check) "
                                 "or keep it in float with ignore=[...]")
        if tuple(qw.codes.shape) != tuple(weight.shape):
            raise ArchitectureError(f"quantized weight of shape {tuple(qw.codes.shape)} does not match "
                                    f"{full} of shape {tuple(weight.shape)}")
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        extra: dict[str, Any] = {}
        if isinstance(old, TransformedLinear):
            extra = {"act": old.act, "input_transform": old.input_transform}
            extra = {k: v for k, v in extra.items() if v is not None}
        new = QuantLinear.from_quantized(qw, bias, **extra).to(weight.device)
        if new.backend == "auto" and new.act is None:  # the engine's forwards (until the block is done)
            new.backend = CALIBRATION_BACKEND
        set_submodule(self.module, name, new)
        self.run.record.setdefault("modules", {})[full] = new.meta()
        self.run.record.setdefault("weight_error", {})[full] = relative_weight_error(weight, new.dequantize_weight())
        return new

    # -- requests ---------------------------------------------------------------------------------
    def _transformed(self, name: str) -> nn.Module:
        """The linear ``name`` ready to carry run-time input processing."""
        from qcore.quant.linear import QuantLinear
        from qcore.quant.transformed import TransformedLinear

        lin = self.linear(name)
        if isinstance(lin, (QuantLinear, TransformedLinear)):
            return lin
        if not isinstance(lin, nn.Linear):
            raise ArchitectureError(f"{self.run.full_name(self.name, name)} is a {type(lin).__name__}, not a "
                                    "linear layer that can carry an input transform")
        new = TransformedLinear.wrap(lin)
        set_submodule(self.module, name, new)
        return new

    def request_activation_quant(self, name: str, act: ActQuant) -> None:
        lin = self._transformed(name)
        if lin.act is not None and lin.act != act:
            raise ConfigError(f"{self.run.full_name(self.name, name)}: two methods of the chain ask for "
                              f"different activation quantization ({lin.act} and {act})")
        lin.act = act

    def set_input_transform(self, name: str, transform: nn.Module) -> None:
        lin = self._transformed(name)
        if lin.input_transform is not None:
            raise ConfigError(f"{self.run.full_name(self.name, name)} already has an input transform; "
                              "compose them into one module")
        lin.input_transform = transform

    def set_attention_transform(self, name: str, transform: nn.Module) -> None:
        from qcore.quant.attention import attach

        try:
            self.module.get_submodule(name)
        except AttributeError:
            raise ArchitectureError(f"block {self.name} has no module '{name}' to attach an attention "
                                    "transform to") from None
        attach(self.run.model, self.run.full_name(self.name, name), transform)

    def leave_weights_to_later(self) -> bool:
        return self.run.weights_quantized_later()

    def request_propagation(self, mode: Propagation) -> None:
        if mode not in PROPAGATIONS:
            raise ConfigError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {mode!r}")
        if mode == "float" and self._float_outputs is None and self.inputs is not None:
            raise CalibrationError(f"block {self.name}: float propagation needs the float outputs; return "
                                   "Needs(float_outputs=True) from the quantizer's needs()")
        self.propagation = mode

    # -- statistics -------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, names: Sequence[str], observer: str, *, stop_early: bool = True,
                **options: Any) -> dict[str, Any]:
        """See :meth:`qcore.plugin.BlockContext.observe`. Observers see what the weight multiplies:
        the input after the linear's input transform, if it carries one. With ``stop_early`` each batch's forward
        is cut off once every named linear was reached (q/k/v need almost none of the block);
        sets holding MoE experts always run the whole block, since an expert may get no tokens."""
        spec = observer_spec(observer)
        if spec.where == "grad":
            return self._grad_results(names, observer)
        inputs = self._require_inputs(f"observe('{observer}')")
        factory = spec.load_factory()
        obs = {n: factory(self.linear(n), **options) for n in names}
        experts = any(n in self.info.linears and self.info.linears[n].expert is not None for n in names)
        stop = stop_early and not experts
        pending: set[str] = set()

        def make_hook(lname: str):
            def pre(module: nn.Module, args: tuple) -> None:
                obs[lname].update(as_rows(weight_input(module, args[0])), None)
                done(lname)

            def post(module: nn.Module, args: tuple, out: Tensor) -> None:
                obs[lname].update(as_rows(weight_input(module, args[0])), as_rows(out))
                done(lname)
            return pre if spec.where == "input" else post

        def done(lname: str) -> None:
            pending.discard(lname)
            if stop and not pending:
                raise StopForward

        handles = [self.linear(n).register_forward_pre_hook(make_hook(n)) if spec.where == "input"
                   else self.linear(n).register_forward_hook(make_hook(n)) for n in names]
        try:
            for i in range(len(inputs)):
                pending.update(names)
                try:
                    self.call(i)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        for n, o in obs.items():
            combine_observer(o, observer)
        results = {n: o.result() for n, o in obs.items()}
        for n, result in results.items():
            bad = first_nonfinite(result)
            if bad is not None:
                where = next((w for i in range(len(inputs)) if (w := _first_nonfinite_module(self, i))), None)
                raise NonFiniteError(
                    f"the '{observer}' statistic of {self.run.full_name(self.name, n)} holds non-finite values "
                    f"({bad[1]}{', at ' + bad[0] if bad[0] else ''}): its inputs on the calibration text "
                    f"overflow or are NaN{', first at the output of ' + where if where else ''}; {_ACTIVATION_FIX}")
        return results

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        return all_reduce(tensor, op)

    def _grad_results(self, names: Sequence[str], observer: str) -> dict[str, Any]:
        out = {}
        for n in names:
            full = self.run.full_name(self.name, n)
            stats = self.run.grad_stats.get(full, {})
            if observer not in stats:
                raise CalibrationError(f"no '{observer}' result for {full}: list it in "
                                       "Needs(gradients=True, gradient_observers=(...)) of the quantizer's needs()")
            out[n] = stats[observer]
        return out


# -- the run -----------------------------------------------------------------------------------------
WEIGHT_ERROR_DIGITS = 6


class BlockStream(Protocol):
    """Where a streamed run's block weights come from and its finished blocks go
    (:mod:`qcore.pipeline.stream`): the model's blocks stay on the meta device until their turn."""

    def begin(self, run: RunContext) -> tuple[int, list[Tensor] | None]:
        """Called after ``prepare``: the first block to process and, when it is not block 0, its
        input activations kept by an interrupted run (the blocks before it are done)."""

    def captured(self) -> None:
        """The capture pass is over (the embeddings may be freed)."""

    def load_block(self, index: int, binfo: BlockInfo) -> None:
        """Materialize block ``index``'s weights before its turn."""

    def finish_block(self, index: int, binfo: BlockInfo, hidden: list[Tensor] | None) -> None:
        """Block ``index`` is done; ``hidden`` are the next block's inputs."""


@torch.no_grad()
def relative_weight_error(weight: Tensor, dequantized: Tensor) -> float:
    """``||W - Q||_F / ||W||_F`` of a linear's float weight and the dequantized weight that replaces
    it, as stored (recorded per layer as ``record["weight_error"]``; ``qcore info --plot`` draws it)."""
    w = weight.detach().float()
    diff = dequantized.to(w.device, torch.float32) - w
    return round(float(diff.norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny)), WEIGHT_ERROR_DIGITS)


def _new_record() -> dict[str, Any]:
    from qcore import __version__

    return {"format": "qcore", "format_version": 1, "chain": [], "modules": {}, "calibration": None,
            "qcore_version": __version__}


def _chain_entry(q: Quantizer) -> dict[str, Any]:
    return {"method": q.spec.name, "plugin": q.spec.plugin, "version": q.spec.version,
            "config": q.config.to_json_dict()}


def combine_needs(chain: Sequence[Quantizer], propagate: Propagation | None = None) -> Needs:
    """The chain's needs as one: any quantizer's request counts; two propagation modes conflict.

    ``propagate`` is the caller's choice (``qcore.quantize(..., propagate=...)``), checked too."""
    wanted = {q.spec.name: q.needs() for q in chain}
    modes = {name: n.propagation for name, n in wanted.items() if n.propagation is not None}
    if propagate is not None:
        if propagate not in PROPAGATIONS:
            raise ConfigError(f"propagate must be one of {', '.join(PROPAGATIONS)}, got '{propagate}'")
        modes = {"propagate=": propagate, **modes}
    if len(set(modes.values())) > 1:
        said = ", ".join(f"{k} {v}" if k.endswith("=") else f"{k} needs {v}" for k, v in modes.items())
        raise ConfigError(f"the chain asks for conflicting propagation ({said}); run the methods separately")
    mode = next(iter(modes.values()), None)
    return Needs(
        float_outputs=any(n.float_outputs for n in wanted.values()) or mode == "float",
        gradients=any(n.gradients or n.gradient_observers for n in wanted.values()),
        gradient_observers=tuple(dict.fromkeys(o for n in wanted.values() for o in n.gradient_observers)),
        propagation=mode,
    )


def _as_calibration(calibration: Any) -> CalibrationData | None:
    if isinstance(calibration, Tensor):  # ready token ids [n, seq_len]
        from qcore.data import CalibrationData

        ids = calibration.long() if calibration.dim() == 2 else calibration.long().reshape(1, -1)
        return CalibrationData(ids, {"source": "token ids", "n_samples": ids.shape[0], "seq_len": ids.shape[1]})
    return calibration


def run_chain(model: nn.Module, quantizers: Sequence[Quantizer], calibration: CalibrationData | Tensor | None = None,
              propagate: Propagation | None = None, device: torch.device | str | None = None,
              batch_size: int = 8, stream: BlockStream | None = None) -> RunContext:
    """Run a chain of quantizers over ``model`` in one block-by-block pass (changes it in place).

    ``calibration``: a ``CalibrationData`` or token ids ``[n, seq_len]`` (``None`` for
    calibration-free chains: each ``process_block`` then sees ``block.inputs is None``).
    ``propagate``: feed each block the outputs of the already-quantized previous blocks
    (``"quantized"``, the default) or of the float model (``"float"``); a method may ask for one
    through its ``needs()``. ``device``: where each block runs during its turn (e.g. ``"cuda"``);
    the model stays where it is otherwise. ``batch_size``: calibration windows per forward.
    ``stream``: a :class:`BlockStream` that loads each block before its turn and takes it after
    (models larger than memory; resumed runs start at the block it names).
    The quantization record is kept in ``model.qcore_record`` (returned as ``run.record``).
    """
    from qcore.arch.introspect import inspect_model

    chain = list(quantizers)
    needs = combine_needs(chain, propagate)
    bad_weights = nonfinite_tensors(model)
    if bad_weights:
        raise NonFiniteError(f"non-finite values in the model's weights: {', '.join(bad_weights[:4])}"
                             f"{' and more' if len(bad_weights) > 4 else ''}; repair or re-download the float model")
    calibration = _as_calibration(calibration)
    if calibration is None:
        need = [q.spec.name for q in chain if q.spec.capabilities.needs_calibration]
        if need or needs.gradients:
            raise CalibrationError(
                f"method(s) {', '.join(need) or 'of this chain'} need calibration data; pass calibration (see "
                "qcore.data.get_calibration; no source uses the built-in default text)"
            )
    check_chain([q.spec for q in chain], needs.gradients, stream is not None)
    rank, size = world()
    if calibration is not None and size > 1:
        calibration = shard(calibration, rank, size)
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
                     record=record, needs=needs)
    try:
        for pos, q in enumerate(chain):
            run.position = pos
            q.prepare(run)
        run.info = info = inspect_model(model)  # prepare may have changed modules
        if needs.gradients:
            from qcore.pipeline.gradients import gradient_pass

            start = time.perf_counter()
            run.gradients, run.grad_stats = gradient_pass(model, info, calibration, needs.gradient_observers,
                                                          batch_size)
            for what, value in (("the gradient of the loss at the output of block", run.gradients),
                                ("the gradient statistics of", run.grad_stats)):
                bad = first_nonfinite(value)
                if bad is not None:
                    raise NonFiniteError(f"{what} {bad[0]} holds non-finite values ({bad[1]}) on the calibration "
                                         f"text; {_ACTIVATION_FIX}")
            record["gradient_pass_seconds"] = round(time.perf_counter() - start, 3)

        start_block, resumed = stream.begin(run) if stream is not None else (0, None)
        hidden: list[Tensor] | None = None
        templates: list[Inputs] | None = None
        if calibration is not None:
            hidden, templates = capture_inputs(model, info, calibration, batch_size, store_device=dev)
            bad = first_nonfinite(hidden)
            if bad is not None:
                raise NonFiniteError(f"the input of the first block {info.blocks[0].name} holds non-finite values "
                                     f"({bad[1]}) on calibration batch {bad[0].strip('[]')}; {_ACTIVATION_FIX}")
            if resumed is not None:
                hidden = [h.to(dev) if dev is not None else h for h in resumed]
        if stream is not None:
            stream.captured()

        pbar = bar(len(info.blocks), desc="qcore blocks", unit="block")
        pbar.update(start_block)
        try:
            for i, binfo in enumerate(info.blocks):
                if i < start_block:  # finished by an interrupted run
                    if templates is not None:
                        templates[i] = []
                    continue
                pbar.set_postfix_str(binfo.name, refresh=False)
                if stream is not None:
                    stream.load_block(i, binfo)
                hidden = _process_block(run, i, binfo, hidden, templates[i] if templates else None, dev)
                if templates is not None:
                    templates[i] = []  # this block's arguments are no longer needed
                run.gradients.pop(binfo.name, None)
                if stream is not None:
                    stream.finish_block(i, binfo, hidden)
                pbar.update(1)
        finally:
            pbar.close()
        del hidden, templates

        for pos, q in enumerate(chain):
            run.position = pos
            q.finalize(run)
        for q in chain:
            entry = _chain_entry(q)
            extra = q.record()
            if extra:
                entry["record"] = extra
            record["chain"].append(entry)
    finally:
        if config is not None and old_use_cache is not None:
            config.use_cache = old_use_cache
        model.train(was_training)
    return run


def _check_outputs(block: BlockContext, outputs: list[Tensor] | None, kind: str) -> None:
    """Refuse non-finite block outputs, naming the module where they first appear."""
    bad = first_nonfinite(outputs or [])
    if bad is None:
        return
    batch = int(bad[0].strip("[]"))
    where = _first_nonfinite_module(block, batch)
    at = f", first at the output of {where}" if where else ""
    what = f"the {kind} block" if kind else "the block"
    raise NonFiniteError(f"non-finite activations ({bad[1]}) in the output of {what} {block.name} on calibration "
                         f"batch {batch}{at}; {_ACTIVATION_FIX}")


@torch.no_grad()
def _first_nonfinite_module(block: BlockContext, batch: int) -> str | None:
    """The first submodule of ``block`` (in the order they finish) whose output is not finite."""
    found: list[str] = []

    def hook(name: str):
        def after(module: nn.Module, args: tuple, out: Any) -> None:
            if not found and first_nonfinite(out if isinstance(out, (Tensor, tuple, list)) else None) is not None:
                found.append(f"{block.run.full_name(block.name, name)} ({type(module).__name__})")
        return after

    handles = [m.register_forward_hook(hook(n)) for n, m in block.module.named_modules() if n]
    try:
        block.call(batch)
    except Exception:  # only a diagnosis: the caller raises the real error
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


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
    home = module_device(module)
    if device is not None and device != home:
        module.to(device)
    try:
        inputs = block_inputs(hidden, template, device) if hidden is not None and template is not None else None
        del hidden  # the caller's list is replaced by this block's outputs below
        block = BlockContext(index, binfo, run, inputs)
        if run.needs.float_outputs:
            block._compute_float_outputs()
            _check_outputs(block, block._float_outputs, "float")
        for pos, q in enumerate(run.chain):
            run.position = pos
            q.process_block(block)
        if inputs is None:
            return None
        if block.propagation == "float":
            nxt = block.float_outputs or []
        else:
            block._float_outputs = None
            nxt = block.forward()
            _check_outputs(block, nxt, "quantized" if run.chain else "")
        block.inputs = None
        block._float_outputs = None
        return [h.detach() for h in nxt]
    finally:
        _restore_backends(module)
        if device is not None and device != home:
            module.to(home)
