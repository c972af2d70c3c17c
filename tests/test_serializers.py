"""Module serializers: a plugin's module types save and load exactly (JSON + safetensors, no pickle),
wherever they sit; a checkpoint naming a type no plugin provides is refused by name; records
written before serializers (format 1, no "type") still load."""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import qcore
import qcore.registry
from qcore import checkpoint
from qcore.checkpoint import format as ckpt_format
from qcore.checkpoint.serializers import serializer_for, serializer_named
from qcore.plugin.errors import CheckpointError
from qcore.plugin.hookspecs import hookimpl
from qcore.quant.linear import QuantLinear
from qcore.tiny import tiny_inputs, tiny_model

PLUGIN, DISTRIBUTION = "test", "qcore-test-rotations"
WRAPPED = "model.layers.0.self_attn.q_proj"
CHILD_OF_QUANT = "model.layers.1.mlp.down_proj.input_transform"


# -- the test plugin's module types ---------------------------------------------------------------
class Rotation(nn.Module):
    """``x @ matrix``: a fixed orthogonal matrix held as a buffer."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)


class Rotated(nn.Module):
    """``inner(rotation(x))``: wraps a linear; both children are serialized on their own."""

    def __init__(self, inner: nn.Module | None = None, rotation: Rotation | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.rotation(x))


class RotationSerializer:
    type_name = "test.rotation"
    module_type = Rotation

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"size": int(module.matrix.shape[0])}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return Rotation(torch.empty(data["size"], data["size"], device=device))


class RotatedSerializer:
    type_name = "test.rotated"
    module_type = Rotated

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return Rotated()


class Transposed(nn.Module):
    """``x @ matrix``, then ``inner`` if set. Its state dict holds the matrix transposed, as
    ``stored.transposed``: a name the generic ``load_state_dict`` cannot assign to ``matrix``."""

    def __init__(self, matrix: torch.Tensor, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix.to(x.dtype)
        return y if self.inner is None else self.inner(y)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "stored.transposed"] = self.matrix.t().contiguous()


class TransposedSerializer:
    """Assigns ``Transposed``'s tensors itself (the optional ``load_tensors``)."""

    type_name = "test.transposed"
    module_type = Transposed
    received: ClassVar[list[list[str]]] = []

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        return {"size": int(module.matrix.shape[0])}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        return Transposed(torch.empty(data["size"], data["size"], device=device))

    def load_tensors(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        type(self).received.append(sorted(tensors))
        if set(tensors) != {"stored.transposed"}:
            raise KeyError(f"expected only stored.transposed, got {sorted(tensors)}")
        module.matrix = tensors["stored.transposed"].t().contiguous()


def registry_with_plugin() -> qcore.registry.Registry:
    """The installed plugins plus one registering the two serializers above."""
    plugin = types.ModuleType("qcore_test_rotations")
    plugin.QCORE_API = ">=1,<2"

    @hookimpl
    def qcore_register_serializers(register: Any) -> None:
        register(RotationSerializer())
        register(RotatedSerializer())
        register(TransposedSerializer())

    plugin.qcore_register_serializers = qcore_register_serializers
    reg = qcore.registry.Registry()
    reg.load_entry_points()
    reg.register_plugin(plugin, PLUGIN, DISTRIBUTION, "1.0")
    return reg


# -- helpers --------------------------------------------------------------------------------------
def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q.contiguous()


def quantized() -> nn.Module:
    model = tiny_model("llama")
    qcore.quantize(model, "rtn", bits=4, group_size=32, check=False)
    return model


def with_plugin_modules(model: nn.Module) -> nn.Module:
    """A wrapper around one quantized linear, and a rotation as the child of another."""
    attn = model.model.layers[0].self_attn
    attn.q_proj = Rotated(attn.q_proj, Rotation(orthogonal(attn.q_proj.in_features, 1)))
    down = model.model.layers[1].mlp.down_proj
    down.input_transform = Rotation(orthogonal(down.in_features, 2))
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def modules_record(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def edit_record(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def plugin_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A checkpoint holding the test plugin's modules (saved with the plugin installed), its
    inputs and logits; the plugin stays installed."""
    monkeypatch.setattr(qcore.registry, "_REGISTRY", registry_with_plugin())
    model = with_plugin_modules(quantized())
    x = tiny_inputs(model)
    return checkpoint.save(model, tmp_path / "ck"), x, logits(model, x)


# -- tests ----------------------------------------------------------------------------------------
def test_plugin_modules_round_trip_exactly_without_pickle(plugin_ckpt, monkeypatch):
    path, x, ref = plugin_ckpt
    qc = modules_record(path)
    modules = qc["modules"]
    assert modules[WRAPPED] == {"type": "test.rotated", "plugin": PLUGIN, "distribution": DISTRIBUTION}
    assert modules[f"{WRAPPED}.rotation"] == {"type": "test.rotation", "size": 64, "plugin": PLUGIN,
                                              "distribution": DISTRIBUTION}
    assert modules[f"{WRAPPED}.inner"]["type"] == "qcore.quant_linear"
    assert modules[CHILD_OF_QUANT]["type"] == "test.rotation"
    assert qc["format_version"] == 2  # an older qcore cannot rebuild these types: it must refuse
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors", ".md"}  # no pickle; the model card

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = checkpoint.load(path)
    wrapped = loaded.get_submodule(WRAPPED)
    assert type(wrapped) is Rotated and type(wrapped.inner) is QuantLinear
    assert torch.equal(wrapped.rotation.matrix, orthogonal(64, 1))
    child = loaded.get_submodule(CHILD_OF_QUANT)
    assert type(child) is Rotation and torch.equal(child.matrix, orthogonal(child.matrix.shape[0], 2))
    assert torch.equal(logits(loaded, x), ref)
    again = checkpoint.load(checkpoint.save(loaded, path.parent / "again"))
    assert torch.equal(logits(again, x), ref)


def test_unknown_type_names_the_plugin_to_install(plugin_ckpt, monkeypatch):
    path, *_ = plugin_ckpt
    monkeypatch.setattr(qcore.registry, "_REGISTRY", None)  # the installed plugins only
    with pytest.raises(CheckpointError, match="test.rotat") as err:
        checkpoint.load(path)
    assert DISTRIBUTION in str(err.value) and "install" in str(err.value)


def test_older_qcore_refuses_a_checkpoint_with_new_module_types(plugin_ckpt, monkeypatch):
    path, *_ = plugin_ckpt
    monkeypatch.setattr(ckpt_format, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="upgrade qcore"):
        checkpoint.load(path)


def test_format_1_record_without_types_loads(tmp_path):
    model = quantized()
    x = tiny_inputs(model)
    path = checkpoint.save(model, tmp_path / "ck")
    qc = modules_record(path)
    assert qc["format_version"] == 1
    assert {e["type"] for e in qc["modules"].values()} == {"qcore.quant_linear"}
    old = {name: {k: v for k, v in e.items() if k != "type"} for name, e in qc["modules"].items()}
    edit_record(path, modules=old)
    assert torch.equal(logits(checkpoint.load(path), x), logits(model, x))


def test_a_new_module_must_hang_below_a_rebuilt_one(plugin_ckpt):
    path, *_ = plugin_ckpt
    qc = modules_record(path)
    qc["modules"]["model.layers.0.stray"] = qc["modules"].pop(CHILD_OF_QUANT)
    edit_record(path, modules=qc["modules"])
    with pytest.raises(CheckpointError, match="'model.layers.0.stray'.* does not exist"):
        checkpoint.load(path)


def test_lookup_is_by_exact_type(monkeypatch):
    monkeypatch.setattr(qcore.registry, "_REGISTRY", registry_with_plugin())

    class MyRotation(Rotation):
        pass

    eye = torch.eye(4)
    assert serializer_for(Rotation(eye)).type_name == "test.rotation"
    assert serializer_for(MyRotation(eye)) is None and serializer_for(nn.Linear(4, 4)) is None
    assert serializer_named("qcore.quant_linear").module_type is QuantLinear
    assert serializer_named("nobody.knows") is None


def test_reserved_keys_in_to_json_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(qcore.registry, "_REGISTRY", registry_with_plugin())
    monkeypatch.setattr(RotatedSerializer, "to_json", lambda self, module: {"type": "mine"})
    with pytest.raises(CheckpointError, match="reserved"):
        checkpoint.save(with_plugin_modules(quantized()), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_a_serializer_can_assign_tensors_stored_under_other_names(tmp_path, monkeypatch):
    """``load_tensors`` gets the tensors under its module (not those of a nested module that has
    its own), named relative to it, and they skip the generic assignment and its checks."""
    monkeypatch.setattr(qcore.registry, "_REGISTRY", registry_with_plugin())
    monkeypatch.setattr(TransposedSerializer, "received", [])
    model = quantized()
    n = model.get_submodule(CHILD_OF_QUANT.rpartition(".")[0]).in_features
    outer = Transposed(orthogonal(n, 3), inner=Transposed(orthogonal(n, 4)))
    model.model.layers[1].mlp.down_proj.input_transform = outer
    x = tiny_inputs(model)
    ref = logits(model, x)
    path = checkpoint.save(model, tmp_path / "ck")
    keys = set(ckpt_format.read_tensors(path, ckpt_format.weight_files(path), "cpu"))
    assert {f"{CHILD_OF_QUANT}.stored.transposed", f"{CHILD_OF_QUANT}.inner.stored.transposed"} <= keys
    assert not any(k.endswith(".matrix") for k in keys)

    loaded = checkpoint.load(path)
    assert TransposedSerializer.received == [["stored.transposed"], ["stored.transposed"]]
    got = loaded.get_submodule(CHILD_OF_QUANT)
    assert type(got) is Transposed and type(got.inner) is Transposed
    assert torch.equal(got.matrix, orthogonal(n, 3)) and torch.equal(got.inner.matrix, orthogonal(n, 4))
    assert torch.equal(logits(loaded, x), ref)

    def broken(self: Any, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        raise KeyError("stored.transposed")

    monkeypatch.setattr(TransposedSerializer, "load_tensors", broken)
    with pytest.raises(CheckpointError, match=f"tensors of test.transposed module {CHILD_OF_QUANT} .*KeyError"):
        checkpoint.load(path)
    monkeypatch.delattr(TransposedSerializer, "load_tensors")  # the generic assignment alone cannot
    with pytest.raises(CheckpointError, match=r"not in the checkpoint, e\.g\. .*input_transform\.matrix"):
        checkpoint.load(path)
