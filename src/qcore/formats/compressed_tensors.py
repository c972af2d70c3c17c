"""compressed-tensors ``pack-quantized``: the weight-only integer format that llm-compressor writes
and that vLLM and transformers (with the ``compressed-tensors`` package) load.

What is written (``KIND = "dir"``)::

    config.json             # the model's config + quantization_config (below)
    model.safetensors       # or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json  # when the model generates
    tokenizer files         # when a tokenizer is given

For every ``QuantLinear`` named ``NAME`` (``out`` x ``in``, ``bits`` 4 or 8, ``G`` groups):

* ``NAME.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: the codes, ``32 / bits`` per word,
  the first in the lowest bits. compressed-tensors' values are signed (``[-2**(bits-1),
  2**(bits-1))``) and packed as ``value + 2**(bits-1)``: exactly qcore's unsigned codes, so these
  words are qcore's own ``qweight`` words (the codes are carried over, never re-quantized);
* ``NAME.weight_scale`` ``[out, G]`` in the dtype qcore stores them in (bfloat16 for 4 bits,
  float16 for 8, float32 where float16 would lose a value): the values are copied exactly;
* ``NAME.weight_zero_point`` int32 ``[ceil(out * bits / 32), G]``, asymmetric layers only: the
  zero points in compressed-tensors' signed domain (``qzeros - 2**(bits-1)``), packed like the
  codes but along the output dimension; a symmetric layer has none (its zero is
  ``2**(bits-1)``, which is 0 in the signed domain);
* ``NAME.weight_shape`` int64 ``[2]``: ``(out, in)``;
* ``NAME.bias`` (when the layer has one) in the model's float dtype.

W8A8 (SmoothQuant's output: 8-bit per-channel symmetric weights, dynamic per-token symmetric int8
activations) is written as ``int-quantized``: ``NAME.weight`` int8 ``[out, in]`` (qcore's codes -
128), ``NAME.weight_scale`` ``[out, 1]``, and the config group's ``input_activations`` (8-bit,
``strategy: token``, dynamic). Its activation grid differs by convention from qcore's
(compressed-tensors divides each token's max by 127.5 and rounds into [-128, 127]; qcore by 127
into [-127, 127]).

For pack-quantized, ``w = (weight - zero_point) * scale`` in the signed domain is qcore's
``(codes - qzeros) * scales``. Every other tensor (embeddings, norms, ``lm_head``, any linear left
in float) is written as the model holds it, in its own dtype (tied tensors once).

``quantization_config``: ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``,
``quantization_status: "compressed"``, one config group per scheme (bits, group size, symmetric):
one scheme targets ``["Linear"]``; several (per-layer mixed precision) list their layers by name.
``ignore`` names every ``nn.Linear`` of the model that stays in float (``lm_head`` ...). With an
asymmetric layer, ``dequantize: true`` too (:data:`DEQUANTIZE_KEY`): transformers then dequantizes
while loading, in the scales' dtype.

Refused (:func:`check`), each reason naming the format that holds it: bits other than 4 and 8
(vLLM's pack-quantized kernels run only those), float or out-of-range zero points (HQQ),
per-layer mixed schemes that include an asymmetric one (transformers' asymmetric path applies one
scheme to every layer), act-order with a permuted ``g_idx`` (compressed-tensors dropped act-order
groups), online input transforms (QuaRot rotations, channel scales), activation quantization other
than W8A8 (below), W8A8 layers mixed with weight-only ones, any
other module type qcore saves (NF4, attention transforms...), and quantized layers that
transformers does not build as an ``nn.Linear`` of the same shape (GPT-2's ``Conv1D``, fused MoE
experts).
"""
from __future__ import annotations

import copy
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.checkpoint.atomic import write_json
from qcore.checkpoint.format import CONFIG_FILE
from qcore.checkpoint.saving import dedupe_tied
from qcore.checkpoint.serializers import serializer_for, serializers
from qcore.checkpoint.skeleton import params_on_meta
from qcore.checkpoint.streaming import TensorSpec, write_shards
from qcore.formats import ExportError
from qcore.quant.linear import QuantLinear
from qcore.quant.packing import pack_codes

KIND = "dir"

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"
"""W8A8: int8 weights stored unpacked (``weight``), activations quantized per token at run time."""
STATUS = "compressed"
FORMAT_VERSION = "0.20.1"
"""The compressed-tensors release whose layout is written (``quantization_config.version``)."""
SUPPORTED_BITS: tuple[int, ...] = (4, 8)
"""Weight bits that vLLM's pack-quantized (WNA16) kernels run."""
LINEAR_TARGET = "Linear"
"""The target of a single config group: every ``nn.Linear`` not in ``ignore``."""
MAX_SHARD_BYTES = 5 * 10**9
"""Largest weight file; bigger models are split into shards with an index."""
DEQUANTIZE_KEY = "dequantize"
"""Set (true) when a layer is asymmetric: transformers then dequantizes each weight while loading,
its only path that reads packed zero points (its default path builds the zero points unpacked and
refuses the packed ones). vLLM and compressed-tensors ignore the key."""
SHOWN_LAYERS = 3
"""Layer names quoted per refusal reason."""

QCORE_HINT = "qcore's own format (qcore.save, or `qcore quantize --out`) holds it"


@dataclass(frozen=True, order=True)
class Scheme:
    """The weight quantization of one config group."""

    bits: int
    group_size: int
    """Columns per group; -1 for one group per output channel."""
    symmetric: bool
    act_bits: int = 0
    """8 for W8A8 (dynamic per-token symmetric int8 activations, ``int-quantized``); 0 weight-only."""

    def __str__(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        acts = f" A{self.act_bits}" if self.act_bits else ""
        return f"{self.bits}-bit {group} {'symmetric' if self.symmetric else 'asymmetric'}{acts}"

    @property
    def format(self) -> str:
        return INT_FORMAT if self.act_bits else PACK_FORMAT

    def input_activations(self) -> dict[str, Any] | None:
        """compressed-tensors ``QuantizationArgs`` of the activations, as JSON (None: weight-only)."""
        if not self.act_bits:
            return None
        return {"num_bits": self.act_bits, "type": "int", "symmetric": True, "group_size": None,
                "strategy": "token", "dynamic": True, "actorder": None, "block_structure": None}

    def weights(self) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` of this scheme, as JSON."""
        channel = self.group_size == -1
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "group_size": None if channel else self.group_size,
                "strategy": "channel" if channel else "group", "dynamic": False, "actorder": None,
                "block_structure": None}


# -- check ----------------------------------------------------------------------------------------
def check(model: nn.Module) -> list[str]:
    """Why compressed-tensors pack-quantized cannot hold ``model`` (each reason names the format
    that can); empty when it can."""
    if not hasattr(getattr(model, "config", None), "to_json_string"):
        return [f"{type(model).__name__} has no Hugging Face config; compressed-tensors needs a "
                "transformers model: quantize one with qcore.quantize"]
    layers = quantized_layers(model)
    found: dict[str, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        for reason in layer_problems(layer):
            found[reason].append(name)
    problems = other_modules(model, layers)
    if layers:
        problems += mixed_problems(layers) + shape_problems(model, layers)
    for name, reason in problems:
        found[reason].append(name)
    if not layers and not found:
        return ["the model has no quantized linear layers (QuantLinear): quantize it with qcore.quantize first"]
    return [f"{reason} ({_shown(names)})" for reason, names in found.items()]


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def layer_problems(layer: QuantLinear) -> list[str]:
    """What of ``layer`` pack-quantized cannot hold."""
    problems: list[str] = []
    if layer.bits not in SUPPORTED_BITS:
        problems.append(f"{layer.bits}-bit weights: vLLM runs pack-quantized weights of "
                        f"{' or '.join(map(str, SUPPORTED_BITS))} bits only; {QCORE_HINT}")
    elif not _integer_zeros(layer):
        problems.append("float or out-of-range zero points (e.g. HQQ): pack-quantized stores integer "
                        f"zero points in the code range; {QCORE_HINT}")
    if layer.g_idx is not None and not _contiguous(layer):
        problems.append("act-order groups (a permuted g_idx): compressed-tensors 0.20 does not hold "
                        f"act-order group indices; {QCORE_HINT} (or quantize with static_groups=True)")
    if layer.input_transform is not None:
        problems.append(f"an online input transform ({type(layer.input_transform).__name__}, e.g. a "
                        f"QuaRot rotation) that runs before the matmul; {QCORE_HINT}")
    if layer.act is not None and not is_w8a8(layer):
        problems.append(f"activation quantization other than W8A8 with dynamic per-token symmetric int8 "
                        f"activations and per-channel symmetric int8 weights (A{layer.act.bits}); {QCORE_HINT}")
    return problems


def is_w8a8(layer: QuantLinear) -> bool:
    """Whether ``layer`` is SmoothQuant-style W8A8: int8 per-channel symmetric weights, dynamic
    per-token symmetric int8 activations, unclipped (compressed-tensors ``int-quantized``)."""
    act = layer.act
    return (act is not None and act.bits == 8 and act.dynamic and act.sym and act.clip == 1.0
            and layer.bits == 8 and layer.group_size == -1 and scheme_of(layer).symmetric)


def mixed_problems(layers: dict[str, QuantLinear]) -> list[tuple[str, str]]:
    """``(name, reason)`` of the layers outside the most common scheme when the schemes differ and
    one is asymmetric: transformers loads asymmetric pack-quantized only by dequantizing
    (:data:`DEQUANTIZE_KEY`), and that path applies one config group's scheme to every layer."""
    schemes = {name: scheme_of(layer) for name, layer in layers.items() if layer.bits in SUPPORTED_BITS}
    kinds = Counter(schemes.values())
    if len({s.format for s in kinds}) > 1:
        main = kinds.most_common(1)[0][0]
        reason = (f"W8A8 layers mixed with weight-only ones ({', '.join(map(str, sorted(kinds)))}): one export holds "
                  f"one compressed-tensors format; {QCORE_HINT}")
        return [(name, reason) for name, s in schemes.items() if s.format != main.format]
    if len(kinds) < 2 or all(s.symmetric for s in kinds):
        return []
    main = kinds.most_common(1)[0][0]
    reason = (f"per-layer mixed schemes ({', '.join(map(str, sorted(kinds)))}) with asymmetric layers: "
              "transformers dequantizes asymmetric pack-quantized layers with one config group's scheme; "
              f"quantize with sym=True (mixed symmetric schemes export), or {QCORE_HINT}")
    return [(name, reason) for name, s in schemes.items() if s != main]


def other_modules(model: nn.Module, layers: dict[str, QuantLinear]) -> list[tuple[str, str]]:
    """``(name, reason)`` of every module qcore saves that is not a plain ``QuantLinear``
    (transformers rebuilds only the model's own modules from ``config.json``)."""
    table = serializers()
    inside = [f"{name}." for name in layers]  # a QuantLinear's own transform is reported with the layer
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or name.startswith(tuple(inside)):
            continue
        ser = serializer_for(module, table)
        if ser is not None:
            found.append((name, f"{ser.type_name} modules ({type(module).__name__}), which transformers "
                                f"does not rebuild from a compressed-tensors checkpoint; {QCORE_HINT}"))
            inside.append(f"{name}.")  # its children are part of it
    return found


def shape_problems(model: nn.Module, layers: dict[str, QuantLinear]) -> list[tuple[str, str]]:
    """``(name, reason)`` of quantized layers that transformers does not build as an ``nn.Linear``
    of the same shape (compressed-tensors packs only those)."""
    try:
        plain = dict(skeleton(model).named_modules())
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild the class is the reason
        return [("", f"transformers cannot rebuild {type(model).__name__} from its config "
                     f"({type(exc).__name__}: {exc}); {QCORE_HINT}")]
    found: list[tuple[str, str]] = []
    for name, layer in layers.items():
        mod = plain.get(name)
        if not isinstance(mod, nn.Linear):
            kind = type(mod).__name__ if mod is not None else "nothing"
            found.append((name, f"quantized layers that transformers builds as {kind}, not nn.Linear; "
                                f"{QCORE_HINT}"))
        elif (mod.out_features, mod.in_features) != (layer.out_features, layer.in_features):
            found.append((name, f"quantized layers whose shape differs from transformers' nn.Linear; {QCORE_HINT}"))
    return found


def skeleton(model: nn.Module) -> nn.Module:
    """A fresh instance of ``model``'s class from its config, parameters on the meta device: the
    modules transformers builds when it loads the export."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with params_on_meta():
        return type(model)._from_config(config)


def _integer_zeros(layer: QuantLinear) -> bool:
    zeros = layer.scales_zeros()[1].float()
    return bool(((zeros == zeros.round()) & (zeros >= 0) & (zeros < 2**layer.bits)).all())


def _contiguous(layer: QuantLinear) -> bool:
    """Whether ``layer.g_idx`` is the plain ``column // group_size`` (then it carries nothing)."""
    gs = layer.in_features if layer.group_size == -1 else layer.group_size
    plain = torch.arange(layer.in_features, device=layer.g_idx.device) // gs
    return bool(torch.equal(layer.g_idx.long(), plain))


def _shown(names: list[str]) -> str:
    shown = ", ".join(n or "the model" for n in names[:SHOWN_LAYERS])
    more = len(names) - SHOWN_LAYERS
    return shown + (f" and {more} more" if more > 0 else "")


# -- write ----------------------------------------------------------------------------------------
def write(model: nn.Module, target: Path, tokenizer: Any = None) -> None:
    """Write ``model`` into the folder ``target`` (see the module docstring)."""
    reasons = check(model)
    if reasons:
        raise ExportError(f"format {QUANT_METHOD!r} cannot hold this model: " + "; ".join(reasons))
    target = Path(target)
    layers = quantized_layers(model)
    tensors = export_tensors(model, layers)
    write_shards([TensorSpec(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()],
                 target, MAX_SHARD_BYTES)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(layers, float_linears(model, layers))
    write_json(target / CONFIG_FILE, config, sort_keys=True)
    _write_extras(model, target, tokenizer)


def scheme_of(layer: QuantLinear) -> Scheme:
    """The config-group scheme of ``layer``: symmetric when every zero point is the midpoint."""
    zeros = layer.scales_zeros()[1]
    symmetric = layer.sym and bool((zeros.float() == 2 ** (layer.bits - 1)).all())
    return Scheme(layer.bits, layer.group_size, symmetric, layer.act.bits if layer.act is not None else 0)


def float_linears(model: nn.Module, layers: dict[str, QuantLinear]) -> list[str]:
    """The ``nn.Linear`` modules transformers builds that stay in float (``ignore``)."""
    return [n for n, m in skeleton(model).named_modules() if isinstance(m, nn.Linear) and n not in layers]


def quantization_config(layers: dict[str, QuantLinear], ignore: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` for ``layers``."""
    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        by_scheme[scheme_of(layer)].append(name)
    schemes = sorted(by_scheme)
    groups: dict[str, dict[str, Any]] = {}
    for i, scheme in enumerate(schemes):
        targets = [LINEAR_TARGET] if len(schemes) == 1 else by_scheme[scheme]
        groups[f"group_{i}"] = {"targets": targets, "weights": scheme.weights(),
                                "input_activations": scheme.input_activations(), "output_activations": None,
                                "format": scheme.format}
    qc: dict[str, Any] = {
        "quant_method": QUANT_METHOD, "format": schemes[0].format, "quantization_status": STATUS,
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {}, "version": FORMAT_VERSION,
    }
    if not all(s.symmetric for s in schemes):
        qc[DEQUANTIZE_KEY] = True
    return qc


def export_tensors(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, Tensor]:
    """Every tensor to write, in the model's state-dict order (tied tensors once)."""
    state = model.state_dict()
    dtype = _float_dtype(model)
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, value in state.items():
        prefix, _, _ = key.rpartition(".")
        if prefix in layers:
            if prefix not in done:
                out.update(layer_tensors(prefix, layers[prefix], state, dtype))
                done.add(prefix)
            continue
        out[key] = value.detach().cpu()
    return dedupe_tied(out)[0]


def layer_tensors(name: str, layer: QuantLinear, state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The compressed-tensors tensors of the quantized layer ``name`` (see the module docstring)."""
    bits = layer.bits
    scheme = scheme_of(layer)
    if scheme.format == INT_FORMAT:  # int8 weight as stored by compressed-tensors: codes - 128, unpacked
        out = {f"{name}.weight": (layer.codes().to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).contiguous().cpu(),
               f"{name}.weight_scale": state[f"{name}.scales"].reshape(layer.out_features, 1).contiguous().cpu()}
        if layer.bias is not None:
            out[f"{name}.bias"] = state[f"{name}.bias"].detach().to(device="cpu", dtype=dtype)
        return out
    codes_words = -(-layer.in_features * bits // 32)
    out = {
        f"{name}.weight_packed": state[f"{name}.qweight"][:, :codes_words].contiguous().cpu(),
        f"{name}.weight_scale": state[f"{name}.scales"].contiguous().cpu(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not scheme.symmetric:
        out[f"{name}.weight_zero_point"] = pack_rows(state[f"{name}.qzeros"].t(), bits).t().contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = state[f"{name}.bias"].detach().to(device="cpu", dtype=dtype)
    return out


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Unsigned ``[rows, n]`` codes as compressed-tensors packs them: int32 ``[rows, ceil(n * bits
    / 32)]``, the first code in the lowest bits (qcore's layout without its padding words)."""
    words = -(-codes.shape[1] * bits // 32)
    return pack_codes(codes.float().round().to(torch.int64).cpu(), bits)[:, :words].contiguous()


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float tensors (that of its first floating-point parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _write_extras(model: nn.Module, target: Path, tokenizer: Any) -> None:
    """The generation config (for a model that generates) and the tokenizer."""
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if gen is not None and callable(can_generate) and can_generate():
        gen.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))


# -- import ---------------------------------------------------------------------------------------
IMPORT_SUFFIXES: tuple[str, ...] = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _import_schemes(qc: dict[str, Any], root: Path) -> list[tuple[list[str], dict[str, Any]]]:
    """``(targets, weights)`` of each config group, refusing what qcore does not read."""
    from qcore.plugin.errors import CheckpointError

    if qc.get("format") != PACK_FORMAT or qc.get("quantization_status", STATUS) != STATUS:
        raise CheckpointError(f"{root}: compressed-tensors format {qc.get('format')!r} (status "
                              f"{qc.get('quantization_status')!r}) is not read; qcore reads {PACK_FORMAT!r} "
                              f"({STATUS}): load it with transformers and the compressed-tensors package")
    schemes = []
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if group.get("input_activations") or w.get("type", "int") != "int" or int(w.get("num_bits", 0)) not in (4, 8):
            raise CheckpointError(f"{root}: config group {name} ({w.get('num_bits')}-bit {w.get('type')} weights"
                                  f"{', quantized activations' if group.get('input_activations') else ''}) is not "
                                  "read; qcore reads 4/8-bit integer weight-only pack-quantized groups")
        schemes.append((list(group.get("targets") or []), w))
    if not schemes:
        raise CheckpointError(f"{root}: compressed-tensors quantization_config has no config_groups")
    return schemes


def _scheme_for(name: str, schemes: list[tuple[list[str], dict[str, Any]]]) -> dict[str, Any]:
    """The weights scheme of layer ``name``: a target naming it (exactly or ``re:``), else ``Linear``."""
    import re

    for targets, weights in schemes:
        if any(t == name or (t.startswith("re:") and re.fullmatch(t[3:], name)) for t in targets):
            return weights
    return next(w for targets, w in schemes if LINEAR_TARGET in targets)


def import_weight(parts: dict[str, Tensor], weights: dict[str, Any]) -> Any:
    """A :class:`~qcore.quant.primitives.QuantizedWeight` from one layer's pack-quantized tensors."""
    from qcore.formats.gptq import unpack_cols
    from qcore.quant.primitives import QuantizedWeight

    bits = int(weights["num_bits"])
    out_f, in_f = (int(v) for v in parts["weight_shape"].tolist())
    codes = unpack_cols(parts["weight_packed"], bits)[:, :in_f]
    scales = parts["weight_scale"].float().reshape(out_f, -1)
    if "weight_zero_point" in parts and not weights.get("symmetric", True):
        zeros = unpack_cols(parts["weight_zero_point"].t().contiguous(), bits)[:, :out_f].t().float()
    else:
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    group = int(weights.get("group_size") or -1) if weights.get("strategy") == "group" else -1
    return QuantizedWeight(codes.to(torch.uint8), scales.contiguous(), zeros.contiguous(), bits, group,
                           bool(weights.get("symmetric", True)))


def load(root: Path, config: dict[str, Any], device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """A compressed-tensors pack-quantized checkpoint (llm-compressor's) as a model with qcore
    ``QuantLinear`` layers: codes and scales as stored (scales kept in their dtype)."""
    from qcore.formats.packed import imported_record, load_layers

    qc = config["quantization_config"]
    schemes = _import_schemes(qc, root)
    model = load_layers(root, config, device, dtype, lambda name, parts: import_weight(parts, _scheme_for(name, schemes)),
                        IMPORT_SUFFIXES, packed_key="weight_packed", scale_key="weight_scale")
    first = schemes[0][1]
    settings = {"bits": int(first["num_bits"]), "group_size": int(first.get("group_size") or -1),
                "sym": bool(first.get("symmetric", True))}
    model.qcore_record = imported_record(QUANT_METHOD, settings, qc, version=qc.get("version"))
    return model
