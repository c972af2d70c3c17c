"""qcore's compiled 4-bit CPU kernel (``int4_native``): layout, numerics, fallback, build cache."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.quant import native
from qcore.quant.backends import _dispatch, int4_native
from qcore.quant.backends.int4_cpu import has_int4_cpu
from qcore.quant.linear import BACKEND_RTOL, QuantLinear
from qcore.quant.packing import unpack_codes
from qcore.quant.primitives import QuantizedWeight, dequantize_codes, quant_params, quantize_codes, quantize_rtn

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 150), slices=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_layout_round_trip(n: int, slices: int, seed: int) -> None:
    k = slices * native.SLICE
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    words = native.pack_tiled(codes)
    assert words.dtype == torch.int16 and words.numel() * 2 == native.padded_rows(n) * k // 2  # 4 bits per code
    assert torch.equal(native.unpack_tiled(words, n, k), codes)
    scales = torch.rand(n, slices, generator=gen).bfloat16()
    assert torch.equal(native.untranspose_groups(native.transpose_groups(scales), n), scales)


def test_layout_is_the_documented_one() -> None:
    """Supertile T, octet c, tile u, lane l, nibble j holds row 64 T + 16 u + l / 2, column
    8 c + 2 j + (l & 1) (the C file's header)."""
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    words = native.pack_tiled(codes).to(torch.int32) & 0xFFFF
    for t, c, u, lane in [(1, 3, 2, 5), (0, 7, 3, 30), (1, 0, 0, 1)]:
        word = int(words[((t * (k // 8) + c) * 4 + u) * 32 + lane])
        for j in range(4):
            assert (word >> (4 * j)) & 15 == int(codes[64 * t + 16 * u + lane // 2, 8 * c + 2 * j + lane % 2])


def test_shape_reasons() -> None:
    assert int4_native.int4_native_shape_reason(256, 4, 128, None) is None
    assert int4_native.int4_native_shape_reason(576, 4, 64, None) is None  # any out_features (padded to 64 rows inside)
    assert "multiple of 32" in (int4_native.int4_native_shape_reason(200, 4, 40, None) or "")
    assert "multiple of 32" in (int4_native.int4_native_shape_reason(256, 4, 16, None) or "")
    assert "5-bit" in (int4_native.int4_native_shape_reason(256, 5, 128, None) or "")


@needs_kernel
@pytest.mark.parametrize("bits,gs,sym", [(4, 64, False), (4, 32, True), (4, 192, False), (4, 288, False),
                                         (4, -1, False), (3, 64, False), (2, 32, True)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 70])
@pytest.mark.parametrize("path", _dispatch.PATHS)
def test_kernel_matches_float64(bits: int, gs: int, sym: bool, rows: int, path: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path: the kernels exact up to fp32 accumulation against the float64 product of the
    SAME bf16 activations, the dequantized weight bf16-exact; all within the backends' tolerance."""
    if path == _dispatch.AMX and not native.amx_available():
        pytest.skip(f"AMX kernel: {native.amx_unavailable_reason()}")
    monkeypatch.setenv(_dispatch.ENV_PATH, path)
    g = torch.Generator().manual_seed(bits * 1000 + rows)
    n, k = 100, 576  # 100 rows: a padded supertile
    qw = quantize_rtn(torch.randn(n, k, generator=g), bits, gs, sym)
    s, z = qw.scales.bfloat16(), qw.zeros.bfloat16()
    pack = int4_native.build_int4_native(qw.codes, s, z, gs)
    w_hat = dequantize_codes(qw.codes, s.float(), z.float(), gs)
    x = torch.randn(rows, k, generator=g)
    y = int4_native.int4_native_mm(x, pack)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert int4_native.native_path(pack, k, rows) == path
    if path == _dispatch.KERNEL:
        assert rel(y, x.bfloat16().double() @ w_hat.double().t()) < 1e-4
    elif path == _dispatch.AMX:  # the weight rounded to bf16, as the dense bf16 path rounds it
        assert rel(y, x.bfloat16().double() @ w_hat.bfloat16().double().t()) < 1e-6
        y16 = int4_native.int4_native_mm(x.bfloat16(), pack)  # bf16 out: the same sums, rounded once
        assert y16.dtype == torch.bfloat16 and torch.equal(y16, y.bfloat16())
    else:
        assert torch.equal(native.q4_dequant_bf16(pack.words, pack.scales, pack.zeros, pack.group, n, k),
                           w_hat.bfloat16())
    assert rel(y, x.double() @ w_hat.double().t()) < BACKEND_RTOL


@needs_kernel
def test_kernel_uses_zeros_and_scales() -> None:
    """Wrong zeros or scales give a wrong answer (the comparisons above can fail)."""
    qw = quantize_rtn(torch.randn(64, 256), 4, 64, False)
    s, z = qw.scales.bfloat16(), qw.zeros.bfloat16()
    x = torch.randn(1, 256)
    ref = x @ qw.dequantize().t()
    good = int4_native.build_int4_native(qw.codes, s, z, 64)
    assert rel(int4_native.int4_native_mm(x, good), ref) < BACKEND_RTOL
    for bad in (int4_native.build_int4_native(qw.codes, s, torch.zeros_like(z), 64),
                int4_native.build_int4_native(qw.codes, s.flip(1).contiguous(), z, 64)):
        assert rel(int4_native.int4_native_mm(x, bad), ref) > 0.1


def act_order_weight(n: int = 64, k: int = 256, gs: int = 64) -> QuantizedWeight:
    torch.manual_seed(5)
    w = torch.randn(n, k)
    g_idx = (torch.argsort(torch.randperm(k)) // gs).to(torch.int32)
    cols = torch.argsort(g_idx.long(), stable=True)
    s, z = quant_params(w[:, cols], 4, gs, False)
    return QuantizedWeight(quantize_codes(w, s, z, 4, gs, g_idx), s, z, 4, gs, False, g_idx)


def test_native_pack_holds_and_recovers_the_stored_values() -> None:
    """(No compiled library needed.) The pack holds the codes, and the scales and zeros while they
    are bf16 with integer zero points; what it holds comes back exactly, in the original order."""
    qw = act_order_weight()
    mod = QuantLinear.from_quantized(qw, None)
    backend, cpu = int4_native.BACKEND, torch.device("cpu")
    pack = backend.build(mod, torch.float32, cpu)
    assert backend.holds(pack, mod) == ("codes", "scales", "zeros")
    assert torch.equal(backend.recover(pack, mod, "codes"), qw.codes)
    assert torch.equal(backend.recover(pack, mod, "scales"), mod.scales)
    assert torch.equal(backend.recover(pack, mod, "zeros"), mod.qzeros)
    qw.zeros = qw.zeros + 0.37  # float zero points (HQQ) are stored in float16: not held
    mod = QuantLinear.from_quantized(qw, None)
    assert backend.holds(backend.build(mod, torch.float32, cpu), mod) == ("codes",)


@needs_kernel
def test_quantlinear_native_act_order_and_release() -> None:
    n, k = 64, 256
    qw = act_order_weight(n, k)
    mod = QuantLinear.from_quantized(qw, torch.randn(n))
    before = {name: t.clone() for name, t in mod.state_dict().items()}
    mod.backend = "reference"
    x = torch.randn(2, 5, k)
    ref = mod(x)
    mod.backend = "int4_native"
    assert rel(mod(x), ref) < BACKEND_RTOL
    assert isinstance(mod._cache, int4_native.NativeQ4Pack)
    assert mod.released_buffers() == {"qweight", "scales", "qzeros"}
    assert torch.equal(mod.codes(), qw.codes)  # recovered from the pack, original column order
    after = mod.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(unpack_codes(after["qweight"], 4, k), qw.codes)


@needs_kernel
def test_gradient_through_native() -> None:
    mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(32, 128), 4, 32, False), None)
    mod.backend = "int4_native"
    x = torch.randn(3, 128, requires_grad=True)
    g = torch.randn(3, 32)
    mod(x).backward(g)
    assert torch.allclose(x.grad, g @ mod.dequantize_weight(), rtol=1e-4, atol=1e-5)


@pytest.fixture
def fresh_native(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: ANN001
    """An empty build cache and no memoized library, restored afterwards."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    native._load.cache_clear()
    yield
    native._load.cache_clear()


def test_disabled_by_env_falls_back_to_torch_kernel(fresh_native: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    assert "QCORE_NATIVE=0" in (native.unavailable_reason() or "")
    mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(64, 256), 4, 128, False), None)
    assert "QCORE_NATIVE=0" in (mod.why_not("int4_native") or "")
    if has_int4_cpu():
        assert mod.select_backend() == "int4_cpu"


def test_failed_build_is_reported_and_leaves_nothing(fresh_native: None, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="qcore"):
        reason = native.unavailable_reason()
    assert reason is not None and "build failed" in reason
    assert "torch's int4 kernel" in caplog.text
    assert list((tmp_path / "native").iterdir()) == []  # no half-written library


def test_missing_compiler(fresh_native: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-qcore")
    assert "no C compiler" in (native.unavailable_reason() or "")


@needs_kernel
def test_build_is_cached(fresh_native: None, tmp_path) -> None:  # noqa: ANN001
    assert native.available()
    built = sorted((tmp_path / "native").iterdir())
    libs = [p for p in built if p.suffix == ".so"]
    assert len(libs) == 1 and built == sorted([libs[0], native.record_path(libs[0])]), built
    mtime = libs[0].stat().st_mtime_ns
    native._load.cache_clear()
    assert native.available()
    assert sorted((tmp_path / "native").iterdir()) == built and libs[0].stat().st_mtime_ns == mtime


@needs_kernel
def test_auto_prefers_native_for_every_int4_layer_it_runs() -> None:
    for gs in (32, 64, 128, -1):
        for n in (64, 100):
            mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(n, 512), 4, gs, False), None)
            assert mod.select_backend() == "int4_native", (gs, n)
