"""How the core drives a method over a model: the ``Quantizer`` protocol and the contexts it sees.

The engine runs a chain of quantizers in ONE pass over the model:

1. ``needs()`` of each quantizer, once: what the pass must provide (float outputs per block, a
   gradient pass, a propagation mode); conflicting needs are refused before any work;
2. ``prepare(run)`` for each quantizer, in chain order (whole-model changes: rotations, adapters);
3. with ``Needs.gradients``, one gradient pass of the model's loss over the calibration text;
4. for each decoder block, for each quantizer in chain order, ``process_block(block)``: statistics
   with ``block.observe``, exact transforms, quantized linears with ``block.quantize_linear``,
   requests (activation quantization, input transforms, leaving weights to a later method); the
   engine then computes the block's output for the next block;
5. ``finalize(run)`` for each quantizer; ``record()`` is saved with the checkpoint.

:class:`RunContext` and :class:`BlockContext` are what the engine hands a quantizer; they are
protocols here and implemented by ``qcore.pipeline.engine``. Importing this module never imports
torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Module

    from qcore.arch.introspect import BlockInfo, ModelInfo
    from qcore.plugin.config import LayerPrecision, QuantConfig
    from qcore.plugin.spec import MethodSpec
    from qcore.quant.act import ActQuant
    from qcore.quant.primitives import QuantizedWeight

Propagation = Literal["quantized", "float"]
PROPAGATIONS: tuple[str, ...] = ("quantized", "float")
Inputs = list  # list[tuple[tuple, dict]]: a block's captured positional and keyword arguments per batch


@dataclass(frozen=True)
class Needs:
    """What a quantizer needs from the pass, declared once before it starts."""

    float_outputs: bool = False
    """``block.float_outputs``: each block's outputs before the chain changed it (one extra
    forward per block)."""
    gradients: bool = False
    """A gradient pass before the block pass: the model's loss on the calibration windows is
    back-propagated once; ``block.output_gradients()`` and ``"grad"`` observers read it."""
    gradient_observers: tuple[str, ...] = ()
    """Observers (of kind ``"grad"``) run on every quantizable linear during the gradient pass."""
    propagation: Propagation | None = None
    """What the next block receives: the outputs of the quantized block (``"quantized"``, GPTQ's
    sequential protocol) or of the float block (``"float"``); None: no preference."""


@runtime_checkable
class RunContext(Protocol):
    """One run of a chain over a model (what ``prepare`` and ``finalize`` see)."""

    model: Module
    info: ModelInfo
    chain: Sequence[Quantizer]
    position: int
    """Index of the quantizer being called in ``chain``."""
    calibration: Any
    """The ``qcore.data.CalibrationData`` (None for calibration-free chains)."""
    device: Any
    record: dict[str, Any]
    """``model.qcore_record``: saved with the checkpoint (JSON-able values only)."""

    def later_methods(self) -> list[MethodSpec]:
        """Specs of the methods after the current one in the chain."""

    def weights_quantized_later(self) -> bool:
        """Whether a later method of the chain quantizes weights."""

    def full_name(self, block_name: str, name: str) -> str:
        """The model-level name of a block's module."""


@runtime_checkable
class BlockContext(Protocol):
    """One decoder block during the pass: its inputs, statistics, module surgery and requests."""

    index: int
    name: str
    """Full name (``model.layers.3``)."""
    module: Module
    info: BlockInfo
    run: RunContext
    inputs: Inputs | None
    """Captured calibration arguments per batch (None without calibration data)."""

    # -- running the block ---------------------------------------------------------------------
    def call(self, i: int, hidden: Tensor | None = None) -> Tensor:
        """Run the block on batch ``i`` (or on ``hidden`` with batch ``i``'s other arguments)."""

    def forward(self) -> list[Tensor]:
        """The block's outputs now, one tensor per batch (no grad)."""

    def hidden_inputs(self) -> list[Tensor]:
        """The hidden states entering the block, one tensor per batch."""

    @property
    def float_outputs(self) -> list[Tensor] | None:
        """The block's outputs before the chain changed it (``Needs.float_outputs``)."""

    def output_gradients(self) -> list[Tensor]:
        """Per batch, the gradient of the model's loss with respect to this block's output, from
        the float model (``Needs.gradients``)."""

    def module_calls(self, name: str) -> list[tuple[tuple, dict]]:
        """The arguments the block's submodule ``name`` was called with, per batch (one forward)."""

    def call_module(self, name: str, calls: Sequence[tuple[tuple, dict]]) -> list[Tensor]:
        """Run submodule ``name`` on recorded ``calls``; its hidden-state output per call."""

    # -- statistics ----------------------------------------------------------------------------
    def observe(self, names: Sequence[str], observer: str, *, stop_early: bool = True,
                **options: Any) -> dict[str, Any]:
        """Run a registered observer on the named linears over the calibration inputs (or, for a
        ``"grad"`` observer, read its result from the gradient pass): ``{name: result}``.
        ``options`` go to the observer's constructor."""

    # -- modules -------------------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, op: Literal["sum", "max"] = "sum") -> Tensor:
        """Combine ``tensor`` (in place) across the processes that share the calibration windows
        (its sum or maximum; unchanged in one process). Every process must call it alike; a method
        whose own sums over the calibration data go through it can declare
        ``Capabilities(distributed=True)``."""

    def linear(self, name: str) -> Module:
        """The linear (float or quantized) at block-relative ``name``."""

    def quantizable(self, config: QuantConfig | None = None) -> list[str]:
        """Linears a weight method should quantize, in block order (routers, ignored and
        already-quantized linears excluded)."""

    def precision(self, name: str, config: QuantConfig) -> LayerPrecision:
        """Bits, group size and symmetry ``config`` gives linear ``name`` (per-layer maps)."""

    def quantize_linear(self, name: str, qw: QuantizedWeight) -> Module:
        """Replace linear ``name`` by a packed ``QuantLinear`` holding ``qw`` (keeping its bias,
        requested activation quantization and input transform)."""

    # -- requests ------------------------------------------------------------------------------
    def request_activation_quant(self, name: str, act: ActQuant) -> None:
        """Quantize linear ``name``'s input at run time (kept when a later method quantizes it)."""

    def set_input_transform(self, name: str, transform: Module) -> None:
        """Apply ``transform`` (a module with a registered serializer) to linear ``name``'s input,
        before its kernel; saved with the checkpoint."""

    def set_attention_transform(self, name: str, transform: Module) -> None:
        """Attach ``transform`` (a module with a registered serializer) to the attention module
        ``name``: it maps ``(query, key, value) -> (query, key, value)`` (``[batch, heads, tokens,
        head_dim]``, after RoPE and the KV-cache update) right before the attention kernel, through
        transformers' attention interface; saved with the checkpoint and re-attached by ``qcore.load``."""

    def leave_weights_to_later(self) -> bool:
        """Ask to leave this block's weights to a later method of the chain: True when one will
        quantize them (leave them in float, transformed as you need), False when none will (then
        quantize them yourself)."""

    def request_propagation(self, mode: Propagation) -> None:
        """Hand the next block this block's float (``"float"``, needs ``Needs.float_outputs``)
        or quantized outputs."""


@runtime_checkable
class Quantizer(Protocol):
    """What a method's ``spec.quantizer`` class implements (constructed as ``cls(config, spec)``)."""

    config: QuantConfig
    spec: MethodSpec

    def needs(self) -> Needs:
        """What the pass must provide (called once, before ``prepare``)."""

    def prepare(self, run: RunContext) -> None:
        """Change the whole model before the block pass (may be a no-op)."""

    def process_block(self, block: BlockContext) -> None:
        """Calibrate and change one decoder block."""

    def finalize(self, run: RunContext) -> None:
        """Finish after every block was processed (may be a no-op)."""

    def record(self) -> dict[str, Any]:
        """JSON-able metadata saved with the checkpoint (timings, per-layer choices); a list of
        strings under ``"info"`` is printed by ``qcore info``, one line each."""


@runtime_checkable
class Trainer(Protocol):
    """Adapter methods (``Capabilities.trains``): ``qcore.finetune`` calls this."""

    def finetune(self, model: Module, data: Any, **kwargs: Any) -> Any:
        """Train the adapters of ``model`` on ``data``."""


class BaseQuantizer:
    """Convenience base: stores config and spec; no needs, no-op hooks, empty record."""

    def __init__(self, config: QuantConfig, spec: MethodSpec) -> None:
        self.config = config
        self.spec = spec

    def needs(self) -> Needs:
        return Needs()

    def prepare(self, run: RunContext) -> None:
        return None

    def process_block(self, block: BlockContext) -> None:
        return None

    def finalize(self, run: RunContext) -> None:
        return None

    def record(self) -> dict[str, Any]:
        return {}
