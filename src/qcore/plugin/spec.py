"""Method specs: what a plugin registers. Importing this module never imports torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from qcore.plugin.config import QuantConfig

def load_ref(ref: Any) -> Any:
    """The object a ``"module:attr.path"`` string names (imported now), or ``ref`` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


RESERVED_OPTIONS: tuple[str, ...] = ("config", "calibration", "tokenizer", "n_samples", "seq_len", "seed",
                                    "propagate", "device", "check", "budget_bits", "budget_bytes",
                                    "budget_candidates", "budget_criterion")
"""Keyword arguments of ``qcore.quantize`` itself: a method option of one of these names could never
be set, so a config declaring one is refused when its plugin registers."""


Kind = Literal["weight-only", "transform", "reconstruction", "adapter"]
KINDS: tuple[str, ...] = ("weight-only", "transform", "reconstruction", "adapter")
WEIGHT_KINDS: tuple[str, ...] = ("weight-only", "reconstruction")
"""Kinds of methods that quantize weights (a transform before them leaves the weights to them)."""


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; the compatibility matrix is built from these.

    kind: weight-only (GPTQ, AWQ, HQQ, RTN), transform (SmoothQuant, QuaRot: change the model
    exactly, may add activation quantization, then hand weights to a weight method),
    reconstruction (AdaRound, BRECQ: gradient-based), adapter (QLoRA).
    composes_with: names of methods (or kinds, written ``kind:weight-only``) that may FOLLOW
    this one in a chain.
    """

    kind: Kind
    weight_bits: tuple[int, ...] = ()
    activation_bits: tuple[int, ...] = ()
    needs_calibration: bool = False
    trains: bool = False
    composes_with: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ("*",)
    group_sizes: tuple[int, ...] = (-1, 32, 64, 128)
    notes: tuple[str, ...] = ()
    chain_options: tuple[tuple[str, str], ...] = ()
    """(own option, option of the weight method that follows it in a chain): an own option given
    explicitly also sets the follower's (SmoothQuant's ``w_bits`` is the next method's ``bits``)."""
    distributed: bool = False
    """True for a method whose statistics are combined across processes when several share the
    calibration windows (torchrun): it reads them through observers and ``BlockContext.all_reduce``
    only, and takes the same decisions in every process. Others are refused under torchrun."""
    takes_quantized: bool = False
    """True only for a method written to run on a model that already holds quantized layers (a
    qcore checkpoint, bitsandbytes layers, a model quantized before in this process); for every
    other method ``qcore.quantize`` and ``qcore.check`` refuse such a model."""

    @property
    def quantizes_weights(self) -> bool:
        """Whether methods of this kind put weights on an integer grid themselves."""
        return self.kind in WEIGHT_KINDS


@dataclass(frozen=True)
class MethodSpec:
    """One quantization method.

    quantizer: "module:attr" of a class implementing :class:`qcore.plugin.protocol.Quantizer`,
    imported only when the method runs (it may import torch); or the class itself.
    """

    name: str
    summary: str
    config_cls: type[QuantConfig]
    quantizer: str | type
    capabilities: Capabilities
    plugin: str = field(default="", compare=False)
    distribution: str = field(default="", compare=False)
    version: str = field(default="", compare=False)

    def load_quantizer(self) -> type:
        """Import and return the quantizer class."""
        return load_ref(self.quantizer)

    def composes_before(self, other: MethodSpec) -> bool:
        """Whether ``other`` may follow this method in a chain."""
        allowed = self.capabilities.composes_with
        return other.name in allowed or f"kind:{other.capabilities.kind}" in allowed


ObserverWhere = Literal["input", "output", "grad"]


@dataclass(frozen=True)
class ObserverSpec:
    """A statistic a method gathers per linear with ``block.observe(names, name)``.

    factory: "module:attr" (imported on first use; may import torch) or the callable itself,
    called as ``factory(linear, **options)`` once per linear and run; it returns an object with
    ``update(x, y)`` and ``result()``. ``where`` says what ``update`` receives: ``"input"``: the
    linear's input ``x`` [tokens, in] (``y`` None); ``"output"``: its input and output
    [tokens, out]; ``"grad"``: its input and the gradient of the model's loss with respect to its
    output, during the run's gradient pass (``Needs.gradient_observers``).
    """

    name: str
    summary: str
    factory: str | Callable[..., Any]
    where: ObserverWhere = "input"
    plugin: str = field(default="", compare=False)

    def load_factory(self) -> Callable[..., Any]:
        """Import and return the observer factory."""
        return load_ref(self.factory)
