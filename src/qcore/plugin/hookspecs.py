"""The plugin hooks. A plugin module implements any of them with ``@qcore.plugin.hookimpl``.

Every hook receives a ``register`` callback and calls it once per thing it contributes; built-in
methods, observers, serializers and kernel backends are registered through these same hooks by
qcore's own entry points. A hook that raises marks its plugin as failed (``qcore plugins`` shows
the error) and the other plugins keep working.

``qcore_register_methods`` must stay cheap and import no torch (``qcore list`` runs it); the
other hooks are called only when their registry is first needed (torch is loaded by then), and
may import the modules holding their implementations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from qcore.plugin.kernel import KernelBackend
    from qcore.plugin.serialize import ModuleSerializer
    from qcore.plugin.spec import MethodSpec, ObserverSpec

PROJECT = "qcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Register quantization methods: call ``register(spec)`` once per method.

    No torch import here: put heavy imports in the module named by ``spec.quantizer``, which
    qcore imports only when the method runs.
    """


@hookspec
def qcore_register_observers(register: Callable[[ObserverSpec], None]) -> None:
    """Register statistics a method can gather per linear (``block.observe(names, [name])``):
    call ``register(spec)`` once per observer. An observer sees a linear's input, its output, or
    (after the run's gradient pass) its input and the gradient of the model's loss with respect to
    its output. The built-in ``hessian``, ``absmax``, ``absmean`` and ``inputs`` come this way.
    """


@hookspec
def qcore_register_serializers(register: Callable[[ModuleSerializer], None]) -> None:
    """Register how a module type is written to a checkpoint and rebuilt from it: call
    ``register(serializer)`` once per type. The module's tensors go to safetensors through its
    state dict; the serializer supplies the JSON that rebuilds the empty module (and, optionally,
    ``load_tensors`` for tensors that are not plain parameters or buffers). ``QuantLinear``, the
    input transforms a method puts in front of a linear, and QLoRA's 4-bit layers are saved this way.
    """


@hookspec
def qcore_register_backends(register: Callable[[KernelBackend], None]) -> None:
    """Register kernel backends for ``QuantLinear``: call ``register(backend)`` once per backend.
    A backend says when it can run a layer (and why not), builds its pack from the stored codes,
    runs the matmul, and recovers what its pack holds exactly.
    """
