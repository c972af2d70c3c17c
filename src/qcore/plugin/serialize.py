"""The module-serializer extension point: modules other than torch's own in a checkpoint. No torch.

A checkpoint stores tensors in safetensors (the model's state dict) and, per module of a
registered type, the JSON its serializer writes (``config.json`` -> ``quantization_config`` ->
``modules`` -> ``{name: {"type": type_name, **to_json(module)}}``, plus ``"plugin"`` and
``"distribution"`` so that a checkpoint loaded without the plugin names what to install).
Loading builds the model from its config on the meta device, rebuilds each such module empty
from its JSON (parents before children) and sets it in place, then assigns the tensors: no pickle.

Every module of a registered type is saved this way wherever it sits: replacing a torch module
(``QuantLinear`` for ``nn.Linear``), wrapping one, or as the child of another serialized module
(a ``QuantLinear``'s ``input_transform``).

A module whose state dict is not made of plain parameters and buffers (a weight that must be
rebuilt from packed data and quantization statistics, such as bitsandbytes' 4-bit ``Params4bit``)
gives its serializer a :meth:`LoadsTensors.load_tensors` method: the loader hands it the tensors
stored under the module's name instead of assigning them itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Module

RESERVED_KEYS: tuple[str, ...] = ("type", "plugin", "distribution")
"""Keys of a ``modules`` entry that qcore writes; :meth:`ModuleSerializer.to_json` must not use
them (and :meth:`ModuleSerializer.build` does not receive them)."""


@runtime_checkable
class ModuleSerializer(Protocol):
    """Saves and rebuilds one module type (``QuantLinear``, an online rotation, ...)."""

    type_name: str
    """Unique, stable name written in the checkpoint (``"qcore.quant_linear"``, ``"quarot.hadamard"``)."""
    module_type: type
    """The class it serializes (exact type; subclasses register their own serializer)."""

    def to_json(self, module: Module) -> dict[str, Any]:
        """JSON-able description from which :meth:`build` makes an empty module of the same shape
        (plain numbers, strings, lists and dicts; none of :data:`RESERVED_KEYS`)."""

    def build(self, data: dict[str, Any], device: Any) -> Module:
        """An empty module ready for ``load_state_dict(..., assign=True)``: the tensors of its
        state dict on ``device`` (``"meta"`` when loading), its non-persistent buffers computed
        (they are not stored). Children of types with their own serializer are rebuilt and set
        afterwards; any other child must be built here. A ``post_load()`` method, when the
        module has one, is called once its tensors are assigned.

        Optional: a serializer may also have :meth:`LoadsTensors.load_tensors`."""


@runtime_checkable
class LoadsTensors(Protocol):
    """The optional part of a :class:`ModuleSerializer`: assigns a module's tensors itself.

    Loading then gives each module rebuilt by such a serializer every stored tensor whose name
    starts with the module's name (names relative to the module: ``weight``, ``weight.absmax``,
    ``lora_A.default.weight``), except those below a descendant that is itself rebuilt by a
    serializer with ``load_tensors`` (that one gets them). These tensors are left out of the
    generic ``load_state_dict(..., assign=True)`` and of its missing/unexpected checks; they are on
    the loading device. ``load_tensors`` runs after the generic assignment, parents before
    children, and before ``.to(device)``, the ``dtype`` cast and ``post_load()``.
    """

    def load_tensors(self, module: Module, tensors: dict[str, Tensor]) -> None:
        """Assign ``tensors`` (this module's own, names relative to it) to ``module`` in place, and
        raise (any exception; qcore reports it as a CheckpointError naming the module) when one it
        needs is missing or one is not its own. Every tensor of the module must be off the meta
        device afterwards."""
