"""``QuantLinear``: a linear layer holding packed low-bit weights.

Buffers (their names and layouts are the on-disk format):

* ``qweight`` int32 ``[out, packed_words(in, bits)]``: codes packed along the input dimension
  (:mod:`qcore.quant.packing`);
* ``scales``, ``qzeros``: ``[out, n_groups]`` in ``meta()["scale_dtype"]`` (bfloat16 for 1-4
  bits with integer zero points, the int4 kernel's precision; float16 otherwise; float32 when
  float16 would lose a value);
  ``w_hat = (q - qzeros[g]) * scales[g]``;
* ``g_idx`` int32 ``[in]`` (only with act-order), ``bias`` float32 ``[out]`` (only with bias).

Backends (``QuantLinear.backend`` attribute, or env ``QCORE_QLINEAR_BACKEND`` to force one for
every layer; ``"auto"`` picks per layer and device):

==============  =========================================================================
``int4_native`` CPU with AVX512-BF16 and a C compiler, 1-4 bits, in_features and group
                multiples of 32 (or per channel): qcore's own kernel (:mod:`qcore.quant.native`;
                bf16 activations, fp32 accumulation), built once per machine; 2-3x faster
                than ``int4_cpu`` here. Buffers are released as with ``int4_cpu``.
``int4_cpu``    CPU, 1-4 bits, group a multiple of 32 (or per channel): torch's packed int4
                kernel with bf16 activations (2/3-bit codes run as 4-bit codes: the stored
                format stays 2/3-bit). The kernel pack is built on the first forward and
                cached (never saved). ``qweight`` (and ``scales``/``qzeros`` when the pack
                holds them exactly: integer zero points) are then released (placeholders
                of the same shape backed by one zero element) and rebuilt from the pack when the state dict
                is read, the module is moved, or ``release_cache()`` runs: resident memory is
                the kernel pack, not twice the weight. Read buffers through
                ``state_dict()``, ``codes()``, ``scales_zeros()`` or ``dequantize_weight()``.
``int8_cpu``    CPU, 8 bits per channel: ``_weight_int8pack_mm`` (bf16 compute); the int8
                copy replaces ``qweight`` the same way.
``int4_cuda``   CUDA (compute capability 8.0+), the same layers as ``int4_cpu``: torch's
                CUDA int4 kernel (bf16) up to ``kernels.INT4_CUDA_MAX_ROWS`` rows, a per-call
                dequantize + dense matmul above (faster there, no cached dense weight). The
                packed buffers stay next to the kernel pack.
``w8a8``        8-bit per-channel weights with dynamic per-token int8 activations
                (:mod:`qcore.quant.kernels`); on CUDA through ``torch._int_mm``.
``dense``       everything else (5-7 bits, grouped 8 bits, groups not a multiple of 32,
                out_features not a multiple of 16, act-order with uneven groups): the
                weight is dequantized ONCE and cached as a dense tensor in the activation
                dtype. A fallback: correct and fast, but it saves no memory at run time (the
                packed buffers stay the saved format); ``release_cache()`` frees it.
``dense_bf16``  as ``dense`` with a bfloat16 weight and bf16 compute (the int4 kernel's
                precision, 1.3-2.2x faster than the kernel at thousands of rows): what the
                calibration engine runs already-quantized layers with (never ``auto``).
``reference``   dequantize then matmul on EVERY call. Slow; only used when forced (tests).
==============  =========================================================================

Gradients flow to the input through every backend (weights are frozen buffers); the kernels
have no autograd formula, so their backward dequantizes the weight on each call.

All backends agree with ``reference`` within :data:`BACKEND_RTOL` (relative Frobenius error of
the output): the int4/int8 kernels compute in bf16.

Activation quantization (``act``, an :class:`qcore.quant.act.ActQuant`): int8 symmetric with
8-bit per-channel weights runs the ``w8a8`` integer path; every other combination fake-quantizes
the input and then runs the weight backend.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import CheckpointError, CompatibilityError
from qcore.progress import get_logger
from qcore.quant import kernels
from qcore.quant.act import ActQuant, fake_quant_act, quantize_act_int8
from qcore.quant.packing import pack_codes, packed_words, unpack_codes
from qcore.quant.primitives import QuantizedWeight, check_bits, check_group_size, dequantize_codes

log = get_logger("qcore.quant.linear")

BACKEND_ENV = "QCORE_QLINEAR_BACKEND"
BACKENDS: tuple[str, ...] = ("auto", "int4_native", "int4_cpu", "int4_cuda", "int8_cpu", "w8a8", "dense", "dense_bf16",
                              "reference")
KERNEL_BACKENDS: frozenset[str] = frozenset({"int4_native", "int4_cpu", "int4_cuda", "int8_cpu", "w8a8"})
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("w8a8", "int4_native", "int4_cpu", "int8_cpu"), "cuda": ("w8a8", "int4_cuda")}
"""Kernels ``auto`` tries per device type, in order; ``dense`` when none can run the layer."""
BACKEND_RTOL = 1e-2
"""Max relative error (Frobenius) of any backend's output against ``reference``."""
FORMAT = "qcore-int32-lsb-bitstream"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
        """'auto' or one of BACKENDS; the env var QCORE_QLINEAR_BACKEND overrides it."""
        self.release_qweight = True
        """Free the packed qweight once a kernel pack (int4/int8) holds the codes (rebuilt on save)."""
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
        self._cache: Any = None
        self._cache_key: tuple | None = None
        self._released: set[str] = set()
        """Buffers replaced by placeholders while a kernel pack holds their content exactly."""
        self._home = torch.device("cpu")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, act: ActQuant | None = None,
                       scale_dtype: torch.dtype | None = None) -> QuantLinear:
        """Pack a :class:`QuantizedWeight`.

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
        return mod

    def meta(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_meta` rebuilds an empty module."""
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
            return self._recover_codes()
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def scales_zeros(self) -> tuple[Tensor, Tensor]:
        """The stored ``(scales, qzeros)`` (rebuilt from the kernel pack while it holds them)."""
        if "scales" in self._released:
            return self._recovered("scales"), self._recovered("qzeros")
        return self.scales, self.qzeros

    def _recovered(self, name: str) -> Tensor:
        if name == "qweight":
            return pack_codes(self._recover_codes(), self.bits)
        s, z = self._pack_scales_zeros(self._cache)
        return (s if name == "scales" else z).to(self.scale_dtype)

    def _pack_scales_zeros(self, pack: Any) -> tuple[Tensor, Tensor]:
        if isinstance(pack, kernels.NativeQ4Pack):
            return kernels.int4_native_scales_zeros(pack)
        return kernels.int4_cpu_scales_zeros(pack, self.group_size, self.in_features)

    def _recover_codes(self) -> Tensor:
        if isinstance(self._cache, kernels.NativeQ4Pack):
            return kernels.recover_int4_native_codes(self._cache, self.out_features, self.in_features)
        if isinstance(self._cache, kernels.Int4CpuPack):
            return kernels.recover_int4_cpu_codes(self._cache, self.out_features, self.in_features)
        return kernels.int8_codes(self._cache)

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
        self._cache = None
        self._cache_key = None

    def post_load(self) -> None:
        """Called by :func:`qcore.load` after buffers are assigned: drop stale run-time caches."""
        self.release_cache()

    def _restore_buffers(self) -> None:
        for name in sorted(self._released):
            self._buffers[name] = self._recovered(name)
        self._released = set()

    # -- backend choice ------------------------------------------------------------------------
    def requested_backend(self) -> str:
        name = os.environ.get(BACKEND_ENV, "") or self.backend
        if name not in BACKENDS:
            raise CompatibilityError(f"unknown QuantLinear backend {name!r}; use one of {BACKENDS}")
        return name

    def why_not(self, backend: str, device: torch.device | None = None) -> str | None:
        """Why ``backend`` cannot run this layer on ``device`` (None when it can)."""
        device = device or self._device()
        cpu = device.type == "cpu"
        if backend in ("dense", "dense_bf16", "reference"):
            return None
        if backend == "int4_native":
            if not cpu:
                return "int4_native runs on CPU only"
            return kernels.int4_native_reason(self.in_features, self.out_features, self.bits,
                                              self.group_size, self.g_idx)
        if backend == "int4_cpu":
            if not cpu:
                return "int4_cpu runs on CPU only"
            return kernels.int4_cpu_reason(self.in_features, self.out_features, self.bits,
                                           self.group_size, self.g_idx)
        if backend == "int4_cuda":
            return kernels.int4_cuda_reason(self.in_features, self.out_features, self.bits,
                                            self.group_size, self.g_idx, device)
        if backend == "int8_cpu":
            if not cpu:
                return "int8_cpu runs on CPU only"
            return kernels.int8_reason(self.bits, self.group_size, self.in_features)
        if backend == "w8a8":
            if self.act is None or not self.act.integer_kernel or not self.act.dynamic:
                return "w8a8 needs act=ActQuant(bits=8, dynamic=True, sym=True)"
            if not cpu and self.out_features % 8:
                return "torch._int_mm on CUDA needs out_features a multiple of 8"
            return kernels.int8_reason(self.bits, self.group_size, self.in_features)
        return f"unknown backend {backend!r}"

    def select_backend(self, device: torch.device | None = None) -> str:
        """The backend a forward on ``device`` uses."""
        name = self.requested_backend()
        if name != "auto":
            reason = self.why_not(name, device)
            if reason:
                raise CompatibilityError(
                    f"QuantLinear backend {name!r} cannot run {self.extra_repr()}: {reason}; "
                    f"unset {BACKEND_ENV} / .backend or use 'dense'")
            return name
        for cand in AUTO_ORDER.get((device or self._device()).type, ()):
            if self.why_not(cand, device) is None:
                return cand
        return "dense"

    # -- forward -------------------------------------------------------------------------------
    def _get_cache(self, backend: str, dtype: torch.dtype, device: torch.device) -> Any:
        key = (backend, dtype if backend == "dense" else None, device)
        if self._cache_key == key:
            return self._cache
        # normal tensors even when first built under inference_mode (later autograd use works)
        with torch.inference_mode(False), torch.no_grad():
            return self._build_cache(backend, dtype, device, key)

    def _build_cache(self, backend: str, dtype: torch.dtype, device: torch.device, key: tuple) -> Any:
        self.release_cache()
        if backend == "int4_native":
            cache = kernels.build_int4_native(self.codes(), self.scales, self.qzeros, self.group_size, self.g_idx)
        elif backend == "int4_cpu":
            cache = kernels.build_int4_cpu(self.codes(), self.scales, self.qzeros, self.group_size,
                                           self.g_idx, self.bits)
        elif backend == "int4_cuda":
            cache = kernels.build_int4_cuda(self.codes(), self.scales, self.qzeros, self.group_size,
                                            self.g_idx, self.bits)
        elif backend in ("int8_cpu", "w8a8"):
            cache = kernels.build_int8(self.codes(), self.scales, self.qzeros)
        else:
            log.debug("%s: caching a dense %s weight (no run-time memory saving)", self.extra_repr(), dtype)
            cache = self.dequantize_weight().to(device=device, dtype=dtype)
        self._cache, self._cache_key = cache, key
        if backend not in ("dense", "int4_cuda") and self.release_qweight:  # the CUDA pack is not read back
            self._release("qweight")
            if backend in ("int4_cpu", "int4_native"):
                s, z = self._pack_scales_zeros(cache)
                if torch.equal(s.to(self.scale_dtype), self.scales) and torch.equal(z.to(self.scale_dtype), self.qzeros):
                    self._release("scales")
                    self._release("qzeros")
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

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        backend = self.select_backend(x.device)
        if self.act is not None and backend != "w8a8":
            x2 = fake_quant_act(x2, self.act)
        if backend in KERNEL_BACKENDS and torch.is_grad_enabled() and x2.requires_grad:
            y = _KernelWithGrad.apply(x2, self, backend)  # the kernels have no autograd formula
        elif backend == "reference":
            y = x2 @ self.dequantize_weight().to(x2.dtype).t()
        elif backend == "dense":
            y = x2 @ self._get_cache("dense", x2.dtype, x2.device).t()
        elif backend == "dense_bf16":
            y = (x2.to(torch.bfloat16) @ self._get_cache("dense", torch.bfloat16, x2.device).t()).to(x2.dtype)
        else:
            y = self._kernel_mm(x2, backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel_mm(self, x2: Tensor, backend: str) -> Tensor:
        cache = self._get_cache(backend, x2.dtype, x2.device)
        if backend == "int4_native":
            return kernels.int4_native_mm(x2, cache)
        if backend == "int4_cpu":
            return kernels.int4_cpu_mm(x2, cache)
        if backend == "int4_cuda":
            if x2.shape[0] > kernels.INT4_CUDA_MAX_ROWS:  # prefill-sized: dequantize per call
                return x2 @ self.dequantize_weight().to(x2.dtype).t()
            return kernels.int4_cuda_mm(x2, cache)
        if backend == "int8_cpu":
            return kernels.int8_weight_mm(x2, cache)
        xq, sx = quantize_act_int8(x2)
        return kernels.w8a8_mm(xq, sx, cache, x2.dtype)

    # -- state dict / device moves keep the packed format authoritative --------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._released:
            destination[prefix + name] = self._recovered(name)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self._released:  # full-size placeholders for a copying (non-assign) load
            for name in self._released:
                self._buffers[name] = torch.empty_like(self._buffers[name], device=self._home)
            self._released = set()
        self._cache = None
        self._cache_key = None
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
    def forward(ctx: Any, x: Tensor, mod: QuantLinear, backend: str) -> Tensor:  # noqa: ANN401
        ctx.mod = mod
        with torch.no_grad():
            return mod._kernel_mm(x, backend)

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
