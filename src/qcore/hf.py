"""transformers integration: ``from_pretrained`` of a qcore checkpoint builds qcore's modules.

``import qcore.hf`` (or :func:`register`, idempotent) registers the quantization method
``"qcore"`` through transformers' public registration API (``register_quantization_config``,
``register_quantizer``; transformers has no discovery of third-party quantizers, so the import is
needed once per process). Then::

    import qcore.hf
    model = AutoModelForCausalLM.from_pretrained(QCORE_DIR)

builds the model on meta, puts qcore's modules (packed linears, online transforms, whatever
plugins serialized) where the checkpoint's ``quantization_config["modules"]`` says, before
transformers loads the tensors by name; afterwards each rebuilt module derives its run-time
state and attention transforms are routed, as in ``qcore.load``: the logits are the same.
``save_pretrained`` of that model writes ``config.json`` with the same qcore record (without the
per-file hashes, which belong to qcore's own writer) and the tensors under the same names, so the
folder loads again with either reader. Only pre-quantized checkpoints: quantizing goes through
``qcore.quantize``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "qcore"
"""``quantization_config["quant_method"]`` of every qcore checkpoint."""
HASHED_SECTION = "checkpoint"
"""The record's section of per-file sizes/hashes and stored-once ties, written by qcore.save."""


class QcoreConfig(QuantizationConfigMixin):
    """A qcore checkpoint's ``quantization_config``: the qcore record, kept as the JSON it is."""

    def __init__(self, **record: Any) -> None:
        record.pop("quant_method", None)
        self.record = record
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **copy.deepcopy(self.record)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):  # noqa: ANN204 - transformers iterates configs as (key, value)
        yield from self.to_dict().items()


class QcoreHfQuantizer(HfQuantizer):
    """Loads qcore checkpoints: qcore's modules rebuilt on meta before transformers fills them."""

    requires_calibration = True
    quantization_config: QcoreConfig

    def __init__(self, quantization_config: QcoreConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._rebuilt: list[nn.Module] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        from qcore.checkpoint.format import FORMAT, FORMAT_VERSION
        from qcore.plugin.errors import CheckpointError

        record = self.quantization_config.record
        if record.get("format") != FORMAT:
            raise CheckpointError(f"quantization_config has quant_method 'qcore' but format {record.get('format')!r}; "
                                  "the config.json is not qcore's: re-save the checkpoint with qcore.save")
        if int(record.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {record.get('format_version')} is newer than this qcore reads "
                                  f"({FORMAT_VERSION}): upgrade qcore")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from pathlib import Path

        from qcore.arch.surgery import prepare_model
        from qcore.checkpoint.loading import rebuild_modules
        from qcore.quant.attention import install

        prepare_model(model)
        root = Path(str(getattr(model.config, "_name_or_path", "") or "<from_pretrained>"))
        rebuilt = rebuild_modules(model, self.quantization_config.record.get("modules", {}), root)
        loaders = [name for name, (_, ser) in rebuilt.items() if callable(getattr(ser, "load_tensors", None))]
        if loaders:
            from qcore.plugin.errors import CheckpointError

            raise CheckpointError(f"{root}: module(s) {', '.join(loaders[:3])} load their tensors through their "
                                  "serializer, which transformers' loader cannot call: load it with qcore.load(DIR)")
        install(model)
        self._rebuilt = [module for module, _ in rebuilt.values()]
        # every tensor comes from the checkpoint: keep transformers' weight init away from the
        # rebuilt modules and their parents (GPT-2's init writes c_proj.weight, which they lack)
        for name in rebuilt:
            model.get_submodule(name)._is_hf_initialized = True
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from qcore.checkpoint.loading import _post_load

        _post_load(self._rebuilt)
        record = self.quantization_config.record
        model.qcore_record = {k: v for k, v in record.items() if k != HASHED_SECTION}
        # what save_pretrained writes: the tensors under the same names, each tie stored once
        # (transformers drops the tied copy), and no file hashes
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        record[HASHED_SECTION] = {"tied": tied} if tied else {}
        model.eval()
        return model

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def is_serializable(self, safe_serialization: bool = True) -> bool:  # noqa: ARG002 - transformers' signature
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register ``"qcore"`` with transformers' quantization config and quantizer tables (once)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QcoreConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QcoreConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QcoreHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QcoreHfQuantizer)


register()
