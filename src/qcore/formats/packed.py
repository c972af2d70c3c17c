"""What the GPTQ and AWQ checkpoint layouts share: reading one into qcore's modules, the checks of
what an integer-code layout with float16 scales can hold, and writing one.

A format module supplies the per-layer parts (how its tensors become a
:class:`~qcore.quant.primitives.QuantizedWeight` and back, its ``quantization_config``); these
functions do the rest, the same way for both.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.plugin.errors import CheckpointError

QCORE_HINT = "qcore's own format (qcore.save) holds it"
MAX_SHARD_BYTES = 5 * 10**9
"""Largest weight file written; bigger models are split into shards with an index."""


def to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# -- import ---------------------------------------------------------------------------------------
def load_layers(root: Path, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None,
                make_weight: Callable[[str, dict[str, Tensor]], Any], suffixes: tuple[str, ...], *,
                packed_key: str = "qweight", scale_key: str = "scales") -> nn.Module:
    """The model of ``config.json`` with every layer holding ``NAME.<packed_key>`` rebuilt as a
    ``QuantLinear`` (``make_weight(NAME, parts)`` turns its ``suffixes`` tensors into a
    QuantizedWeight; scales kept exactly in the dtype of ``NAME.<scale_key>``) and every other
    tensor loaded as stored."""
    from qcore.arch.surgery import prepare_model
    from qcore.checkpoint.format import read_tensors, weight_files
    from qcore.checkpoint.loading import _cast_float_params
    from qcore.checkpoint.skeleton import build_empty
    from qcore.quant.linear import QuantLinear

    method = config["quantization_config"].get("quant_method")
    model = build_empty(config, root, dtype)
    prepare_model(model)
    state = read_tensors(root, weight_files(root), device)
    suffix = f".{packed_key}"
    prefixes = sorted(k[: -len(suffix)] for k in state if k.endswith(suffix))
    if not prefixes:
        raise CheckpointError(f"{root}: quant_method is {method} but no tensor ends in {suffix}: the checkpoint "
                              f"is incomplete or not {method}")
    for name in prefixes:
        parts = {s: state.pop(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in state}
        bias = state.pop(f"{name}.bias", None)
        try:
            qw = make_weight(name, parts)
        except KeyError as exc:
            raise CheckpointError(f"{root}: layer {name} lacks {exc.args[0]}: the checkpoint is incomplete") from exc
        except ValueError as exc:  # the tensors are not in the layout quant_method names
            raise CheckpointError(f"{root}: layer {name}: {exc}; config.json says quant_method {method!r} but the "
                                  "weights were written by something else: re-export or re-save the checkpoint") from exc
        scale_dtype = parts[scale_key].dtype
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                QuantLinear.from_quantized(qw, bias.float() if bias is not None else None, scale_dtype=scale_dtype))
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    if missing and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{root}: {len(left)} tensor(s) are not in the checkpoint, e.g. {', '.join(left[:3])}")
    if dtype is not None:
        _cast_float_params(model, dtype)  # float parameters only: QuantLinear keeps its buffers
    model.to(device).eval()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_load()
    return model


def imported_record(method: str, config: dict[str, Any], qc: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``qcore_record`` of an imported checkpoint: one chain step naming the format and writer."""
    import qcore
    from qcore.checkpoint.format import FORMAT

    tool = (qc.get("meta") or {}).get("quantizer") or qc.get("quantizer")
    return {"format": FORMAT, "qcore_version": qcore.__version__,
            "chain": [{"method": method, "config": config, "imported": method, "quantizer": tool, **extra}]}


# -- export ---------------------------------------------------------------------------------------
def check(model: nn.Module, fmt: str, layer_problems: Callable[[Any], list[str]]) -> list[str]:
    """Why format ``fmt`` cannot hold ``model``: the model-wide checks (a transformers model with
    quantized layers of one width and group size, nothing else qcore serializes, shapes transformers
    builds as ``nn.Linear``) and ``layer_problems`` of each layer."""
    from qcore.formats import compressed_tensors as ct

    if not hasattr(getattr(model, "config", None), "to_json_string"):
        return [f"{type(model).__name__} has no Hugging Face config; the {fmt} format needs a transformers model"]
    layers = ct.quantized_layers(model)
    if not layers:
        return ["the model has no quantized linear layers (QuantLinear): quantize it with qcore.quantize first"]
    found: dict[str, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        for reason in common_problems(layer, fmt) + layer_problems(layer):
            found[reason].append(name)
    settings = {(layer.bits, layer.group_size) for layer in layers.values()}
    if len(settings) > 1:
        found[f"per-layer mixed bits or group sizes ({', '.join(f'{b}-bit g{g}' for b, g in sorted(settings))}): "
              f"a {fmt} checkpoint has one bits/group_size; compressed-tensors holds mixed symmetric schemes, "
              f"{QCORE_HINT}"] = sorted(layers)
    for name, reason in ct.other_modules(model, layers) + ct.shape_problems(model, layers):
        found[reason].append(name)
    return [f"{reason} ({ct._shown(names)})" for reason, names in found.items()]


def common_problems(layer: Any, fmt: str) -> list[str]:
    """What of one ``QuantLinear`` no integer-code layout with float16 scales holds."""
    from qcore.formats import compressed_tensors as ct

    problems: list[str] = []
    if not ct._integer_zeros(layer):
        problems.append(f"float or out-of-range zero points (e.g. HQQ): {fmt} stores integer zero points; "
                        f"{QCORE_HINT}")
    else:
        scales = layer.scales_zeros()[0].float()
        if not torch.equal(scales.to(torch.float16).float(), scales):
            problems.append(f"scales that float16 cannot hold exactly ({fmt} stores float16 scales); {QCORE_HINT}")
    if layer.input_transform is not None:
        problems.append(f"an online input transform ({type(layer.input_transform).__name__}, e.g. a QuaRot "
                        f"rotation) that runs before the matmul; {QCORE_HINT}")
    if layer.act is not None:
        problems.append(f"activation quantization (A{layer.act.bits}): {fmt} is weight-only; {QCORE_HINT}")
    return problems


def write_checkpoint(model: nn.Module, target: Path, tokenizer: Any,
                     layer_tensors: Callable[[str, Any], dict[str, Tensor]], qconfig: dict[str, Any]) -> None:
    """Write ``model`` (already checked) into the folder ``target``: each quantized layer's
    ``layer_tensors``, every other tensor as held (tied ones once), ``config.json`` with
    ``qconfig``, the generation config and the tokenizer."""
    from qcore.checkpoint.atomic import write_json
    from qcore.checkpoint.format import CONFIG_FILE
    from qcore.checkpoint.saving import dedupe_tied
    from qcore.checkpoint.streaming import TensorSpec, write_shards
    from qcore.formats import compressed_tensors as ct

    layers = ct.quantized_layers(model)
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        prefix = key.rpartition(".")[0]
        if prefix in layers:
            if f"{prefix}.qweight" not in tensors:
                tensors.update(layer_tensors(prefix, layers[prefix]))
            continue
        tensors[key] = value.detach().cpu()
    tensors = dedupe_tied(tensors)[0]
    write_shards([TensorSpec(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()],
                 target, MAX_SHARD_BYTES)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qconfig
    write_json(target / CONFIG_FILE, config, sort_keys=True)
    ct._write_extras(model, target, tokenizer)
