"""QLoRA options. No torch import."""
from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from qcore.plugin import QuantConfig

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
class QLoRAConfig(QuantConfig):
    """4-bit base (bitsandbytes) + LoRA adapters (peft).

    ``targets``: which block linears get adapters, as introspection roles (``q``, ``v``,
    ``down``, ``expert.up`` ...) or fnmatch patterns of names relative to a block
    (``self_attn.*``); ``None`` means every linear of every block except MoE routers.
    """

    method = "qlora"

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantize the per-block absmax constants again (bitsandbytes ``compress_statistics``)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: list[str] | None = None

    @field_validator("r")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v < 1:
            raise ValueError("r (LoRA rank) must be a positive integer such as 8, 16 or 64")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("dropout must be in [0, 1), e.g. 0.05")
        return v

    @model_validator(mode="after")
    def _targets(self) -> QLoRAConfig:
        if self.targets is not None and not self.targets:
            raise ValueError("targets must name at least one role or pattern (e.g. ['q', 'v']) or be None for all")
        return self

    @property
    def scaling(self) -> float:
        """LoRA's output scale ``alpha / r``."""
        return self.alpha / self.r
