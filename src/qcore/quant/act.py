"""Activation quantization carried by :class:`qcore.quant.linear.QuantLinear`.

``ActQuant`` describes how a linear layer's *input* is quantized at run time:

* ``dynamic=True``: one scale per token (row), computed on the fly (SmoothQuant's W8A8,
  QuaRot's A4/A8);
* ``dynamic=False``: one calibrated per-tensor ``scale`` (static quantization).

Symmetric grids are ``q = clamp(round(x / s), -(2**(b-1)-1), 2**(b-1)-1)`` with
``s = absmax / (2**(b-1) - 1)``; asymmetric grids use ``[0, 2**b - 1]`` with a zero point.
Only the int8 symmetric case runs integer arithmetic (see ``QuantLinear``'s ``w8a8`` backend);
other widths (A4, A6) and asymmetric grids are fake-quantized (quantize-dequantize, then a float
matmul), which gives the same numbers an integer kernel would, without its speed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from qcore.plugin.errors import ConfigError

ACT_BITS: tuple[int, ...] = (4, 6, 8)


@dataclass(frozen=True)
class ActQuant:
    """How a layer's input activations are quantized."""

    bits: int = 8
    dynamic: bool = True
    """Per-token scales computed at run time; False = static per-tensor ``scale``."""
    sym: bool = True
    scale: float | None = None
    """Calibrated per-tensor scale (static only)."""
    zero: float = 0.0
    """Calibrated per-tensor zero point in code units (static asymmetric only)."""
    clip: float = 1.0
    """Dynamic grids: fraction of each token's range the grid covers (values beyond are clipped);
    QuaRot's 4-bit activations use 0.9."""

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ConfigError(f"activation bits={self.bits} is not supported; use one of {ACT_BITS}")
        if not self.dynamic and (self.scale is None or not self.scale > 0):
            raise ConfigError(
                "static activation quantization needs a calibrated positive scale: pass scale= "
                "(e.g. from calibrate_static_scale) or use dynamic=True"
            )
        if not 0.0 < self.clip <= 1.0:
            raise ConfigError(f"activation clip={self.clip} must lie in (0, 1]: the fraction of each token's "
                              "range the grid covers (1 = no clipping)")

    @property
    def integer_kernel(self) -> bool:
        """Whether the int8 x int8 path applies (8-bit, symmetric, unclipped)."""
        return self.bits == 8 and self.sym and self.clip == 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["clip"] == 1.0:  # the default: checkpoints stay readable without the field
            del data["clip"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ActQuant | None:
        if data is None:
            return None
        known = {"bits", "dynamic", "sym", "scale", "zero", "clip"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown activation-quantization field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)


def act_qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Integer code range of the activation grid."""
    if sym:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def act_params(x: Tensor, act: ActQuant) -> tuple[Tensor, Tensor]:
    """``(scale, zero)`` broadcastable to ``x`` (per token ``[..., 1]`` or per tensor ``[]``)."""
    lo, hi = act_qrange(act.bits, act.sym)
    if not act.dynamic:
        s = torch.tensor(float(act.scale), dtype=torch.float32, device=x.device)  # type: ignore[arg-type]
        return s, torch.tensor(float(act.zero), dtype=torch.float32, device=x.device)
    xf = x.float()
    if act.sym:
        s = xf.abs().amax(dim=-1, keepdim=True) * act.clip / hi
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s)
    xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * act.clip
    xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * act.clip
    s = (xmax - xmin) / (hi - lo)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.round(-xmin / s)


def quantize_act(x: Tensor, act: ActQuant) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes float, scale, zero)``: integer-valued codes on the activation grid."""
    lo, hi = act_qrange(act.bits, act.sym)
    s, z = act_params(x, act)
    q = torch.round(x.float() / s + z).clamp_(lo, hi)
    return q, s, z


def fake_quant_act(x: Tensor, act: ActQuant) -> Tensor:
    """Quantize-dequantize ``x`` on the activation grid (same dtype as ``x``)."""
    q, s, z = quantize_act(x, act)
    return ((q - z) * s).to(x.dtype)


def quantize_act_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token symmetric int8: ``(int8 [..., in], float32 scale [..., 1])``.

    Same grid as ``quantize_act(x, ActQuant(8))`` in fewer ops (it runs on every forward).
    """
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).div_(127).clamp_(min=1e-30)
    return torch.round(xf / s).clamp_(-127, 127).to(torch.int8), s


def calibrate_static_scale(samples: Tensor, bits: int = 8, sym: bool = True) -> ActQuant:
    """A static per-tensor ``ActQuant`` from calibration activations (min/max)."""
    xf = samples.float()
    lo, hi = act_qrange(bits, sym)
    if sym:
        s = float(xf.abs().max()) / hi
        return ActQuant(bits, dynamic=False, sym=True, scale=s if s > 0 else 1.0)
    xmin = min(float(xf.min()), 0.0)
    xmax = max(float(xf.max()), 0.0)
    s = (xmax - xmin) / (hi - lo) or 1.0
    return ActQuant(bits, dynamic=False, sym=False, scale=s, zero=float(round(-xmin / s)))
