"""Activation quantization with learned step sizes for block reconstruction (LSQ: Esser et al., 2020).

Each quantized linear's input gets a symmetric grid ``q = clamp(round(x / s), -m, m)``,
``m = 2**(bits-1) - 1`` (the core's ``ActQuant`` grid, so what is trained is what runs):

* static (``dynamic=False``): one step ``s`` per linear, learned as ``log s``;
* dynamic (``dynamic=True``): per token ``s = clip * max|x_token| / m``, with the clip ratio of
  each linear learned (as ``logit(clip)``, so it stays in (0, 1)).

The grid's range is clamped before rounding, which passes gradients straight through, so the
step's gradient is LSQ's:
``round(x/s) - x/s`` inside the grid and ``+-m`` outside it. Both start from the ratio of
:data:`CLIP_GRID` with the smallest quantization error on the linear's sampled inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qcore.plugin import ActQuant

CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))
"""Fractions of the range (per tensor or per token) the initial search tries: 1.0 down to 0.3."""
MAX_CLIP = 0.999
"""Largest initial clip ratio of the dynamic grid (its logit must be finite)."""
INIT_ROWS = 2048
"""Input rows per calibration batch sampled for the initial search."""


def ste_round(v: Tensor) -> Tensor:
    """``round(v)`` in the forward pass, the identity in the backward pass."""
    return (v.round() - v).detach() + v


def grid_max(bits: int) -> int:
    """Largest code of the symmetric ``bits``-bit grid."""
    return 2 ** (bits - 1) - 1


def static_fake_quant(x: Tensor, log_step: Tensor, bits: int) -> Tensor:
    """``x`` on the static grid of step ``exp(log_step)`` (LSQ gradients for the step)."""
    m = grid_max(bits)
    s = log_step.exp()
    return (ste_round((x.float() / s).clamp(-m, m)) * s).to(x.dtype)


def dynamic_fake_quant(x: Tensor, clip_logit: Tensor, bits: int) -> Tensor:
    """``x`` on per-token grids covering ``sigmoid(clip_logit)`` of each token's range."""
    m = grid_max(bits)
    xf = x.float()
    s = (xf.detach().abs().amax(dim=-1, keepdim=True) * torch.sigmoid(clip_logit) / m).clamp_min(1e-12)
    return (ste_round((xf / s).clamp(-m, m)) * s).to(x.dtype)


@dataclass
class ActStep:
    """One linear's activation grid: ``param`` is ``log s`` (static) or ``logit(clip)`` (dynamic)."""

    bits: int
    dynamic: bool
    param: Tensor

    def fake_quant(self, x: Tensor) -> Tensor:
        fn = dynamic_fake_quant if self.dynamic else static_fake_quant
        return fn(x, self.param, self.bits)

    def to_act(self) -> ActQuant:
        """The core's run-time description of this grid."""
        value = float(self.param.detach())
        if self.dynamic:
            return ActQuant(self.bits, dynamic=True, sym=True, clip=min(1.0, 1.0 / (1.0 + math.exp(-value))))
        return ActQuant(self.bits, dynamic=False, sym=True, scale=math.exp(value))


def init_step(samples: Tensor, bits: int, dynamic: bool, grid: tuple[float, ...] = CLIP_GRID) -> ActStep:
    """The grid of :data:`CLIP_GRID`'s ratio with the smallest squared error on ``samples``
    (rows of the linear's input); its parameter requires grad."""
    x = samples.float()
    best, best_err = grid[0], math.inf
    for ratio in grid:
        r = min(ratio, MAX_CLIP) if dynamic else ratio
        param = _param(x, r, bits, dynamic)
        err = float((ActStep(bits, dynamic, param).fake_quant(x) - x).pow(2).mean())
        if err < best_err:
            best, best_err = r, err
    return ActStep(bits, dynamic, _param(x, best, bits, dynamic).requires_grad_(True))


def _param(x: Tensor, ratio: float, bits: int, dynamic: bool) -> Tensor:
    if dynamic:
        return torch.tensor(math.log(ratio / (1.0 - ratio)), dtype=torch.float32)
    absmax = float(x.abs().max())
    step = ratio * absmax / grid_max(bits) if absmax > 0 else 1.0
    return torch.tensor(math.log(step), dtype=torch.float32)


def input_hook(step: ActStep) -> Callable[[nn.Module, tuple], tuple]:
    """A forward pre-hook that fake-quantizes a linear's input with ``step``."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (step.fake_quant(args[0]), *args[1:])
    return hook
