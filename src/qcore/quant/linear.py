"""``QuantLinear``: a linear layer holding packed low-bit weights.

Buffers (their names and layouts are the on-disk format):

* ``qweight`` int32 ``[out, packed_words(in, bits)]``: codes packed along the input dimension
  (:mod:`qcore.quant.packing`);
* ``scales``, ``qzeros``: ``[out, n_groups]`` in ``meta()["scale_dtype"]`` (bfloat16 for 1-4
  bits with integer zero points, the int4 kernel's precision; float16 otherwise; float32 when
  float16 would lose a value);
  ``w_hat = (q - qzeros[g]) * scales[g]``;
* ``g_idx`` int32 ``[in]`` (only with act-order), ``bias`` float32 ``[out]`` (only with bias).

Backends (:mod:`qcore.quant.backends`, a registry plugins extend): ``QuantLinear.backend`` names
one, or env ``QCORE_QLINEAR_BACKEND`` forces one for every layer; ``"auto"`` picks per layer and
device the first of :func:`qcore.quant.backends.auto_order` whose ``why_not`` is None. A backend's
run-time pack is built on the first forward and cached (never saved). The buffers the pack holds
exactly (``holds``: the codes of the int4/int8 kernels, the scales and zeros when they are bf16
with integer zero points) are then released (placeholders of the same shape backed by one zero
element) and rebuilt from the pack (``recover``) when the state dict is read, the module is
moved, or ``release_cache()`` runs: resident memory is the kernel pack, not twice the weight.
Read buffers through ``state_dict()``, ``codes()``, ``scales_zeros()`` or ``dequantize_weight()``.

Gradients flow to the input through every backend (weights are frozen buffers); a kernel without
an autograd formula gets a backward that dequantizes the weight on each call.

All backends agree with ``reference`` within :data:`BACKEND_RTOL` (relative Frobenius error of
the output): the int4/int8 kernels compute in bf16.

An optional ``input_transform`` child module (e.g. a rotation) is applied to the input first,
before activation quantization and the matmul: the layer computes ``linear(T(x))``.

Activation quantization (``act``, an :class:`qcore.quant.act.ActQuant`): a backend that
``quantizes_act`` (``w8a8``: dynamic int8 with 8-bit per-channel weights) quantizes the input
itself; for every other one the input is fake-quantized first.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import CheckpointError, CompatibilityError
from qcore.plugin.kernel import KernelBackend
from qcore.progress import get_logger
from qcore.quant.act import ActQuant, fake_quant_act
from qcore.quant.backends import auto_order, backends, get_backend
from qcore.quant.packing import pack_codes, packed_words, unpack_codes
from qcore.quant.primitives import QuantizedWeight, check_bits, check_group_size, dequantize_codes

log = get_logger("qcore.quant.linear")

BACKEND_ENV = "QCORE_QLINEAR_BACKEND"
BACKEND_RTOL = 1e-2
"""Max relative error (Frobenius) of any backend's output against ``reference``."""
FORMAT = "qcore-int32-lsb-bitstream"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BUFFERS = {"codes": "qweight", "scales": "scales", "zeros": "qzeros"}
"""What a kernel pack may hold (:data:`qcore.plugin.kernel.HELD`) -> the buffer it stands in for."""
_HELD = {buffer: what for what, buffer in _BUFFERS.items()}


def backend_names() -> tuple[str, ...]:
    """What ``QuantLinear.backend`` and ``QCORE_QLINEAR_BACKEND`` take: ``"auto"`` or a backend."""
    return ("auto", *backends())


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class QuantLinear(nn.Module):
    """A linear layer with packed low-bit weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 sym: bool = False, bias: bool = True, has_g_idx: bool = False,
                 act: ActQuant | None = None, scale_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_bits(bits, sym)
        n_groups = check_group_size(in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.act = act
        self.scale_dtype = scale_dtype
        self.backend = "auto"
        """'auto' or one of backend_names(); the env var QCORE_QLINEAR_BACKEND overrides it."""
        self.release_qweight = True
        """Free the buffers a kernel pack holds exactly while it lives (rebuilt on save)."""
        words = packed_words(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(out_features, n_groups, dtype=scale_dtype, device=device))
        if has_g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.register_buffer("g_idx", None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)
        self.register_module("input_transform", None)
        self._cache: Any = None
        self._cache_key: tuple | None = None
        self._cache_backend: KernelBackend | None = None
        self._selection: tuple[tuple, KernelBackend] | None = None
        self._fast: tuple[tuple, Callable[[Tensor], Tensor]] | None = None
        """The last backend choice and what it depended on (re-checking costs per call)."""
        self._released: set[str] = set()
        """Buffers replaced by placeholders while a kernel pack holds their content exactly."""
        self._home = torch.device("cpu")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, act: ActQuant | None = None,
                       scale_dtype: torch.dtype | None = None,
                       input_transform: nn.Module | None = None) -> QuantLinear:
        """Pack a :class:`QuantizedWeight` (``input_transform``: see the module docstring).

        Scales and zeros are stored in bfloat16 for 1-4 bits with integer zero points (the int4
        kernel's own precision, so the kernel pack can stand in for them at run time), else
        float16 (float zero points such as HQQ's, 5-8 bits), float32 when float16 would lose them.
        """
        out_f, in_f = qw.shape
        if scale_dtype is None and qw.bits <= 4 and bool((qw.zeros == torch.round(qw.zeros)).all()):
            scale_dtype = torch.bfloat16
        if scale_dtype is None:
            scale_dtype = torch.float16
            s = qw.scales.float().abs()
            if bool((s > 6e4).any()) or bool(((s > 0) & (s < 6.2e-5)).any()) or bool(
                    (qw.zeros.float().abs() > 2048).any()):
                scale_dtype = torch.float32
                log.info("scales outside float16's normal range: storing them in float32")
        mod = cls(in_f, out_f, qw.bits, qw.group_size, qw.sym, bias is not None, qw.g_idx is not None,
                  act, scale_dtype, device=qw.codes.device)
        mod.qweight.copy_(pack_codes(qw.codes, qw.bits))
        mod.scales.copy_(qw.scales.to(scale_dtype))
        mod.qzeros.copy_(qw.zeros.to(scale_dtype))
        if qw.g_idx is not None:
            mod.g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.input_transform = input_transform
        return mod

    def meta(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_meta` rebuilds an empty module (the
        ``input_transform`` child is described by its own serializer)."""
        return {
            "format": FORMAT, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
            "in_features": self.in_features, "out_features": self.out_features,
            "has_g_idx": self.g_idx is not None, "has_bias": self.bias is not None,
            "scale_dtype": _dtype_name(self.scale_dtype),
            "act": self.act.to_dict() if self.act is not None else None,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], device: torch.device | str = "meta") -> QuantLinear:
        """An empty module (buffers on ``device``) ready for ``load_state_dict(..., assign=True)``."""
        try:
            if meta.get("format", FORMAT) != FORMAT:
                raise CheckpointError(f"unknown QuantLinear format {meta['format']!r}; expected {FORMAT!r}")
            return cls(int(meta["in_features"]), int(meta["out_features"]), int(meta["bits"]),
                       int(meta["group_size"]), bool(meta["sym"]), bool(meta["has_bias"]),
                       bool(meta["has_g_idx"]), ActQuant.from_dict(meta.get("act")),
                       _DTYPES[meta.get("scale_dtype", "float16")], device=device)
        except KeyError as exc:
            raise CheckpointError(
                f"QuantLinear metadata lacks {exc}; the checkpoint's quantization_config is "
                "incomplete or from another tool: re-save it with qcore"
            ) from None

    def extra_repr(self) -> str:
        act = f", act=A{self.act.bits}" if self.act else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}{act}")

    # -- weights -------------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """The uint8 ``[out, in]`` codes."""
        if "qweight" in self._released:
            return self._recover("codes")
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def scales_zeros(self) -> tuple[Tensor, Tensor]:
        """The stored ``(scales, qzeros)`` (rebuilt from the kernel pack while it holds them)."""
        return self._stored("scales"), self._stored("qzeros")

    def _stored(self, name: str) -> Tensor:
        return self._recovered_buffer(name) if name in self._released else self._buffers[name]

    def _recover(self, what: str) -> Tensor:
        """``what`` (codes, scales or zeros) from the kernel pack that holds it."""
        assert self._cache_backend is not None, "only a kernel pack's holdings are released"
        return self._cache_backend.recover(self._cache, self, what)

    def _recovered_buffer(self, name: str) -> Tensor:
        """The released buffer ``name`` rebuilt from the kernel pack."""
        held = self._recover(_HELD[name])
        return pack_codes(held, self.bits) if name == "qweight" else held

    def quantized_weight(self) -> QuantizedWeight:
        scales, zeros = self.scales_zeros()
        return QuantizedWeight(self.codes(), scales.float(), zeros.float(), self.bits,
                               self.group_size, self.sym, self.g_idx)

    def dequantize_weight(self) -> Tensor:
        """The float32 ``[out, in]`` weight."""
        scales, zeros = self.scales_zeros()
        return dequantize_codes(self.codes(), scales, zeros, self.group_size, self.g_idx)

    def resident_bytes(self) -> int:
        """Bytes held now: buffer storage plus any run-time cache (kernel pack or dense weight);
        a released buffer's placeholder holds one element."""
        total = sum(b.untyped_storage().nbytes() for b in self.buffers(recurse=False) if not b.is_meta)
        for t in _cache_tensors(self._cache):
            total += t.numel() * t.element_size()
        return total

    def release_cache(self) -> None:
        """Drop the run-time cache (restoring released buffers first)."""
        self._restore_buffers()
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._cache = None
        self._cache_key = None
        self._cache_backend = None
        self._selection = None
        self._fast = None

    def post_load(self) -> None:
        """Called by :func:`qcore.load` after buffers are assigned: drop stale run-time caches."""
        self.release_cache()

    def _restore_buffers(self) -> None:
        for name in sorted(self._released):
            self._buffers[name] = self._recovered_buffer(name)
        self._released = set()

    # -- backend choice ------------------------------------------------------------------------
    def why_not(self, backend: str, device: torch.device | None = None) -> str | None:
        """Why ``backend`` cannot run this layer on ``device`` (None when it can)."""
        return get_backend(backend).why_not(self, device or self._device())

    def select_backend(self, device: torch.device | None = None) -> str:
        """The name of the backend a forward on ``device`` uses."""
        return self._select(device or self._device()).name

    def kernel_path(self, rows: int, device: torch.device | None = None) -> str:
        """The backend a forward of ``rows`` activation rows on ``device`` uses, as
        ``backend:path`` for a backend that picks a path per row count (``path_for``, e.g.
        ``int4_native:bf16``; builds the run-time pack, as a forward would)."""
        dev = device or self._device()
        backend = self._select(dev)
        path_for = getattr(backend, "path_for", None)
        if path_for is None:
            return backend.name
        return f"{backend.name}:{path_for(self._get_cache(backend, torch.float32, dev), self, rows)}"

    def _selection_key(self, device: torch.device) -> tuple:
        """What the backend choice depends on (``backends()`` is one dict per registry state)."""
        return (os.environ.get(BACKEND_ENV, "") or self.backend, device, self.act, id(self.input_transform),
                id(backends()))

    def _select(self, device: torch.device) -> KernelBackend:
        key = self._selection_key(device)
        if self._selection is not None and self._selection[0] == key:
            return self._selection[1]
        backend = self._choose(key[0], device)
        self._selection = (key, backend)
        return backend

    def _choose(self, name: str, device: torch.device) -> KernelBackend:
        if name != "auto":
            backend = get_backend(name)
            reason = backend.why_not(self, device)
            if reason:
                able = [b.name for b in backends().values() if b.why_not(self, device) is None]
                raise CompatibilityError(
                    f"QuantLinear backend {name!r} cannot run {self.extra_repr()}: {reason}; "
                    f"unset {BACKEND_ENV} / .backend or use one of: {', '.join(able)}")
            return backend
        for cand in auto_order(device.type):
            if cand.why_not(self, device) is None:
                return cand
        raise CompatibilityError(f"no QuantLinear backend runs {self.extra_repr()} on {device.type}: "
                                 f"registered: {', '.join(backends())}")

    # -- forward -------------------------------------------------------------------------------
    def _get_cache(self, backend: KernelBackend, dtype: torch.dtype, device: torch.device) -> Any:
        key = (backend.name, dtype if backend.per_dtype else None, device)
        if self._cache_key == key:
            return self._cache
        # normal tensors even when first built under inference_mode (later autograd use works)
        with torch.inference_mode(False), torch.no_grad():
            self.release_cache()
            cache = backend.build(self, dtype, device)
            self._cache, self._cache_key, self._cache_backend = cache, key, backend
            if self.release_qweight:
                for what in backend.holds(cache, self):
                    self._release(_BUFFERS[what])
        return cache

    def _release(self, name: str) -> None:
        """Replace a buffer by a placeholder of the same shape and dtype backed by ONE zero element
        (stride 0), so generic code that walks buffers keeps working; read the real values
        through ``state_dict()``/``codes()``/``scales_zeros()``."""
        old = self._buffers[name]
        self._home = old.device
        self._buffers[name] = torch.zeros(1, dtype=old.dtype, device=old.device).expand(old.shape)
        self._released.add(name)

    def released_buffers(self) -> frozenset[str]:
        """Buffers currently replaced by placeholders because the kernel pack holds them."""
        return frozenset(self._released)

    def _device(self) -> torch.device:
        return self._home if self._released else self.scales.device

    def _fast_key(self, x: Tensor) -> tuple:
        """What the bound call of :meth:`forward`'s fast path depends on besides the pack: the
        backend choice's key and the activation dtype."""
        return (x.dtype, *self._selection_key(x.device))

    def _bind(self, backend: KernelBackend, x2: Tensor) -> Callable[[Tensor], Tensor]:
        """``x2 -> y`` with this backend and its pack bound (no choice, cache lookup or checks)."""
        pack = self._get_cache(backend, x2.dtype, x2.device)

        def call(x: Tensor) -> Tensor:
            y = backend.mm(x, pack, self)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return call

    def forward(self, x: Tensor) -> Tensor:
        fast = self._fast  # inference calls after the first: the backend and pack bound
        if fast is not None and not torch.is_grad_enabled() and fast[0] == self._fast_key(x):
            return fast[1](x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_transform is not None:
            x2 = self.input_transform(x2)
        backend = self._select(x.device)
        if self.act is not None and not backend.quantizes_act:
            x2 = fake_quant_act(x2, self.act)
        if not backend.autograd and torch.is_grad_enabled() and x2.requires_grad:
            y = _KernelWithGrad.apply(x2, self, backend)  # the kernel has no autograd formula
        else:
            y = self._mm(x2, backend)
            if (not torch.is_grad_enabled() and self.input_transform is None
                    and (self.act is None or backend.quantizes_act)):
                self._fast = (self._fast_key(x), self._bind(backend, x2))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _mm(self, x2: Tensor, backend: KernelBackend) -> Tensor:
        return backend.mm(x2, self._get_cache(backend, x2.dtype, x2.device), self)

    # -- state dict / device moves keep the packed format authoritative --------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._released:
            destination[prefix + name] = self._recovered_buffer(name)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self._released:  # full-size placeholders for a copying (non-assign) load
            for name in self._released:
                self._buffers[name] = torch.empty_like(self._buffers[name], device=self._home)
            self._released = set()
        self._drop_cache()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Device moves apply; dtype casts (model.half(), .to(bfloat16)) leave the stored scales,
        # zeros and bias in their own dtype, so a cast model keeps the exact saved values.
        self.release_cache()
        keep = {n: self._buffers.pop(n) for n in ("scales", "qzeros", "bias") if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.qweight.device
            for n, t in keep.items():
                moved = torch.empty_like(t, device=dev) if t.is_meta and dev.type != "meta" else t.to(dev)
                self._buffers[n] = moved
        return self


class _KernelWithGrad(torch.autograd.Function):
    """A kernel forward with a straight-through input gradient ``grad @ w_hat`` (weights frozen).

    The weight is dequantized in backward on every call (as QLoRA does): training through
    QuantLinear costs that time, inference does not.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, mod: QuantLinear, backend: KernelBackend) -> Tensor:  # noqa: ANN401
        ctx.mod = mod
        with torch.no_grad():
            return mod._mm(x, backend)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        w_hat = ctx.mod.dequantize_weight().to(device=grad.device, dtype=grad.dtype)
        return grad @ w_hat, None, None


def _cache_tensors(cache: Any) -> list[Tensor]:
    if cache is None:
        return []
    if isinstance(cache, Tensor):
        return [cache]
    return [v for v in vars(cache).values() if isinstance(v, Tensor)]
