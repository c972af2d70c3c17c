"""The shared conformance suite: the built-in RTN passes it, and it fails a method that does
nothing or one that breaks the model."""
from __future__ import annotations

from typing import Any

import pytest

from qcore.plugin import BaseQuantizer, BlockContext, Capabilities, MethodSpec, WeightQuantConfig, hookimpl
from qcore.testing import MethodConformance


class TestRTNConformance(MethodConformance):
    method = "rtn"
    plugin_module = "qcore.methods.rtn"
    tiny_options = {"bits": 4, "group_size": 32}
    unsupported = [({"bits": 5}, "bits"), ({"group_size": 48}, "group_size 48")]
    max_error_vs_rtn = 1.0  # it is RTN


class NoOpConfig(WeightQuantConfig):
    method = "noop"


class NoOp(BaseQuantizer):
    """Quantizes nothing."""


class Zeroing(BaseQuantizer):
    """Packs every linear, with all-zero weights."""

    def process_block(self, block: BlockContext) -> None:
        import torch

        from qcore.quant.primitives import quantize_rtn

        for name in block.quantizable(self.config):
            p = block.precision(name, self.config)
            w = torch.zeros_like(block.linear(name).weight, dtype=torch.float32)
            block.quantize_linear(name, quantize_rtn(w, p.bits, p.group_size, p.sym))


def bad_plugin(name: str, cls: type) -> Any:
    """A plugin object registering one method run by ``cls``."""
    spec = MethodSpec(name=name, summary=name, config_cls=NoOpConfig, quantizer=cls,
                      capabilities=Capabilities(kind="weight-only", weight_bits=(4,)))

    class Plugin:
        QCORE_API = ">=1,<2"

        @hookimpl
        def qcore_register_methods(self, register: Any) -> None:
            register(spec)

    return Plugin()


@pytest.fixture
def bad_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcore.registry import get_registry

    registry = get_registry()
    for name, cls in (("noop", NoOp), ("zeroing", Zeroing)):
        registry.register_plugin(bad_plugin(name, cls), f"test-{name}")
    yield
    for name in ("noop", "zeroing"):
        registry.unregister_plugin(f"test-{name}")


@pytest.mark.usefixtures("bad_methods")
def test_the_suite_fails_a_method_that_does_nothing() -> None:
    class Suite(MethodConformance):
        method = "noop"
        tiny_options = {"bits": 4, "group_size": 32}

    with pytest.raises(AssertionError, match="not packed"):
        Suite().test_tiny_model_quantizes()
    with pytest.raises(AssertionError, match="changed nothing"):
        Suite().test_error_below_bound()


@pytest.mark.usefixtures("bad_methods")
def test_the_suite_fails_a_method_that_breaks_the_model() -> None:
    class Suite(MethodConformance):
        method = "zeroing"
        tiny_options = {"bits": 4, "group_size": 32}

    Suite().test_tiny_model_quantizes()  # packed, finite: only the error bound can tell
    with pytest.raises(AssertionError, match="x RTN's"):
        Suite().test_error_below_bound()
