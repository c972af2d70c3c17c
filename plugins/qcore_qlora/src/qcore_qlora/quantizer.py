"""QLoRA glue: block linears -> bitsandbytes ``Linear4bit``, then LoRA adapters through peft.

Which linears are converted and adapted comes from :func:`qcore.arch.introspect.inspect_model`
(roles such as ``q``, ``down``, ``expert.up``), never from hard-coded module names, so every
architecture qcore introspects works. ``lm_head`` and everything outside the decoder blocks stay
in float; MoE routers stay in float too.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qcore.plugin import BaseQuantizer, CompatibilityError, ConfigError, RunContext
from qcore.plugin import get_logger

from qcore_qlora.config import QLoRAConfig

if TYPE_CHECKING:
    from qcore.plugin import ModelInfo

log = get_logger("qlora")

ADAPTER_NAME = "default"
#: Roles kept in float (not converted to 4 bits, never adapted).
FLOAT_ROLES: tuple[str, ...] = ("router",)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_linears(info: ModelInfo) -> list[tuple[str, str, str]]:
    """``(full name, name relative to its block, role)`` of every block linear qcore may quantize
    (introspection's ``quantize`` flag: routers are left out)."""
    out = []
    for block in info.blocks:
        for rel, lin in block.linears.items():
            if lin.role in FLOAT_ROLES or not getattr(lin, "quantize", True):
                continue
            out.append((f"{block.name}.{rel}", rel, lin.role))
    return out


def _matches(rel: str, role: str, target: str) -> bool:
    return target == role or fnmatch(rel, target) or (role.startswith("expert.") and target == role[7:])


def resolve_targets(info: ModelInfo, targets: list[str] | None, ignore: list[str] = ()) -> list[str]:
    """Full module names that get a LoRA adapter.

    ``targets`` are introspection roles (``q``, ``down``, ``expert.up``; ``up`` also matches
    ``expert.up``) or fnmatch patterns of block-relative names; ``None`` means every linear of
    :func:`block_linears` (the QLoRA paper's "all linear layers"). ``ignore`` patterns match full names.
    """
    linears = [(full, rel, role) for full, rel, role in block_linears(info)
               if not any(fnmatch(full, p) for p in ignore)]
    if targets is None:
        chosen = [full for full, _, _ in linears]
    else:
        unmatched = [t for t in targets if not any(_matches(rel, role, t) for _, rel, role in linears)]
        if unmatched:
            roles = sorted({role for _, _, role in linears})
            names = sorted({rel for _, rel, _ in linears})
            raise ConfigError(
                f"targets {unmatched} match no linear of this {info.family} model; use roles "
                f"({', '.join(roles)}) or block-relative names/patterns ({', '.join(names)})"
            )
        chosen = [full for full, rel, role in linears if any(_matches(rel, role, t) for t in targets)]
    if not chosen:
        raise CompatibilityError(
            f"no linear layer to adapt in this {info.family} model (all ignored or routers); "
            "loosen 'ignore' or set 'targets'"
        )
    return chosen


def to_linear4bit(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight quantized (blocks of 64)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    if device.type == "meta":
        raise CompatibilityError("cannot quantize weights on the meta device; load the model's weights first")
    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=double_quant,
                            quant_type=quant_type, device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                   compress_statistics=double_quant, quant_type=quant_type)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bitsandbytes repacks weights in place for its AVX512-BF16 inference kernel on the first
    # eval-mode forward: that asserts out_features % 32 == 0 (172 fails), computes in bf16 (eval
    # would differ from training) and breaks dequantize_4bit. Keep the one portable layout.
    new.support_avx512bf16_for_cpu = False
    return new.to(device)  # Params4bit quantizes on its first .to(device)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_base(model: nn.Module, config: QLoRAConfig, info: ModelInfo | None = None) -> list[str]:
    """Replace every block linear (not routers, not ``ignore``d) by ``Linear4bit`` in place.

    Returns the converted names. Idempotent: layers already in 4 bits are left alone.
    """
    import bitsandbytes as bnb

    if info is None:
        from qcore.plugin import inspect_model

        info = inspect_model(model)
    dtype = DTYPES[config.compute_dtype]
    done = []
    for full, _, _ in block_linears(info):
        if any(fnmatch(full, p) for p in config.ignore):
            continue
        module = model.get_submodule(full)
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        if not isinstance(module, nn.Linear):
            raise CompatibilityError(f"{full} is a {type(module).__name__}, not a float nn.Linear; "
                                     "qlora needs a float model (apply qlora first, not after another method)")
        _set_module(model, full, to_linear4bit(module, config.quant_type, config.double_quant, dtype))
        done.append(full)
    model.is_loaded_in_4bit = True  # tells peft to wrap with its bitsandbytes LoRA layer
    return done


def lora_config(config: QLoRAConfig, target_modules: list[str], base_name: str | None = None) -> Any:
    """The peft ``LoraConfig`` of a QLoRA config."""
    from peft import LoraConfig

    return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_name)


@contextmanager
def exact_targets() -> Iterator[None]:
    """Stop peft from rewriting our target names for transformers 5 MoE models.

    peft >= 0.18 maps transformers-4 expert names (``experts.0.gate_proj``) onto transformers 5's
    fused 3D expert parameters. qcore unfuses experts into exactly those per-expert ``nn.Linear``
    modules (:func:`qcore.arch.surgery.prepare_model`), so the names we pass are already right and the
    rewrite would silently drop every expert adapter. A no-op for dense models.
    """
    try:
        from peft.utils import transformers_weight_conversion as conv
    except ImportError:  # older peft: no conversion
        yield
        return
    saved = {n: getattr(conv, n) for n in ("convert_peft_config_for_transformers",
                                           "convert_peft_adapter_state_dict_for_transformers") if hasattr(conv, n)}
    try:
        if "convert_peft_config_for_transformers" in saved:
            conv.convert_peft_config_for_transformers = lambda peft_config, model, conversions: None
        if "convert_peft_adapter_state_dict_for_transformers" in saved:
            conv.convert_peft_adapter_state_dict_for_transformers = (
                lambda model, peft_config, adapter_state_dict, adapter_name: adapter_state_dict)
        yield
    finally:
        for name, fn in saved.items():
            setattr(conv, name, fn)


def attach_lora(model: nn.Module, config: QLoRAConfig, target_modules: list[str]) -> nn.Module:
    """Inject LoRA layers (peft) into ``model`` in place; only adapter weights stay trainable."""
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with exact_targets():
        inject_adapter_in_model(lora_config(config, target_modules, base_name), model, adapter_name=ADAPTER_NAME)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    missing = sorted(set(target_modules) - adapted)
    if missing:
        raise CompatibilityError(f"peft did not adapt {len(missing)} target(s), e.g. {missing[:3]}; "
                                 "upgrade peft or restrict targets with targets=[...]")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def prepare_qlora(model: nn.Module, config: QLoRAConfig, info: ModelInfo | None = None) -> dict[str, Any]:
    """Quantize the base to 4 bits and attach adapters, in place. Returns a JSON-able record."""
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise CompatibilityError("this model already has LoRA adapters; start from the float model, "
                                 "or merge first with qcore_qlora.merge.merge_and_unload_to_float")
    if info is None:
        from qcore.plugin import inspect_model

        info = inspect_model(model)
    targets = resolve_targets(info, config.targets, config.ignore)
    converted = quantize_base(model, config, info)
    attach_lora(model, config, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("qlora: %d linears in %s, %d adapters (r=%d), %d trainable parameters",
             len(converted), config.quant_type, len(targets), config.r, trainable)
    return {"quantized": converted, "targets": targets, "trainable_parameters": trainable}


class QLoRAQuantizer(BaseQuantizer):
    """Whole-model change in ``prepare``; nothing per block (calibration-free)."""

    def __init__(self, config: QLoRAConfig, spec: Any) -> None:
        super().__init__(config, spec)
        self._record: dict[str, Any] = {}

    def prepare(self, run: RunContext) -> None:
        self._record = prepare_qlora(run.model, self.config, run.info)

    def record(self) -> dict[str, Any]:
        rec = self._record
        return {"targets": rec.get("targets", []), "quantized": len(rec.get("quantized", [])),
                "trainable_parameters": rec.get("trainable_parameters", 0)}

    def finetune(self, model: nn.Module, data: Any, **kwargs: Any) -> Any:
        """What ``qcore.finetune`` dispatches to: :func:`qcore_qlora.finetune.finetune`."""
        from qcore_qlora.finetune import finetune

        return finetune(model, data, **kwargs)
