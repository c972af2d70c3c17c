"""The plugin hooks. A plugin module implements them with ``@qcore.hookimpl``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from qcore.plugin.spec import MethodSpec

PROJECT = "qcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Register quantization methods: call ``register(spec)`` once per method.

    Keep this cheap: no torch import here (``qcore list`` must stay light). Put heavy imports
    in the module named by ``spec.quantizer``, which qcore imports only when the method runs.
    """
