"""AWQ options (pydantic; no torch import)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from qcore.plugin import WeightQuantConfig

#: Roles whose weights the clip search leaves alone: errors in q and k are amplified by the
#: attention softmax, which a per-linear output error does not see (as in the reference method).
DEFAULT_CLIP_SKIP_ROLES: tuple[str, ...] = ("q", "k", "qkv")


class AWQConfig(WeightQuantConfig):
    """Activation-aware scale search, exact folding, clip search, then RTN (or a later GPTQ)."""

    method = "awq"

    n_grid: int = Field(20, ge=2, le=200)
    """Points of the exponent grid a = 0, 1/n, ..., (n-1)/n searched per scale group."""
    duo_scaling: bool = True
    """s = mean|x|^a / mean|w|^(1-a) (True) or s = mean|x|^a (False)."""
    search_output: Literal["module", "block"] = "module"
    """Where the scale search measures the error: the smallest module spanning the group
    (``self_attn`` for q/k/v, ``mlp`` for gate/up, the linear for v->o and up->down; as the
    reference implementation) or the whole decoder block's output."""
    scale_gqa_attn_out: bool = False
    """Also scale v -> o under grouped-query attention, with scales tied across the query heads
    that share a kv head (exact). Off by default, as in the reference implementations: on
    SmolLM2-135M at 3 bits it raised WikiText-2 perplexity from 59.5 to 65.3 although every
    block's o_proj output error on the calibration text fell (docs/results.md)."""
    clip_search: bool | None = None
    """Search a per-group shrink of the weight range after scaling. None (default): search when
    AWQ quantizes the weights itself (RTN); skip it when a later method in the chain quantizes
    them (``["awq", "gptq"]``: GPTQ's error feedback and its own range search replace it; the
    RTN-tuned clip made AWQ+GPTQ worse, see docs/results.md)."""
    clip_grid: int = Field(20, ge=2, le=200)
    """Shrink step is 1/clip_grid; shrinks 1, 1-1/g, ... down to 1 - clip_max_shrink."""
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    n_clip_samples: int = Field(512, ge=16)
    """Calibration tokens (per linear) the clip search evaluates the output error on."""
    clip_skip_roles: list[str] = list(DEFAULT_CLIP_SKIP_ROLES)
