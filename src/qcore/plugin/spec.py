"""Method specs: what a plugin registers. Importing this module never imports torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from qcore.plugin.config import QuantConfig

Kind = Literal["weight-only", "transform", "reconstruction", "adapter"]
KINDS: tuple[str, ...] = ("weight-only", "transform", "reconstruction", "adapter")


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
        if not isinstance(self.quantizer, str):
            return self.quantizer
        module, _, attr = self.quantizer.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def composes_before(self, other: MethodSpec) -> bool:
        """Whether ``other`` may follow this method in a chain."""
        allowed = self.capabilities.composes_with
        return other.name in allowed or f"kind:{other.capabilities.kind}" in allowed
