"""Which module types a checkpoint stores as JSON + tensors, and how (module serializers).

Every serializer comes through the hook ``qcore_register_serializers``
(:class:`qcore.plugin.serialize.ModuleSerializer`): qcore's own (:class:`QuantLinearSerializer`,
``TransformedLinear``'s) from its built-in plugin module :mod:`qcore.builtins`, like any plugin's.
A type is matched exactly: a subclass needs its own serializer.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from qcore.checkpoint.format import QUANT_LINEAR_TYPE
from qcore.plugin.serialize import ModuleSerializer
from qcore.progress import get_logger

log = get_logger("io")

HOOK = "qcore_register_serializers"
QCORE_DISTRIBUTION = "qcore-quant"
"""The distribution of qcore itself: its serializers need no provenance in a checkpoint."""
Table = dict[str, ModuleSerializer]
"""Serializers by type name."""


class QuantLinearSerializer:
    """``QuantLinear``: JSON is :meth:`QuantLinear.meta`, rebuilt with :meth:`QuantLinear.from_meta`."""

    type_name = QUANT_LINEAR_TYPE

    @property
    def module_type(self) -> type[nn.Module]:
        from qcore.quant.linear import QuantLinear  # not at import: qcore.quant imports this package

        return QuantLinear

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return module.meta()  # type: ignore[operator]

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return self.module_type.from_meta(data, device)  # type: ignore[attr-defined]


def serializers() -> Table:
    """Every registered serializer by type name (qcore's own and those of working plugins)."""
    from qcore.registry import extensions

    table: Table = {}
    for name, s in extensions(HOOK).items():
        if not isinstance(s, ModuleSerializer):
            log.warning("plugin %s registered %s as serializer %r, which lacks type_name, module_type, "
                        "to_json or build; ignored", getattr(s, "plugin", "?"), type(s).__name__, name)
            continue
        table[name] = s
    return table


def serializer_named(type_name: str, table: Table | None = None) -> ModuleSerializer | None:
    """The serializer written as ``type_name`` in a checkpoint, or None when none is installed."""
    return (serializers() if table is None else table).get(type_name)


def serializer_for(module: nn.Module, table: Table | None = None) -> ModuleSerializer | None:
    """The serializer of ``module``'s exact type, or None (a module the model's config rebuilds)."""
    table = serializers() if table is None else table
    return next((s for s in table.values() if type(module) is s.module_type), None)


def provenance(serializer: ModuleSerializer) -> dict[str, str]:
    """``plugin`` and ``distribution`` of a plugin's serializer (empty for qcore's own)."""
    from qcore.registry import get_registry

    plugin = str(getattr(serializer, "plugin", "") or "")
    info = get_registry().plugins.get(plugin)
    if info is None or info.distribution == QCORE_DISTRIBUTION:
        return {}
    found = {"plugin": plugin, "distribution": info.distribution}
    return {k: v for k, v in found.items() if v}
