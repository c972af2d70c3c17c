"""The kernel-backend registry: built-in backends, plugin backends chosen by ``auto`` or by name."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import qcore.registry
from qcore.plugin.errors import CompatibilityError
from qcore.plugin.hookspecs import hookimpl
from qcore.plugin.kernel import HELD, KernelBackend
from qcore.quant.act import ActQuant
from qcore.quant.backends import auto_order, backends, builtin_backends, get_backend
from qcore.quant.linear import BACKEND_ENV, BACKEND_RTOL, QuantLinear, backend_names
from qcore.quant.packing import unpack_codes
from qcore.quant.primitives import quantize_rtn

BUILTIN = ("w8a8", "int4_native", "int4_cpu", "int4_cuda", "int8_cpu", "dense", "dense_bf16", "reference")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer(bits: int = 4, gs: int = 64, in_f: int = 256, act: ActQuant | None = None) -> QuantLinear:
    w = torch.randn(64, in_f, generator=torch.Generator().manual_seed(0)) * 0.05
    return QuantLinear.from_quantized(quantize_rtn(w, bits, gs, False), torch.randn(64), act=act)


def test_every_builtin_backend_is_registered_and_says_why_not() -> None:
    found = backends()
    assert [b.name for b in builtin_backends()] == list(BUILTIN)
    assert all(found[b.name] is b and get_backend(b.name) is b for b in builtin_backends())
    assert all(isinstance(b, KernelBackend) for b in found.values())
    assert backend_names()[: len(BUILTIN) + 1] == ("auto", *BUILTIN)
    odd = layer(bits=5, gs=20, in_f=100)  # 5 bits, group 20, K not a multiple of 16: only the float ones
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for b in builtin_backends():
        reasons = [b.why_not(odd, cpu), b.why_not(layer(), cuda if b.devices == ("cpu",) else cpu)]
        if b.name.startswith("dense") or b.name == "reference":
            assert reasons[0] is None and b.devices == ("*",)
            continue
        for reason in reasons:
            assert isinstance(reason, str) and reason and "\n" not in reason, (b.name, reason)
    assert "w8a8 needs" in (get_backend("w8a8").why_not(layer(bits=8, gs=-1), cpu) or "")


def test_auto_order() -> None:
    assert [b.name for b in auto_order("cpu")] == ["w8a8", "int4_native", "int4_cpu", "int8_cpu", "dense"]
    assert [b.name for b in auto_order("cuda")] == ["w8a8", "int4_cuda", "dense"]
    assert [b.name for b in auto_order("mps")] == ["dense"]


def test_unknown_backend_lists_the_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CompatibilityError, match="unknown QuantLinear backend 'bogus'.*dense_bf16.*int4_cpu"):
        get_backend("bogus")
    mod = layer()
    monkeypatch.setenv(BACKEND_ENV, "int8_cpu")
    with pytest.raises(CompatibilityError, match="4-bit weights.*use one of: .*dense"):
        mod.select_backend()


class Float64Backend:
    """A third-party backend: the weight dequantized in float64, holding the codes."""

    name = "toy_f64"
    devices = ("cpu",)
    priority = 100
    autograd = False
    quantizes_act = False
    per_dtype = False

    def __init__(self) -> None:
        self.calls = 0

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        return None if layer.bits <= 4 else f"{layer.bits}-bit weights (toy_f64 takes at most 4 bits)"

    def build(self, layer: QuantLinear, dtype: torch.dtype, device: torch.device) -> Any:
        return SimpleNamespace(codes=layer.codes().clone(), w=layer.dequantize_weight().double())

    def mm(self, x: torch.Tensor, pack: Any, layer: QuantLinear) -> torch.Tensor:
        self.calls += 1
        return (x.double() @ pack.w.t()).to(x.dtype)

    def holds(self, pack: Any, layer: QuantLinear) -> tuple[str, ...]:
        return ("codes",)

    def recover(self, pack: Any, layer: QuantLinear, what: str) -> torch.Tensor:
        assert what in HELD
        return pack.codes


class ToyPlugin:
    QCORE_API = ">=1,<2"

    def __init__(self) -> None:
        self.backend = Float64Backend()

    @hookimpl
    def qcore_register_backends(self, register: Any) -> None:
        register(self.backend)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Float64Backend:
    reg = qcore.registry.Registry()
    reg.load_entry_points()  # qcore's own backends come through its built-in plugin
    plugin = ToyPlugin()
    reg.register_plugin(plugin, "toy", "qcore-toy", "0.1")
    monkeypatch.setattr(qcore.registry, "get_registry", lambda reload=False: reg)
    return plugin.backend


def test_plugin_backend_chosen_by_auto_and_by_name(toy: Float64Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_backend("toy_f64") is toy and toy.plugin == "toy"  # type: ignore[attr-defined]
    assert auto_order("cpu")[0] is toy and "toy_f64" in backend_names()
    mod = layer()
    x = torch.randn(3, 256)
    mod.backend = "reference"
    ref = mod(x)
    codes = mod.codes()
    mod.backend = "auto"
    assert mod.select_backend() == "toy_f64"
    assert rel(mod(x), ref) < 1e-6 and toy.calls == 1
    assert mod.released_buffers() == {"qweight"}  # what the pack holds is released, and recovered
    assert mod.resident_bytes() >= 64 * 256 * 9  # the pack: uint8 codes + a float64 weight
    assert torch.equal(mod.codes(), codes)
    assert torch.equal(unpack_codes(mod.state_dict()["qweight"], 4, 256), codes)
    xg = x.clone().requires_grad_()
    mod(xg).sum().backward()  # no autograd formula: the straight-through backward
    assert torch.allclose(xg.grad, mod.dequantize_weight().sum(0).expand(3, -1), atol=1e-5)
    mod.release_cache()
    assert not mod.released_buffers()
    eight = layer(bits=8, gs=-1)
    assert eight.select_backend() == "int8_cpu"  # toy_f64 refuses 8 bits: auto goes on
    monkeypatch.setenv(BACKEND_ENV, "toy_f64")
    assert layer(gs=32).select_backend() == "toy_f64"
    with pytest.raises(CompatibilityError, match="toy_f64 takes at most 4 bits"):
        eight(x)
    monkeypatch.delenv(BACKEND_ENV)
    int4 = layer(gs=32)
    int4.backend = "toy_f64"
    ref4 = int4(x)
    int4.backend = "reference"
    assert rel(ref4, int4(x)) < BACKEND_RTOL


def test_plugin_cannot_replace_a_builtin_backend_or_register_half_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    class Impostor(Float64Backend):
        name = "int4_cpu"

    def plugin(*backends: Any) -> Any:
        class Plugin:
            QCORE_API = ">=1,<2"

            @hookimpl
            def qcore_register_backends(self, register: Any) -> None:
                for b in backends:
                    register(b)
        return Plugin()

    reg = qcore.registry.Registry()
    reg.load_entry_points()
    reg.register_plugin(plugin(Impostor()), "zimpostor")
    reg.register_plugin(plugin(SimpleNamespace(name="half", priority=1000)), "zhalf")
    monkeypatch.setattr(qcore.registry, "get_registry", lambda reload=False: reg)
    assert reg.extensions("qcore_register_backends")["int4_cpu"] is builtin_backends()[2]
    assert reg.plugins["zimpostor"].status == "failed" and "already registered" in reg.plugins["zimpostor"].error
    assert get_backend("int4_cpu") is builtin_backends()[2]
    with pytest.raises(CompatibilityError, match="unknown QuantLinear backend 'half'"):
        get_backend("half")
    assert layer().select_backend() != "half"
