"""QuantLinear: backends agree, meta/state-dict round trips, memory, activation quantization."""
from __future__ import annotations

import json

import pytest
import torch

from qcore.plugin.errors import CompatibilityError, ConfigError
from qcore.quant.backends import int4_cpu
from qcore.quant.backends.int4_native import int4_native_reason
from qcore.quant.backends.int8_cpu import build_int8
from qcore.quant.backends.w8a8 import w8a8_mm
from qcore.quant.act import ActQuant, calibrate_static_scale, fake_quant_act, quantize_act_int8
from qcore.quant.linear import BACKEND_ENV, BACKEND_RTOL, QuantLinear, backend_names
from qcore.quant.packing import unpack_codes
from qcore.quant.primitives import QuantizedWeight, dequantize_codes, quant_params, quantize_codes, quantize_rtn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make(bits: int, gs: int, sym: bool, out_f: int = 64, in_f: int = 256, bias: bool = True,
         act: ActQuant | None = None, seed: int = 0) -> tuple[QuantLinear, QuantizedWeight]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    qw = quantize_rtn(w, bits, gs, sym)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(qw, b, act=act), qw


def act_order_weight(bits: int, gs: int, out_f: int = 64, in_f: int = 256) -> QuantizedWeight:
    torch.manual_seed(5)
    w = torch.randn(out_f, in_f)
    g_idx = (torch.argsort(torch.randperm(in_f)) // gs).to(torch.int32)
    cols = torch.argsort(g_idx.long(), stable=True)
    s, z = quant_params(w[:, cols], bits, gs, False)
    return QuantizedWeight(quantize_codes(w, s, z, bits, gs, g_idx), s, z, bits, gs, False, g_idx)


def int4_backend(in_f: int = 256, group: int = 128) -> str:
    """The int4 kernel ``auto`` picks on this machine: qcore's own where it builds and runs (CPUs
    with AVX512-BF16), else torch's."""
    return "int4_native" if int4_native_reason(in_f, 4, group, None) is None else "int4_cpu"


# (bits, group, sym) -> the backend auto picks on CPU ("int4": see int4_backend)
AUTO = [((4, 128, False), "int4"), ((4, 32, True), "int4"), ((4, -1, False), "int4"),
        ((8, -1, True), "int8_cpu"), ((8, -1, False), "int8_cpu"), ((8, 64, False), "dense"),
        ((3, 64, False), "int4"), ((2, 32, True), "int4"), ((4, 16, False), "dense"),
        ((5, 32, False), "dense"), ((3, 16, True), "dense")]


@pytest.mark.parametrize("cfg,expected", AUTO)
def test_backends_agree_with_reference(cfg: tuple[int, int, bool], expected: str) -> None:
    mod, qw = make(*cfg)
    x = torch.randn(2, 3, 256)
    mod.backend = "reference"
    ref = mod(x)
    # the reference is the float matmul of the dequantized weight (fp16-stored scales)
    w_hat = dequantize_codes(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), qw.group_size)
    assert torch.allclose(ref, x @ w_hat.t() + mod.bias, atol=1e-4)
    mod.backend = "auto"
    assert mod.select_backend() == (int4_backend(group=cfg[1]) if expected == "int4" else expected)
    for backend in backend_names():
        if backend != "auto" and mod.why_not(backend) is not None:
            continue
        mod.backend = backend
        y = mod(x)
        assert y.shape == (2, 3, 64)
        assert rel(y, ref) < BACKEND_RTOL, backend
        mod.release_cache()


def test_act_order_int4_kernel() -> None:
    qw = act_order_weight(4, 64)
    mod = QuantLinear.from_quantized(qw, None)
    assert mod.select_backend() == int4_backend(group=64)
    x = torch.randn(5, 256)
    mod.backend = "reference"
    ref = mod(x)
    mod.backend = "auto"
    assert rel(mod(x), ref) < BACKEND_RTOL
    assert torch.equal(mod.codes(), qw.codes)  # recovered from the kernel pack, g_idx order
    assert torch.equal(unpack_codes(mod.state_dict()["qweight"], 4, 256), qw.codes)


def test_uneven_act_order_falls_back_to_dense() -> None:
    qw = act_order_weight(4, 64)
    qw.g_idx = qw.g_idx.clone()
    qw.g_idx[0] = (qw.g_idx[0] + 1) % 4  # one group now has 65 columns
    mod = QuantLinear.from_quantized(qw, None)
    assert mod.select_backend() == "dense"


def test_kernel_rejects_wrong_zero_layout() -> None:
    """The test above could pass with a wrong kernel offset only if zeros did not matter: they do."""
    mod, qw = make(4, 64, False)
    pack = int4_cpu.build_int4_cpu(qw.codes, qw.scales, qw.zeros, 64)
    bad = int4_cpu.Int4CpuPack(pack.packed, pack.scale_zeros.clone(), pack.kgroup, None)
    bad.scale_zeros[..., 1] = 0
    x = torch.randn(4, 256)
    ref = x @ qw.dequantize().t()
    assert rel(int4_cpu.int4_cpu_mm(x, pack), ref) < BACKEND_RTOL
    assert rel(int4_cpu.int4_cpu_mm(x, bad), ref) > 0.1


@pytest.mark.parametrize("n,k", [(48, 96), (64, 128), (112, 288), (32, 64), (192, 96)])
def test_recover_int4_codes_exact(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    pack = int4_cpu.build_int4_cpu(codes, torch.ones(n, 1), torch.zeros(n, 1), -1)
    assert torch.equal(int4_cpu.recover_int4_cpu_codes(pack, n, k), codes)


def test_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, _ = make(6, 64, False)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert mod.select_backend() == "reference"
    monkeypatch.setenv(BACKEND_ENV, "int4_cpu")
    with pytest.raises(CompatibilityError, match="6-bit"):
        mod(torch.randn(1, 256))
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(CompatibilityError, match="unknown QuantLinear backend"):
        mod.select_backend()


def test_auto_never_dequantizes_every_call() -> None:
    for cfg, _ in AUTO:
        for act in (None, ActQuant(8), ActQuant(4)):
            mod, _ = make(*cfg, act=act)
            assert mod.select_backend() != "reference"


@pytest.mark.parametrize("cfg", [(4, 128, False), (3, 32, True), (8, -1, True)])
def test_meta_round_trip(cfg: tuple[int, int, bool]) -> None:
    mod, qw = make(*cfg, act=ActQuant(8) if cfg[0] == 8 else None)
    x = torch.randn(3, 256)
    y = mod(x)  # builds (and for kernels releases) the packed form first
    meta = json.loads(json.dumps(mod.meta()))
    empty = QuantLinear.from_meta(meta)
    assert empty.qweight.is_meta
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "scales", "qzeros", "bias"}
    assert sd["qweight"].shape == (64, 256 * cfg[0] // 32)
    empty.load_state_dict(sd, assign=True)
    assert torch.equal(empty(x), y)
    assert torch.equal(empty.codes(), qw.codes)
    # loading into a module whose qweight was released works too
    again, _ = make(*cfg, act=ActQuant(8) if cfg[0] == 8 else None, seed=9)
    again(x)
    again.load_state_dict(sd)
    assert torch.equal(again(x), y)


def test_meta_with_g_idx_and_no_bias() -> None:
    qw = act_order_weight(3, 32)
    mod = QuantLinear.from_quantized(qw, None)
    meta = mod.meta()
    assert meta["has_g_idx"] and not meta["has_bias"]
    empty = QuantLinear.from_meta(meta, device="cpu")
    empty.load_state_dict(mod.state_dict())
    assert torch.equal(empty.dequantize_weight(), mod.dequantize_weight())
    stored = dequantize_codes(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), 32, qw.g_idx)
    assert torch.equal(mod.dequantize_weight(), stored)  # exact up to the scale storage dtype
    assert mod.scale_dtype == torch.bfloat16  # 1-4 bits: the int4 kernel's precision
    assert torch.allclose(mod.dequantize_weight(), qw.dequantize(), rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("bits,stored,resident", [(4, 0.27, 0.27), (3, 0.21, 0.27), (2, 0.16, 0.27)])
def test_memory_group128(bits: int, stored: float, resident: float) -> None:
    out_f, in_f = 512, 1024
    mod, qw = make(bits, 128, False, out_f, in_f)
    fp16_bytes = out_f * in_f * 2
    buffers = sum(b.numel() * b.element_size() for b in mod.buffers())
    assert buffers / fp16_bytes <= stored
    mod(torch.randn(1, in_f))  # builds the int4 kernel pack
    assert mod.select_backend() == int4_backend(in_f)
    # the kernel pack (0.5 B/weight + a bf16 scale/offset table) stands in for all three buffers
    assert mod.released_buffers() == {"qweight", "scales", "qzeros"}
    assert mod.qweight.shape == (out_f, in_f * bits // 32) and mod.qweight.untyped_storage().nbytes() == 4
    assert mod.resident_bytes() / fp16_bytes <= resident
    sd = mod.state_dict()
    assert torch.equal(unpack_codes(sd["qweight"], bits, in_f), qw.codes)
    assert torch.equal(sd["scales"], qw.scales.to(mod.scale_dtype))
    assert torch.equal(sd["qzeros"], qw.zeros.to(mod.scale_dtype))
    mod.release_cache()
    assert mod.qweight.shape == (out_f, in_f * bits // 32)
    assert sum(b.numel() * b.element_size() for b in mod.buffers()) == buffers


def test_dtype_casts_keep_stored_scales() -> None:
    mod, _ = make(4, 64, False)
    scales = mod.scales.clone()
    x = torch.randn(2, 256)
    y = mod(x)
    mod.to(torch.float16)
    assert mod.scales.dtype == scales.dtype and torch.equal(mod.scales, scales)
    assert mod.qweight.dtype == torch.int32 and not mod.released_buffers()
    yb = mod(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb, y) < BACKEND_RTOL


def test_float_zero_points_keep_their_buffers() -> None:
    """Non-integer zeros (HQQ) are not recoverable from the kernel's bf16 offsets: kept, still exact."""
    torch.manual_seed(7)
    qw = quantize_rtn(torch.randn(64, 256), 4, 64, False)
    qw.zeros = qw.zeros + 0.37
    mod = QuantLinear.from_quantized(qw, None)
    zeros = mod.qzeros.clone()
    x = torch.randn(2, 256)
    mod.backend = "reference"
    ref = mod(x)
    mod.backend = "auto"
    assert rel(mod(x), ref) < BACKEND_RTOL
    assert mod.released_buffers() == {"qweight"} and torch.equal(mod.qzeros, zeros)
    assert torch.equal(mod.state_dict()["qzeros"], zeros)


# -- activation quantization -----------------------------------------------------------------------
def test_actquant_validation() -> None:
    with pytest.raises(ConfigError, match="use one of"):
        ActQuant(bits=5)
    with pytest.raises(ConfigError, match="calibrated positive scale"):
        ActQuant(8, dynamic=False)
    with pytest.raises(ConfigError, match="unknown activation"):
        ActQuant.from_dict({"bits": 8, "granularity": "token"})
    assert ActQuant.from_dict(ActQuant(4, sym=False).to_dict()) == ActQuant(4, sym=False)


@pytest.mark.parametrize("bits,sym", [(8, True), (6, True), (4, True), (4, False)])
def test_fake_quant_per_token(bits: int, sym: bool) -> None:
    x = torch.randn(6, 64) * torch.logspace(-2, 1, 6).unsqueeze(1)
    xq = fake_quant_act(x, ActQuant(bits, sym=sym))
    levels = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    span = x.abs().amax(1, keepdim=True) if sym else (x.amax(1, keepdim=True).clamp(min=0)
                                                       - x.amin(1, keepdim=True).clamp(max=0))
    step = span / levels
    assert ((xq - x).abs() <= step / 2 + 1e-6).all()  # per-token step: small rows stay precise
    assert ((xq - x).abs().amax(1) > 0).all()
    for r in range(6):
        assert torch.unique(xq[r]).numel() <= 2**bits


def test_int8_per_token_codes() -> None:
    x = torch.randn(4, 32)
    q, s = quantize_act_int8(x)
    assert q.dtype == torch.int8 and s.shape == (4, 1)
    assert torch.equal(q.abs().amax(1), torch.full((4,), 127, dtype=torch.int8))
    assert torch.allclose(q.float() * s, x, atol=float(s.max()) / 2 + 1e-6)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m", [1, 5, 24])
def test_w8a8_matches_fake_quant_reference(sym: bool, m: int) -> None:
    mod, qw = make(8, -1, sym, act=ActQuant(8))
    assert mod.select_backend() == "w8a8"
    x = torch.randn(m, 256)
    ref = fake_quant_act(x, ActQuant(8)) @ dequantize_codes(
        qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), -1).t() + mod.bias
    y = mod(x)
    assert rel(y, ref) < BACKEND_RTOL
    mod.backend = "reference"
    assert rel(mod(x), ref) < 1e-5
    # both integer paths (the small-batch int8pack kernel and torch._int_mm) give the same numbers
    xq, sx = quantize_act_int8(x)
    pack = build_int8(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype))
    a = w8a8_mm(xq, sx, pack, torch.float32, use_int_mm=True) + mod.bias
    b = w8a8_mm(xq, sx, pack, torch.float32, use_int_mm=False) + mod.bias
    assert rel(a, ref) < 1e-5  # exact int32 accumulation
    assert rel(b, ref) < BACKEND_RTOL


def test_w8a8_only_for_8bit_per_channel_weights() -> None:
    mod, _ = make(4, 64, False, act=ActQuant(8))
    assert "4-bit" in (mod.why_not("w8a8") or "")
    assert mod.select_backend() == int4_backend(group=64)  # fake-quantized A8 input, int4 weight kernel
    mod, _ = make(8, 64, False, act=ActQuant(8))
    assert "grouped" in (mod.why_not("w8a8") or "")
    assert mod.select_backend() == "dense"
    mod, _ = make(8, -1, True, act=ActQuant(4))
    assert "w8a8 needs" in (mod.why_not("w8a8") or "")
    assert mod.select_backend() == "int8_cpu"


def test_static_and_a4_paths() -> None:
    torch.manual_seed(3)
    calib = torch.randn(32, 256)
    act = calibrate_static_scale(calib, bits=8)
    assert not act.dynamic and act.scale == pytest.approx(float(calib.abs().max()) / 127)
    mod, qw = make(8, -1, True, act=act)
    assert mod.select_backend() == "int8_cpu"  # static scale: fake-quant input, int8 weight kernel
    x = torch.randn(4, 256) * 0.5
    w_hat = dequantize_codes(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), -1)
    ref = torch.round(x / act.scale).clamp(-127, 127) * act.scale @ w_hat.t() + mod.bias
    assert rel(mod(x), ref) < BACKEND_RTOL
    mod4, qw4 = make(4, 128, False, act=ActQuant(4))
    x = torch.randn(4, 256)
    out = mod4(x)
    w4 = dequantize_codes(qw4.codes, qw4.scales.to(mod4.scale_dtype), qw4.zeros.to(mod4.scale_dtype), 128)
    assert mod4.select_backend() == int4_backend()
    assert rel(out, fake_quant_act(x, ActQuant(4)) @ w4.t() + mod4.bias) < BACKEND_RTOL
    assert rel(out, x @ w4.t() + mod4.bias) > 0.05  # A4 really quantizes the input


@pytest.mark.parametrize("cfg", [(4, 64, False), (8, -1, True), (3, 32, False)])
def test_input_gradient_through_every_backend(cfg: tuple[int, int, bool]) -> None:
    mod, qw = make(*cfg, act=None)
    w_hat = dequantize_codes(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), qw.group_size)
    x = torch.randn(3, 256, requires_grad=True)
    g = torch.randn(3, 64)
    mod(x).backward(g)
    assert torch.allclose(x.grad, g @ w_hat, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # a cache first built under inference_mode ...
        fresh, _ = make(*cfg)
        fresh(torch.randn(1, 256))
    x2 = torch.randn(2, 256, requires_grad=True)
    fresh(x2).sum().backward()  # ... still works with autograd afterwards
    assert x2.grad is not None


def test_int8_kernel_skipped_where_it_would_crash() -> None:
    """_weight_int8pack_mm (torch 2.13 CPU) segfaults for K not a multiple of 16 with > 1 row."""
    w = torch.randn(32, 100)
    for act in (None, ActQuant(8)):
        mod = QuantLinear.from_quantized(quantize_rtn(w, 8, -1, True), None, act=act)
        assert mod.select_backend() == "dense"
        x = torch.randn(3, 100)
        mod.backend = "reference"
        ref = mod(x)
        mod.backend = "auto"
        assert rel(mod(x), ref) < 1e-5


# -- input transform -------------------------------------------------------------------------------
class Rotation(torch.nn.Module):
    """A fixed orthogonal matrix: ``T(x) = x @ q.T``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q.t()


@pytest.mark.parametrize("cfg,act", [((4, 64, False), None), ((8, -1, True), None), ((8, -1, True), ActQuant(8)),
                                     ((3, 32, True), ActQuant(4))])
def test_input_transform_on_every_backend(cfg: tuple[int, int, bool], act: ActQuant | None) -> None:
    """``QuantLinear(x) == linear(T(x))`` on every backend that runs here, and through autograd."""
    rot = Rotation(256)
    g = torch.Generator().manual_seed(1)
    qw = quantize_rtn(torch.randn(64, 256, generator=g) * 0.05, *cfg)
    bias = torch.randn(64, generator=g)
    mod = QuantLinear.from_quantized(qw, bias, act=act, input_transform=rot)
    assert mod.input_transform is rot and "input_transform" not in json.dumps(mod.meta())
    assert torch.equal(mod.state_dict()["input_transform.q"], rot.q)
    w_hat = dequantize_codes(qw.codes, qw.scales.to(mod.scale_dtype), qw.zeros.to(mod.scale_dtype), qw.group_size)
    x = torch.randn(2, 5, 256, generator=g)
    tx = rot(x) if act is None else fake_quant_act(rot(x).reshape(-1, 256), act).reshape(2, 5, 256)
    ref = tx @ w_hat.t() + bias
    assert rel(x @ w_hat.t() + bias, ref) > 0.5  # the transform matters
    ran = []
    for backend in backend_names():
        if backend != "auto" and mod.why_not(backend) is not None:
            continue
        mod.backend = backend
        assert rel(mod(x), ref) < BACKEND_RTOL, backend
        if act is None:  # the input gradient goes through the transform (kernels: straight-through)
            xg = x[0].clone().requires_grad_()
            grad = torch.randn(5, 64, generator=g)
            mod(xg).backward(grad)
            assert rel(xg.grad, grad @ w_hat @ rot.q) < BACKEND_RTOL, backend
        ran.append(mod.select_backend())
    assert {"dense", "dense_bf16", "reference"} <= set(ran)


def test_inference_fast_path_is_bound_once_and_follows_every_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a first no-grad call the backend and pack are bound; a call with another dtype,
    backend (attribute or environment), input transform, bias value, or with gradients goes
    through the full path again, and each gives what the full path gives."""
    torch.manual_seed(0)
    mod, _ = make(4, 64, False)
    x = torch.randn(3, 5, 256)
    calls: list[str] = []
    bind = QuantLinear._bind

    def counting_bind(self: QuantLinear, backend, x2):  # noqa: ANN001
        calls.append(backend.name)
        return bind(self, backend, x2)

    monkeypatch.setattr(QuantLinear, "_bind", counting_bind)
    mod.backend = "reference"
    with torch.no_grad():
        ref = mod(x)
        assert torch.equal(mod(x), ref) and calls == ["reference"]  # bound once, reused
        bias = mod.bias.clone()
        mod.bias.add_(1.0)  # the bound call reads the bias at call time
        assert torch.allclose(mod(x), ref + 1.0) and calls == ["reference"]
        mod.bias.copy_(bias)
        mod.backend = "dense"
        assert rel(mod(x), ref) < BACKEND_RTOL and calls == ["reference", "dense"]
        monkeypatch.setenv(BACKEND_ENV, "reference")
        assert torch.equal(mod(x), ref) and calls[-1] == "reference"
        monkeypatch.delenv(BACKEND_ENV)
        assert rel(mod(x), ref) < BACKEND_RTOL and calls[-1] == "dense" and len(calls) == 4
        assert mod(x.double()).dtype == torch.float64 and len(calls) == 5  # another dtype: bound again
        mod.input_transform = torch.nn.Identity()
        mod(x)
        assert len(calls) == 5  # a transform: no bound path
        mod.input_transform = None
    xg = x.clone().requires_grad_(True)
    y = mod(xg)
    y.sum().backward()
    assert xg.grad is not None and len(calls) == 5  # with gradients: the full path
