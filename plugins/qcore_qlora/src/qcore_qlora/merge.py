"""From adapter to deployment: fold LoRA into a float copy of the 4-bit base.

``W_float = dequantize_4bit(W_nf4) + (alpha / r) * B @ A`` for every adapted linear, plain
dequantization for 4-bit linears without an adapter. The result is an ordinary float model
(``nn.Linear`` everywhere) that any qcore method can quantize (:func:`merge_and_quantize`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from qcore.plugin import CompatibilityError
from qcore.plugin import get_logger

log = get_logger("qlora")


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``scaling * B @ A`` in float32: A is [r, in], B is [out, r] -> [out, in]."""
    return scaling * (lora_b.detach().float() @ lora_a.detach().float())


def merge_weight(base: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The merged float32 weight ``base + scaling * B @ A``."""
    if base.shape != (lora_b.shape[0], lora_a.shape[1]):
        raise CompatibilityError(f"LoRA shapes B{tuple(lora_b.shape)} @ A{tuple(lora_a.shape)} do not fit "
                                 f"the base weight {tuple(base.shape)}; the adapter belongs to another model")
    return base.float() + lora_delta(lora_a, lora_b, scaling)


def dequantize_linear4bit(module: nn.Module) -> Tensor:
    """The float32 weight [out, in] of a bitsandbytes ``Linear4bit``."""
    import bitsandbytes.functional as bnbf

    w = module.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, module.in_features)


def float_weight(module: nn.Module) -> Tensor:
    """The float32 weight of a ``Linear4bit`` or a float ``nn.Linear``."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return dequantize_linear4bit(module)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise CompatibilityError(f"cannot merge into a {type(module).__name__}; qlora adapts float or 4-bit linears")


def _float_linear(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.detach().to(dtype))
    return lin


def merged_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A float ``nn.Linear`` equal to a (LoRA-wrapped) 4-bit or float linear with its active adapters."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return _float_linear(float_weight(module), module.bias, dtype)
    base = module.get_base_layer()
    weight = float_weight(base)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if module.use_dora.get(name, False):
            raise CompatibilityError("merging DoRA adapters is not supported; train plain LoRA (use_dora off)")
        if getattr(module, "fan_in_fan_out", False):
            raise CompatibilityError("fan_in_fan_out adapters are not supported; qcore converts Conv1D to Linear first")
        weight = merge_weight(weight, module.lora_A[name].weight, module.lora_B[name].weight,
                              float(module.scaling[name]))
    return _float_linear(weight, base.bias, dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_and_unload_to_float(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float copy of a QLoRA model with the adapters merged; ``model`` is left unchanged.

    Every LoRA-wrapped linear and every bare ``Linear4bit`` becomes an ``nn.Linear`` in ``dtype``.
    The copy has no peft state and no qcore record (the result is a plain float model).
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    targets = [n for n, m in model.named_modules()
               if isinstance(m, LoraLayer) or (isinstance(m, bnb.nn.Linear4bit)
                                              and not _inside_lora(model, n))]
    if not targets:
        raise CompatibilityError("this model has no LoRA adapter and no 4-bit linear to merge; "
                                 "quantize it with qcore.quantize(model, 'qlora', ...) first")
    merged = {n: merged_linear(model.get_submodule(n), dtype) for n in targets}
    # Copy the model without its 4-bit and LoRA layers (swap placeholders in, copy, swap back).
    originals = {n: model.get_submodule(n) for n in targets}
    try:
        for n in targets:
            _set_module(model, n, nn.Identity())
        out = copy.deepcopy(model)
    finally:
        for n, m in originals.items():
            _set_module(model, n, m)
    for n, lin in merged.items():
        _set_module(out, n, lin)
    for attr in ("peft_config", "is_loaded_in_4bit", "qcore_record", "_hf_peft_config_loaded"):
        if attr in out.__dict__:
            delattr(out, attr)
    out.requires_grad_(False)
    out.eval()
    log.info("merged %d linears into a %s copy", len(targets), str(dtype).removeprefix("torch."))
    return out


def _inside_lora(model: nn.Module, name: str) -> bool:
    from peft.tuners.lora import LoraLayer

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoraLayer):
            return True
    return False


def merge_and_quantize(model: nn.Module, method: str | list[str], tokenizer: Any = None,
                       **options: Any) -> nn.Module:
    """Merge to float, then quantize the merged model with any qcore method (``qcore.quantize``).

    The qlora provenance (config, targets) is kept in the result's ``qcore_record["provenance"]``.
    """
    from qcore.plugin import quantize

    merged = merge_and_unload_to_float(model)
    quantize(merged, method, tokenizer=tokenizer, **options)
    add_provenance(merged, model)
    return merged


def add_provenance(quantized: nn.Module, qlora_model: nn.Module, **extra: Any) -> None:
    """Record in ``quantized.qcore_record["provenance"]`` the qlora config the weights were merged from."""
    chain = (getattr(qlora_model, "qcore_record", None) or {}).get("chain", [])
    quantized.qcore_record["provenance"] = [{**e, "merged": True, **extra} for e in chain
                                            if e.get("method") == "qlora"]
