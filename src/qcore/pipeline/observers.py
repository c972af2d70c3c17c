"""Observers: statistics of a linear's input, output or gradient, registered like any plugin part.

The built-in ones (registered through ``qcore_register_observers`` by qcore's own plugin module):

==============  ======  ====================================================================
``hessian``     input   ``{"hessian": H, "nsamples": n}``, H float32 ``[in, in]`` = 2/n sum x x^T
                        over the n tokens the linear saw (MoE experts see only their tokens)
``absmax``      input   float32 ``[in]``: max |x| per input channel
``absmean``     input   float32 ``[in]``: mean |x| per input channel
``inputs``      input   list of float32 ``[tokens, in]`` tensors, one per batch that reached it;
                        ``max_rows`` keeps at most that many random rows per batch (drawn with
                        the ``generator`` option, shared across the linears of one call)
``out_absmax``  output  float32 ``[out]``: max |y| per output channel
``fisher``      grad    float32 ``[out, in]``: sum over calibration windows of (dL/dW)^2, the
                        diagonal empirical Fisher of the weights (from the gradient pass)
``grad_sq``     grad    float32 ``[out]``: mean over tokens of (dL/dy)^2 per output channel
                        (from the gradient pass; weights the output error by its effect on the loss)
==============  ======  ====================================================================

An observer is built per linear as ``factory(linear, **options)`` and gets ``update(x, y)`` once
per batch (see :class:`qcore.plugin.ObserverSpec` for what ``x`` and ``y`` are). When several
processes share the calibration windows (:mod:`qcore.pipeline.distributed`), its ``all_reduce()``
combines the processes' statistics before ``result()``; an observer without one is refused there.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qcore.pipeline.distributed import all_gather_rows, all_reduce, all_reduce_count
from qcore.plugin.errors import ConfigError
from qcore.plugin.spec import ObserverSpec

HOOK = "qcore_register_observers"


def _features(linear: nn.Module, attr: str, dim: int) -> int:
    value = getattr(linear, attr, None)
    return int(value) if value is not None else int(linear.weight.shape[dim])


def _device(linear: nn.Module) -> torch.device:
    for t in list(linear.parameters()) + list(linear.buffers()):
        return t.device
    return torch.device("cpu")


class Hessian:
    def __init__(self, linear: nn.Module) -> None:
        n = _features(linear, "in_features", 1)
        self.h = torch.zeros(n, n, dtype=torch.float32, device=_device(linear))
        self.n = 0

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        self.h.add_(x.t() @ x)
        self.n += x.shape[0]

    def all_reduce(self) -> None:
        all_reduce(self.h)
        self.n = all_reduce_count(self.n)

    def result(self) -> dict[str, Any]:
        if self.n:
            self.h.mul_(2.0 / self.n)
        return {"hessian": self.h, "nsamples": self.n}


class AbsMax:
    def __init__(self, linear: nn.Module) -> None:
        self.v = torch.zeros(_features(linear, "in_features", 1), dtype=torch.float32, device=_device(linear))

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        if x.shape[0]:
            torch.maximum(self.v, x.abs().amax(dim=0), out=self.v)

    def all_reduce(self) -> None:
        all_reduce(self.v, "max")

    def result(self) -> Tensor:
        return self.v


class AbsMean:
    def __init__(self, linear: nn.Module) -> None:
        self.v = torch.zeros(_features(linear, "in_features", 1), dtype=torch.float32, device=_device(linear))
        self.n = 0

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        self.v.add_(x.abs().sum(dim=0))
        self.n += x.shape[0]

    def all_reduce(self) -> None:
        all_reduce(self.v)
        self.n = all_reduce_count(self.n)

    def result(self) -> Tensor:
        return self.v / max(self.n, 1)


class Inputs:
    def __init__(self, linear: nn.Module, max_rows: int | None = None,
                 generator: torch.Generator | None = None, device: str | None = None) -> None:
        self.rows, self.gen, self.device = max_rows, generator, device
        self.features = _features(linear, "in_features", 1)
        self.xs: list[Tensor] = []

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        if self.rows is not None and x.shape[0] > self.rows:
            x = x[torch.randperm(x.shape[0], generator=self.gen)[: self.rows].to(x.device)]
        self.xs.append(x.clone() if self.device is None else x.to(self.device))

    def all_reduce(self) -> None:
        """Every process's rows, one tensor per process (in rank order)."""
        mine = torch.cat(self.xs) if self.xs else torch.zeros(0, self.features)
        self.xs = [x for x in all_gather_rows(mine) if x.shape[0]]

    def result(self) -> list[Tensor]:
        return self.xs


class OutputAbsMax:
    def __init__(self, linear: nn.Module) -> None:
        self.v = torch.zeros(_features(linear, "out_features", 0), dtype=torch.float32, device=_device(linear))

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        if y is not None and y.shape[0]:
            torch.maximum(self.v, y.abs().amax(dim=0).to(self.v.device), out=self.v)

    def all_reduce(self) -> None:
        all_reduce(self.v, "max")

    def result(self) -> Tensor:
        return self.v


class Fisher:
    """Per calibration window (one ``update``): dL/dW = g^T x over its tokens; sums its square."""

    def __init__(self, linear: nn.Module) -> None:
        shape = (_features(linear, "out_features", 0), _features(linear, "in_features", 1))
        self.f = torch.zeros(shape, dtype=torch.float32, device=_device(linear))

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        assert y is not None, "fisher is a gradient observer"
        self.f.add_((y.t() @ x).pow_(2))

    def all_reduce(self) -> None:
        all_reduce(self.f)

    def result(self) -> Tensor:
        return self.f


class GradSquare:
    """Per output channel: the mean over tokens of the squared gradient of the loss w.r.t. the output."""

    def __init__(self, linear: nn.Module) -> None:
        self.v = torch.zeros(_features(linear, "out_features", 0), dtype=torch.float32, device=_device(linear))
        self.n = 0

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        assert y is not None, "grad_sq is a gradient observer"
        self.v.add_(y.pow(2).sum(dim=0).to(self.v.device))
        self.n += y.shape[0]

    def all_reduce(self) -> None:
        all_reduce(self.v)
        self.n = all_reduce_count(self.n)

    def result(self) -> Tensor:
        return self.v / max(self.n, 1)


BUILTIN_OBSERVERS: tuple[ObserverSpec, ...] = (
    ObserverSpec("hessian", "2/n sum x x^T of a linear's input (GPTQ)", Hessian),
    ObserverSpec("absmax", "max |x| per input channel (SmoothQuant)", AbsMax),
    ObserverSpec("absmean", "mean |x| per input channel (AWQ)", AbsMean),
    ObserverSpec("inputs", "the input rows themselves, optionally sampled", Inputs),
    ObserverSpec("out_absmax", "max |y| per output channel", OutputAbsMax, where="output"),
    ObserverSpec("fisher", "diagonal empirical Fisher of the weights, from the gradient pass", Fisher,
                 where="grad"),
    ObserverSpec("grad_sq", "mean squared gradient of the loss per output channel, from the gradient pass",
                 GradSquare, where="grad"),
)


def observer_spec(name: str) -> ObserverSpec:
    """The registered observer ``name`` (built-in or a plugin's)."""
    from qcore.registry import extensions

    found = extensions(HOOK)
    if name not in found:
        raise ConfigError(f"unknown observer '{name}'; registered observers: {', '.join(sorted(found))}")
    return found[name]


def as_rows(t: Tensor) -> Tensor:
    """A float32 ``[tokens, features]`` view of a linear's input or output."""
    return t.detach().reshape(-1, t.shape[-1]).float()


def weight_input(linear: nn.Module, x: Tensor) -> Tensor:
    """What the linear's weight multiplies: its input after the input transform it carries (an
    online rotation or scale), so statistics describe the weight's own input."""
    from qcore.quant.linear import QuantLinear
    from qcore.quant.transformed import TransformedLinear

    if isinstance(linear, (QuantLinear, TransformedLinear)) and linear.input_transform is not None:
        with torch.no_grad():
            return linear.input_transform(x)
    return x
