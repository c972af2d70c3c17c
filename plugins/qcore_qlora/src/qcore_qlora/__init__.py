"""qcore-quant-qlora: a 4-bit (NF4/FP4) bitsandbytes base with LoRA adapters from peft.

``qcore.quantize(model, "qlora", ...)`` converts the decoder blocks' linears to bitsandbytes
``Linear4bit`` and attaches LoRA adapters; :func:`qcore_qlora.finetune.finetune` trains them;
:func:`qcore_qlora.merge.merge_and_unload_to_float` folds them into a float copy of the base,
ready for any other qcore method. Importing this package never imports torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
