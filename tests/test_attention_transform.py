"""Attention transforms (``BlockContext.set_attention_transform``, :mod:`qcore.quant.attention`): a
serialized module attached to an attention module rewrites q, k, v before the attention kernel
through transformers' attention interface, is saved, and is re-attached by ``qcore.load``."""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qcore
import qcore.registry
from qcore import checkpoint
from qcore.plugin import BaseQuantizer, Capabilities, MethodSpec
from qcore.plugin.errors import ArchitectureError
from qcore.plugin.hookspecs import hookimpl
from qcore.quant.attention import ATTACH_NAME, PREFIX, attach, install
from qcore.tiny import tiny_inputs, tiny_model


class ScaleKeys(nn.Module):
    """Keys times a per-channel factor (a buffer): changes the attention scores."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("factor", torch.ones(head_dim))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return query, key * self.factor.to(key.dtype), value


class ScaleKeysSerializer:
    type_name = "test.scale_keys"
    module_type = ScaleKeys

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"head_dim": int(module.factor.numel())}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return ScaleKeys(int(data["head_dim"])).to(device)


def registry_with_plugin() -> qcore.registry.Registry:
    plugin = types.ModuleType("qcore_test_attention")
    plugin.QCORE_API = ">=1,<2"

    @hookimpl
    def qcore_register_serializers(register: Any) -> None:
        register(ScaleKeysSerializer())

    plugin.qcore_register_serializers = qcore_register_serializers
    reg = qcore.registry.Registry()
    reg.load_entry_points()
    reg.register_plugin(plugin, "test_attention", "qcore-test-attention", "1.0")
    return reg


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _scaled(model: nn.Module) -> nn.Module:
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    transform = ScaleKeys(head_dim)
    transform.factor.copy_(torch.linspace(0.2, 3.0, head_dim))
    attach(model, "model.layers.1.self_attn", transform)
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transform_runs_before_the_kernel(impl: str) -> None:
    model = tiny_model("llama")
    model.config._attn_implementation = impl
    ids = tiny_inputs(model)
    ref = _logits(model, ids)
    attach(model, "model.layers.1.self_attn", ScaleKeys(model.config.hidden_size // model.config.num_attention_heads))
    assert model.config._attn_implementation == PREFIX + impl
    assert torch.allclose(_logits(model, ids), ref, atol=1e-6)  # factor 1: the same attention
    getattr(model.model.layers[1].self_attn, ATTACH_NAME).factor.fill_(2.0)
    assert not torch.allclose(_logits(model, ids), ref, atol=1e-3)  # it runs
    with pytest.raises(ArchitectureError, match="already has an attention transform"):
        attach(model, "model.layers.1.self_attn", ScaleKeys(4))


def test_a_model_without_transforms_is_not_routed() -> None:
    model = tiny_model("llama")
    assert not install(model) and model.config._attn_implementation == "sdpa"


def test_save_load_reattaches_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcore.registry, "_REGISTRY", registry_with_plugin())
    model = tiny_model("llama")
    qcore.quantize(model, "rtn", bits=4, group_size=32, check=False)
    ids = tiny_inputs(model)
    plain = _logits(model, ids)
    ref = _logits(_scaled(model), ids)
    assert not torch.equal(ref, plain)
    path = checkpoint.save(model, tmp_path / "ck")
    loaded = checkpoint.load(path)
    assert isinstance(getattr(loaded.model.layers[1].self_attn, ATTACH_NAME), ScaleKeys)
    assert loaded.config._attn_implementation.startswith(PREFIX)
    assert torch.equal(_logits(loaded, ids), ref)


def test_engine_attaches_through_the_block_context() -> None:
    class Attacher(BaseQuantizer):
        def process_block(self, block: Any) -> None:
            block.set_attention_transform("self_attn", ScaleKeys(16))
            with pytest.raises(ArchitectureError, match="no module 'nope'"):
                block.set_attention_transform("nope", ScaleKeys(16))

    from qcore.pipeline.engine import run_chain
    from qcore.plugin import QuantConfig

    model = tiny_model("llama")
    spec = MethodSpec(name="attacher", summary="test", config_cls=QuantConfig, quantizer="x:y",
                      capabilities=Capabilities(kind="transform"))
    run_chain(model, [Attacher(QuantConfig(), spec)])
    assert all(isinstance(getattr(layer.self_attn, ATTACH_NAME), ScaleKeys) for layer in model.model.layers)
