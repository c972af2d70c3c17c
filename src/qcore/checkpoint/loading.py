"""``load``: rebuild a model saved by :func:`qcore.checkpoint.save` without materializing float weights.

The model is built from its config with parameters on the ``meta`` device
(:mod:`qcore.checkpoint.skeleton`), :func:`qcore.arch.surgery.prepare_model` is applied, every
serialized module is rebuilt empty and set in place (parents before children), then the tensors
read from safetensors are assigned: with ``load_state_dict(..., assign=True)``, except those of
modules whose serializer assigns them itself (:class:`qcore.plugin.serialize.LoadsTensors`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.checkpoint.format import (
    QUANT_LINEAR_TYPE,
    TOKENIZER_FILES,
    check_files,
    checkpoint_dir,
    entry_type,
    quantization_config,
    read_config,
    read_tensors,
    weight_files,
)
from qcore.checkpoint.serializers import Table, serializer_named, serializers
from qcore.checkpoint.skeleton import build_empty
from qcore.plugin.errors import CheckpointError
from qcore.plugin.serialize import RESERVED_KEYS, LoadsTensors, ModuleSerializer

Loaders = dict[str, tuple[nn.Module, LoadsTensors]]
"""Rebuilt modules whose serializer assigns their tensors, by name (parents first)."""


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         *, with_tokenizer: bool = False, verify: bool = True) -> Any:
    """Rebuild a model saved by :func:`qcore.checkpoint.save` without materializing float weights.

    ``dtype`` casts the float (non-quantized) parameters; ``verify`` checks each weight file's
    sha256 against the one recorded at save time. With ``with_tokenizer=True`` returns
    ``(model, tokenizer)``.
    """
    imported = _import_foreign(path, device, dtype)
    if imported is not None:
        return (imported, load_tokenizer(checkpoint_dir(path))) if with_tokenizer else imported
    ckpt = open_checkpoint(path, dtype, verify=verify)
    model = ckpt.model
    assign_tensors(ckpt, read_tensors(ckpt.root, ckpt.files, device))
    if dtype is not None:
        _cast_float_params(model, dtype)
    model.to(device)
    post_load(ckpt)
    if with_tokenizer:
        return model, load_tokenizer(ckpt.root)
    return model


def _import_foreign(path: str | os.PathLike[str], device: str | torch.device,
                    dtype: torch.dtype | None) -> nn.Module | None:
    """Another tool's checkpoint that qcore reads (:data:`qcore.formats.IMPORTERS`), or None."""
    from qcore.formats import importer_for

    root = checkpoint_dir(path)
    config = read_config(root)
    fmt = importer_for(config)
    return fmt.load(root, config, device, dtype) if fmt is not None else None


@dataclass
class OpenCheckpoint:
    """A qcore checkpoint's model with every tensor on meta, and what filling it needs."""

    model: nn.Module
    root: Path
    files: list[str]
    tied: dict[str, str]
    """``{dropped name: kept name}`` of tensors saved once (tied embeddings)."""
    rebuilt: dict[str, tuple[nn.Module, ModuleSerializer]]
    """The serialized modules, rebuilt empty, by name (parents first)."""

    @property
    def loaders(self) -> Loaders:
        return {name: (module, ser) for name, (module, ser) in self.rebuilt.items()
                if callable(getattr(ser, "load_tensors", None))}


def open_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype | None = None, *,
                    verify: bool = True) -> OpenCheckpoint:
    """The model of a qcore checkpoint on meta: built from its config, prepared, its serialized
    modules rebuilt empty and its attention routed (no tensor is read)."""
    root = checkpoint_dir(path)
    files = weight_files(root)
    config_dict = read_config(root)
    qconfig = quantization_config(config_dict, root)
    saved = qconfig.get("checkpoint", {})
    check_files(root, files, saved.get("files", {}), verify)

    model = build_empty(config_dict, root, dtype)
    from qcore.arch.surgery import prepare_model

    prepare_model(model)
    rebuilt = rebuild_modules(model, qconfig.get("modules", {}), root)
    from qcore.quant.attention import install

    install(model)  # route the attention through re-attached attention transforms
    model.eval()
    model.qcore_record = {k: v for k, v in qconfig.items() if k not in ("checkpoint", "quant_method")}
    return OpenCheckpoint(model, root, files, dict(saved.get("tied", {})), rebuilt)


def assign_tensors(ckpt: OpenCheckpoint, state: dict[str, torch.Tensor], scope: str = "",
                   recurse: bool = True) -> None:
    """Assign the tensors ``state`` read from ``ckpt``'s files to its model: all of them (``scope``
    empty), or those of module ``scope`` (with its submodules when ``recurse``). ``state`` holds
    every tensor of the scope; a tie to a tensor outside the scope is given as the stored tensor
    under the dropped name."""
    loaders = {n: v for n, v in ckpt.loaders.items() if _module_in_scope(n, scope, recurse)}
    tied = {d: k for d, k in ckpt.tied.items() if in_scope(d, scope, recurse) and in_scope(k, scope, recurse)}
    _assign(ckpt.model, state, tied, ckpt.root, loaders, scope, recurse)


def post_load(ckpt: OpenCheckpoint, scope: str = "", recurse: bool = True) -> None:
    """Let the rebuilt modules of ``scope`` derive run-time state from their assigned tensors."""
    _post_load([m for n, (m, _) in ckpt.rebuilt.items() if _module_in_scope(n, scope, recurse)])


def in_scope(name: str, scope: str, recurse: bool) -> bool:
    """Whether tensor or module ``name`` lies under module ``scope`` (directly unless ``recurse``)."""
    if scope:
        if not name.startswith(scope + "."):
            return False
        name = name[len(scope) + 1:]
    return recurse or "." not in name


def _module_in_scope(name: str, scope: str, recurse: bool) -> bool:
    return name == scope or (recurse and in_scope(name, scope, True))


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved beside a checkpoint (``save(..., tokenizer=tok)``)."""
    root = checkpoint_dir(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {root}: pass tokenizer= to qcore.save, or load the "
                              "tokenizer of the original model with AutoTokenizer.from_pretrained")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:  # noqa: BLE001 - any failure: name the directory
        raise CheckpointError(f"cannot load the tokenizer in {root} ({type(exc).__name__}: {exc}); "
                              "re-save the checkpoint with a working tokenizer") from exc


# -- serialized modules ---------------------------------------------------------------------------
def rebuild_modules(model: nn.Module, modules: dict[str, dict[str, Any]],
                    root: Path) -> dict[str, tuple[nn.Module, ModuleSerializer]]:
    """Build every module of ``modules`` empty (on meta) and set it in place, parents first;
    returns them with their serializers, by name. A module may be new only as the child of
    another rebuilt one, or as an attention transform (:mod:`qcore.quant.attention`)."""
    table = serializers()
    rebuilt: dict[str, tuple[nn.Module, ModuleSerializer]] = {}
    for name, entry in sorted(modules.items(), key=lambda kv: kv[0].count(".")):
        type_name = entry_type(entry)
        serializer = _serializer(name, entry, table, root)
        parent_name, _, leaf = name.rpartition(".")
        old = _existing(model, name, type_name, parent_name in rebuilt, root)
        _check_features(old, entry, name, root)
        data = {k: v for k, v in entry.items() if k not in RESERVED_KEYS}
        try:
            new = serializer.build(data, "meta")
        except Exception as exc:  # noqa: BLE001 - a description from another version
            raise CheckpointError(f"{root}: cannot rebuild {_kind(type_name)} {name} from {data} "
                                  f"({type(exc).__name__}: {exc}); upgrade qcore or re-save") from exc
        setattr(model.get_submodule(parent_name), leaf, new)
        rebuilt[name] = (new, serializer)
    return rebuilt


def _kind(type_name: str) -> str:
    return "quantized module" if type_name == QUANT_LINEAR_TYPE else f"{type_name} module"


def _serializer(name: str, entry: dict[str, Any], table: Table, root: Path) -> ModuleSerializer:
    """The installed serializer of an entry, or an error naming the plugin to install."""
    type_name = entry_type(entry)
    found = serializer_named(type_name, table)
    if found is not None:
        return found
    plugin, dist = entry.get("plugin"), entry.get("distribution")
    source = _install_advice(plugin, dist)
    raise CheckpointError(f"{root}: module {name} has type {type_name!r}, which no installed qcore plugin "
                          f"can rebuild: {source}, then load again ('qcore plugins' lists what is installed"
                          f"{_plugin_state(plugin)})")


def _install_advice(plugin: Any, dist: Any) -> str:
    """A pip command only for qcore's own plugins; a recorded third-party distribution is named as
    provenance, not as advice (a checkpoint's JSON is not a trusted source of package names)."""
    from qcore.registry import FIRST_PARTY_DISTRIBUTIONS, known_distribution

    if plugin in FIRST_PARTY_DISTRIBUTIONS:
        return f"install or upgrade its plugin with: pip install -U {FIRST_PARTY_DISTRIBUTIONS[plugin]}"
    if dist and known_distribution(str(dist)):
        return f"install or upgrade {dist} (it provides the qcore plugin {plugin!r})"
    if plugin:
        recorded = f" (the checkpoint names the distribution {dist!r}; install it only if you trust that name)" \
            if dist else ""
        return f"install the qcore plugin {plugin!r}{recorded}"
    return "install the qcore plugin that provides it"


def _plugin_state(plugin: Any) -> str:
    from qcore.registry import get_registry

    info = get_registry().plugins.get(str(plugin)) if plugin else None
    return f"; plugin {plugin!r} is installed but {info.status}: {info.error}" if info and info.status != "ok" else ""


def _existing(model: nn.Module, name: str, type_name: str, parent_rebuilt: bool, root: Path) -> nn.Module | None:
    """The module at ``name`` in the model built from config.json (None for a rebuilt parent's new child
    and for an attention transform, :data:`qcore.quant.attention.ATTACH_NAME`, below an existing module)."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is not None and hasattr(parent, leaf):
        return getattr(parent, leaf)
    from qcore.quant.attention import ATTACH_NAME

    if parent_rebuilt or (parent is not None and leaf == ATTACH_NAME):  # an attention transform attaches
        return None
    raise CheckpointError(f"{root}: the {_kind(type_name)} {name!r} does not exist in the "
                          f"{type(model).__name__} built from config.json; the checkpoint does not "
                          "match its config: re-save it")


def _check_features(old: nn.Module | None, entry: dict[str, Any], name: str, root: Path) -> None:
    """A rebuilt linear must have the shape of the linear it replaces."""
    if old is None or not all(k in entry for k in ("in_features", "out_features")):
        return
    in_f = getattr(old, "in_features", None)
    out_f = getattr(old, "out_features", None)
    if (in_f, out_f) != (entry.get("in_features"), entry.get("out_features")):
        raise CheckpointError(f"{root}: {name} is {in_f}x{out_f} (in x out) in the model built from "
                              f"config.json but {entry.get('in_features')}x{entry.get('out_features')} in "
                              "quantization_config.modules; the checkpoint is inconsistent: re-save it")


# -- tensors --------------------------------------------------------------------------------------
def _assign(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str], root: Path,
            loaders: Loaders | None = None, scope: str = "", recurse: bool = True) -> None:
    loaders = loaders or {}
    state, tied, owned = _split_owned(state, tied, loaders)
    expected = {k for k in model.state_dict() if _owner(k, loaders) is None and in_scope(k, scope, recurse)}
    missing = sorted(expected - set(state) - set(tied))
    unexpected = sorted(set(state) - expected)
    if missing:
        raise CheckpointError(f"{root} lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{', '.join(missing[:5])}: the checkpoint is truncated or incomplete; re-save it")
    if unexpected:
        raise CheckpointError(f"{root} has {len(unexpected)} tensor(s) the model built from config.json does not, "
                              f"e.g. {', '.join(unexpected[:5])}; the checkpoint does not match its config: re-save it")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the tensors in {root} do not fit the model built from config.json ({exc}); "
                              "re-save the checkpoint") from exc
    for dropped, kept in tied.items():
        _set_tensor(model, dropped, _get_tensor(model, kept))
    for name, (module, serializer) in loaders.items():
        try:
            serializer.load_tensors(module, owned[name])
        except Exception as exc:  # noqa: BLE001 - tensors from another version or a damaged file
            type_name = getattr(serializer, "type_name", type(serializer).__name__)
            raise CheckpointError(f"{root}: cannot load the tensors of {_kind(type_name)} {name} "
                                  f"({type(exc).__name__}: {exc}); the checkpoint does not match its config "
                                  "or was saved by another plugin version: re-save it") from exc
    on_meta = [n for n, t in _all_tensors(model) if t.device.type == "meta" and in_scope(n, scope, recurse)]
    if on_meta:
        raise CheckpointError(f"{root}: {len(on_meta)} tensor(s) were not in the checkpoint, e.g. "
                              f"{', '.join(on_meta[:5])}: it is truncated or incomplete; re-save it")


def _owner(name: str, loaders: Loaders) -> str | None:
    """The innermost module of ``loaders`` that tensor ``name`` lies under, or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in loaders:
            return prefix
    return None


def _split_owned(state: dict[str, torch.Tensor], tied: dict[str, str], loaders: Loaders
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, torch.Tensor]]]:
    """``(state, tied, owned)``: the tensors for ``load_state_dict`` and its ties, and each
    loader's own tensors by relative name (a tie resolved to the stored tensor)."""
    if not loaders:
        return state, tied, {}
    owned: dict[str, dict[str, torch.Tensor]] = {name: {} for name in loaders}
    generic: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        owner = _owner(key, loaders)
        if owner is None:
            generic[key] = tensor
        else:
            owned[owner][key[len(owner) + 1:]] = tensor
    generic_tied: dict[str, str] = {}
    for dropped, kept in tied.items():
        owner = _owner(dropped, loaders)
        if owner is None and _owner(kept, loaders) is None:
            generic_tied[dropped] = kept
        elif kept in state:  # a loader's tensor, or tied to one: hand over the stored tensor
            if owner is None:
                generic[dropped] = state[kept]
            else:
                owned[owner][dropped[len(owner) + 1:]] = state[kept]
    return generic, generic_tied, owned


def _all_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent), leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if leaf in parent._parameters:
        parent._parameters[leaf] = value  # type: ignore[assignment]
    elif leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        setattr(parent, leaf, value)


def _cast_float_params(model: nn.Module, dtype: torch.dtype) -> None:
    from qcore.quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
    model.config.dtype = dtype


def _post_load(modules: list[nn.Module]) -> None:
    """Let rebuilt modules derive state (e.g. kernel layouts) from their loaded tensors."""
    for module in modules:
        hook = getattr(module, "post_load", None)
        if callable(hook):
            hook()
