"""The registry of ``QuantLinear``'s kernel backends (:class:`qcore.plugin.kernel.KernelBackend`).

Built in, one module each (``auto`` tries them in this order on the device types listed):

==============  ======  =====================================================================
``w8a8``        cpu,    8-bit per-channel weights with dynamic per-token int8 activations
                cuda    (``torch._int_mm`` / ``_weight_int8pack_mm``).
``int4_native`` cpu     CPUs with AVX512-BF16 and a C compiler, 1-4 bits, in_features and
                        group multiples of 32 (or per channel): qcore's own kernel, 2-3x
                        faster than ``int4_cpu`` here; from a row count measured per CPU
                        and shape, dequantize + dense matmul (:mod:`._dispatch`).
``int4_cpu``    cpu     1-4 bits, group a multiple of 32 (or per channel): torch's int4 kernel
                        (bf16 activations; 2/3-bit codes run as 4-bit codes).
``int4_cuda``   cuda    compute capability 8.0+, the same layers: torch's CUDA int4 kernel up
                        to ``INT4_CUDA_MAX_ROWS`` rows, a per-call dequantize above.
``int8_cpu``    cpu     8 bits per channel: ``_weight_int8pack_mm`` (bf16 compute).
``dense``       any     everything else: the weight dequantized once, cached dense.
``dense_bf16``  --      ``dense`` in bf16: the calibration engine's backend (never ``auto``).
``reference``   --      dequantize then matmul on every call: only when forced (tests).
==============  ======  =====================================================================

The int4 and int8 packs hold the codes (int4: also bf16 scales and integer zeros) exactly, so
``QuantLinear`` releases those buffers while the pack lives. Every backend comes through the hook
``qcore_register_backends(register)``: these from qcore's built-in plugin module
(:mod:`qcore.builtins`, via :func:`builtin_backends`), others from any plugin; a name may be
registered once.
"""
from __future__ import annotations

from collections.abc import Mapping

from qcore.plugin.errors import CompatibilityError
from qcore.plugin.kernel import KernelBackend
from qcore.progress import get_logger
from qcore.quant.backends import dense, int4_cpu, int4_cuda, int4_native, int8_cpu, w8a8
from qcore.registry import extensions

log = get_logger("qcore.quant.backends")

HOOK = "qcore_register_backends"


def builtin_backends() -> list[KernelBackend]:
    """qcore's own backends."""
    return [w8a8.BACKEND, int4_native.BACKEND, int4_cpu.BACKEND, int4_cuda.BACKEND, int8_cpu.BACKEND,
            dense.DENSE, dense.DENSE_BF16, dense.REFERENCE]


_merged: tuple[Mapping[str, object], dict[str, KernelBackend]] | None = None
_order: dict[str, tuple[KernelBackend, ...]] = {}


def backends() -> dict[str, KernelBackend]:
    """Every registered backend by name (cached while the plugin registry's answer stays the same)."""
    global _merged
    found = extensions(HOOK)
    if _merged is None or _merged[0] is not found:
        _merged = (found, _checked(found))
        _order.clear()
    return _merged[1]


def _checked(plugged: Mapping[str, object]) -> dict[str, KernelBackend]:
    out: dict[str, KernelBackend] = {}
    for name, obj in plugged.items():
        owner = getattr(obj, "plugin", "?")
        if not isinstance(obj, KernelBackend):
            log.warning("plugin %s registers kernel backend %r, which lacks parts of "
                        "qcore.plugin.KernelBackend: ignored", owner, name)
        else:
            out[name] = obj
    return out


def get_backend(name: str) -> KernelBackend:
    """The backend called ``name``."""
    found = backends()
    if name not in found:
        raise CompatibilityError(
            f"unknown QuantLinear backend {name!r}; use 'auto' or one of: {', '.join(sorted(found))}")
    return found[name]


def auto_order(device_type: str) -> tuple[KernelBackend, ...]:
    """The backends ``auto`` tries on ``device_type``: priority > 0, highest first (ties by name)."""
    found = backends()
    if device_type not in _order:
        cands = [b for b in found.values() if b.priority > 0 and (device_type in b.devices or "*" in b.devices)]
        _order[device_type] = tuple(sorted(cands, key=lambda b: (-b.priority, b.name)))
    return _order[device_type]
