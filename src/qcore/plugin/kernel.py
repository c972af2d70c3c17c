"""The kernel-backend extension point: how ``QuantLinear`` runs its matmul. No torch import.

A backend is registered through ``qcore_register_backends(register)``. ``QuantLinear`` picks one
per call: the forced one (``.backend`` or ``QCORE_QLINEAR_BACKEND``), else, for ``"auto"``, the
first backend in descending ``priority`` that lists the device type and whose ``why_not`` is None.

``QuantLinear`` calls ``build`` once and caches the pack (rebuilt when the backend, the device or,
for a ``per_dtype`` backend, the activation dtype changes). It applies its ``input_transform`` and,
unless the backend has ``quantizes_act``, fake-quantizes the activations before ``mm``; it adds the
bias after. What :meth:`KernelBackend.holds` names is released from the layer's buffers while the
pack lives and rebuilt with :meth:`KernelBackend.recover` when the buffers are read, saved or moved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor, device, dtype
    from torch.nn import Module

HELD: tuple[str, ...] = ("codes", "scales", "zeros")
"""What a pack may hold exactly: the uint8 ``[out, in]`` codes (the ``qweight`` buffer, unpacked)
and the ``scales`` and ``qzeros`` buffers ``[out, n_groups]``."""


@runtime_checkable
class KernelBackend(Protocol):
    """One way of computing ``x @ w_hat.T`` for a ``QuantLinear`` (one module per backend)."""

    name: str
    """Unique name (``int4_cpu``); what ``.backend`` and ``QCORE_QLINEAR_BACKEND`` take."""
    devices: tuple[str, ...]
    """Device types ``auto`` tries it on (``"cpu"``, ``"cuda"``; ``"*"``: any)."""
    priority: int
    """``auto`` tries backends of higher priority first; 0 or less: never chosen by ``auto``."""
    autograd: bool
    """``mm`` is differentiable in ``x``; when False, ``QuantLinear`` runs it without autograd and
    back-propagates ``grad @ w_hat`` (the weight dequantized in each backward)."""
    quantizes_act: bool
    """``mm`` quantizes the activations itself (from ``layer.act``, which ``why_not`` checks); when
    False, ``QuantLinear`` fake-quantizes ``x`` with ``layer.act`` first."""
    per_dtype: bool
    """The pack depends on the activation dtype ``build`` receives (rebuilt when it changes)."""

    def why_not(self, layer: Module, device: device) -> str | None:
        """Why this backend cannot run ``layer`` on ``device``, in one line (None when it can)."""

    def build(self, layer: Module, dtype: dtype, device: device) -> Any:
        """The run-time pack from the layer's stored codes, scales and zeros: a tensor, or an
        object whose tensor attributes ``QuantLinear.resident_bytes`` counts (None: no pack)."""

    def mm(self, x: Tensor, pack: Any, layer: Module) -> Tensor:
        """``x [M, in] -> [M, out]`` in ``x``'s dtype (bias excluded)."""

    def holds(self, pack: Any, layer: Module) -> tuple[str, ...]:
        """Which of :data:`HELD` ``pack`` holds exactly (equal to the layer's stored values)."""

    def recover(self, pack: Any, layer: Module, what: str) -> Tensor:
        """``what`` (one that :meth:`holds` names) rebuilt from ``pack``: uint8 codes, or scales
        or zeros in ``layer.scale_dtype``, equal to what the layer stored."""
