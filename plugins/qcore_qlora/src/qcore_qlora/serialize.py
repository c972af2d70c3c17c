"""Checkpoint serializers of the QLoRA layers, so that ``qcore.save`` / ``qcore.load`` round-trip them.

Two module types, each its own ``modules`` entry in the checkpoint:

* ``qlora.linear4bit``: bitsandbytes' ``Linear4bit`` (bare, or the ``base_layer`` of a LoRA layer).
  JSON: shape, bias, quant type, block size, double quantization, compute dtype, storage dtype.
  Tensors, with bitsandbytes' own state-dict names: the packed ``weight``, its quantization state
  (``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
  ``weight.quant_state.bitsandbytes__nf4``) and ``bias``. They are not plain parameters, so
  :meth:`Linear4bitSerializer.load_tensors` rebuilds the weight with
  ``Params4bit.from_prequantized`` (the ``load_tensors`` part of the serializer contract).
* ``qlora.lora_linear4bit``: peft's ``lora.bnb.Linear4bit`` around it. JSON: shape and, per
  adapter, r, alpha, scaling, dropout, rsLoRA and LoRA-bias flags; the active, merged and disabled
  adapters. Its ``lora_A`` / ``lora_B`` weights are plain parameters that qcore assigns; its base
  layer is the entry ``<name>.base_layer`` of the type above, rebuilt right after it.

After loading, the adapters are trainable and the base frozen, as after ``qcore.quantize(model,
"qlora")``. The model-level attributes peft keeps (``peft_config``, ``is_loaded_in_4bit``) are not
part of any module: :func:`restore_peft_state` sets them on a loaded model.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from qcore.plugin import CheckpointError

LINEAR4BIT_TYPE = "qlora.linear4bit"
LORA_LINEAR4BIT_TYPE = "qlora.lora_linear4bit"
_WEIGHT_STATS = "weight."


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class Linear4bitSerializer:
    """bitsandbytes ``Linear4bit``: rebuilt empty, its packed weight and statistics assigned here."""

    type_name = LINEAR4BIT_TYPE

    @property
    def module_type(self) -> type[nn.Module]:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        weight = module.weight
        if not getattr(weight, "bnb_quantized", False) or getattr(weight, "quant_state", None) is None:
            raise CheckpointError(f"a bitsandbytes Linear4bit ({module.in_features}x{module.out_features}) "
                                  "holds a weight not quantized yet; move the model to its device "
                                  "(bitsandbytes quantizes on .to(device)) before qcore.save")
        return {"in_features": int(module.in_features), "out_features": int(module.out_features),
                "bias": module.bias is not None, "quant_type": str(weight.quant_type),
                "blocksize": int(weight.blocksize), "double_quant": bool(weight.compress_statistics),
                "compute_dtype": _dtype_name(module.compute_dtype),
                "quant_storage": _dtype_name(getattr(module, "quant_storage", torch.uint8))}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        import bitsandbytes as bnb

        module = bnb.nn.Linear4bit(int(data["in_features"]), int(data["out_features"]), bias=bool(data["bias"]),
                                   compute_dtype=_dtype(data.get("compute_dtype")),
                                   compress_statistics=bool(data["double_quant"]), quant_type=str(data["quant_type"]),
                                   quant_storage=_dtype(data.get("quant_storage", "uint8")), device=device)
        module.weight.blocksize = int(data["blocksize"])
        if module.bias is not None:
            module.bias.requires_grad_(False)
        # As qcore_qlora.quantizer.to_linear4bit: no AVX512-BF16 repacking on CPU (one portable layout).
        module.support_avx512bf16_for_cpu = False
        return module

    def load_tensors(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        import bitsandbytes as bnb

        tensors = dict(tensors)
        weight, bias = tensors.pop("weight", None), tensors.pop("bias", None)
        stats = {k[len(_WEIGHT_STATS):]: tensors.pop(k) for k in list(tensors) if k.startswith(_WEIGHT_STATS)}
        if weight is None or not stats:
            raise ValueError("the packed weight or its quantization statistics (weight.absmax, ...) are missing")
        if tensors:
            raise ValueError(f"tensors a 4-bit linear does not have: {sorted(tensors)}")
        if (bias is None) != (module.bias is None):
            raise ValueError("the bias is " + ("missing" if bias is None else "stored but the layer has none"))
        param = bnb.nn.Params4bit.from_prequantized(weight, stats, requires_grad=False, device=weight.device,
                                                    module=module)
        shape = tuple(param.quant_state.shape or ())
        if shape != (module.out_features, module.in_features):
            raise ValueError(f"the stored weight is {shape}, not ({module.out_features}, {module.in_features})")
        module.weight = param
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)


class LoraLinear4bitSerializer:
    """peft's LoRA layer around a ``Linear4bit``; the base layer is serialized on its own."""

    type_name = LORA_LINEAR4BIT_TYPE

    @property
    def module_type(self) -> type[nn.Module]:
        from peft.tuners.lora.bnb import Linear4bit

        return Linear4bit

    def to_json(self, module: nn.Module) -> dict[str, Any]:
        if getattr(module, "lora_variant", None):
            raise CheckpointError(f"qcore saves plain LoRA adapters; this layer has variant adapters "
                                  f"({sorted(module.lora_variant)}: DoRA, aLoRA, ...): merge them first")
        adapters = {name: {"r": int(module.r[name]), "alpha": module.lora_alpha[name],
                           "scaling": float(module.scaling[name]),
                           "dropout": float(getattr(module.lora_dropout[name], "p", 0.0)),
                           "use_rslora": bool(getattr(module, "use_rslora", {}).get(name, False)),
                           "lora_bias": bool(getattr(module, "lora_bias", {}).get(name, False))}
                    for name in module.lora_A}
        return {"in_features": int(module.in_features), "out_features": int(module.out_features),
                "adapters": adapters, "active": list(module.active_adapters),
                "merged": list(module.merged_adapters), "disabled": bool(module.disable_adapters)}

    def build(self, data: dict[str, Any], device: Any) -> nn.Module:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit

        adapters: dict[str, dict[str, Any]] = data["adapters"]
        if not adapters:
            raise ValueError("no adapter")
        with torch.device(device):  # the adapters' weights, created empty; qcore assigns them
            # A stand-in base layer: the entry <name>.base_layer replaces it.
            base = bnb.nn.Linear4bit(int(data["in_features"]), int(data["out_features"]), bias=False)
            first, *others = adapters
            module = Linear4bit(base, first, **_adapter_kwargs(Linear4bit.__init__, adapters[first]))
            for name in others:
                module.update_layer(name, **_adapter_kwargs(module.update_layer, adapters[name]))
        for name, adapter in adapters.items():
            module.scaling[name] = float(adapter["scaling"])
        module.requires_grad_(False)
        module.set_adapter(list(data["active"]))  # the active adapters trainable, as peft leaves them
        module.merged_adapters = list(data.get("merged", []))
        module._disable_adapters = bool(data.get("disabled", False))
        return module


def _adapter_kwargs(fn: Any, adapter: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of peft's ``Linear4bit(...)`` / ``update_layer(...)`` for one adapter:
    a ``LoraConfig`` (peft >= 0.18) or the options one by one (older peft)."""
    options = {"lora_dropout": float(adapter["dropout"]), "use_rslora": bool(adapter["use_rslora"]),
               "lora_bias": bool(adapter["lora_bias"]), "init_lora_weights": True}
    kwargs: dict[str, Any] = {"r": int(adapter["r"]), "lora_alpha": adapter["alpha"]}
    params = inspect.signature(fn).parameters
    if "config" in params:
        from peft import LoraConfig

        kwargs["config"] = LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], **options)
    else:
        kwargs.update({k: v for k, v in options.items() if k in params})
    return kwargs


def restore_peft_state(model: nn.Module) -> nn.Module:
    """Give a QLoRA model loaded by ``qcore.load`` what ``qcore.quantize(model, "qlora")`` set on the
    model itself: ``is_loaded_in_4bit``, peft's ``peft_config`` (from the LoRA layers) and every
    parameter but the adapters' frozen, so that :func:`qcore_qlora.adapter.save_adapter`,
    ``load_adapter`` and fine-tuning accept it as they accept a freshly quantized model. Returns ``model``."""
    from peft.tuners.lora import LoraLayer

    from qcore_qlora.config import QLoRAConfig
    from qcore_qlora.quantizer import ADAPTER_NAME, lora_config

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.r}
    if not layers:
        return model
    model.is_loaded_in_4bit = True
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if hasattr(model, "peft_config"):
        return model
    first = next(iter(layers.values()))
    dropout = getattr(first.lora_dropout[ADAPTER_NAME], "p", 0.0)
    config = QLoRAConfig(r=first.r[ADAPTER_NAME], alpha=first.lora_alpha[ADAPTER_NAME], dropout=dropout)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model.peft_config = {ADAPTER_NAME: lora_config(config, list(layers), base_name)}
    return model
