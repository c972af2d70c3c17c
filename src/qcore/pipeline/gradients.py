"""The gradient pass: the model's loss on the calibration windows, back-propagated once.

Run before the block pass when a quantizer's ``needs()`` asks for it, on the model as ``prepare``
left it (float weights). It yields, per block, the gradient of the loss with respect to the
block's output (stored in bfloat16 on the CPU: one hidden-state tensor per block and batch), and
the results of the ``"grad"`` observers named in ``Needs.gradient_observers``, run on every
quantizable linear with its input and the gradient with respect to its output, one update per
calibration window. Parameters get no
gradient (they are frozen for the pass). The loss is the sum over calibration windows of each
window's causal LM loss (mean over its tokens), so a window's gradients do not depend on how
windows are batched.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qcore.pipeline.capture import first_tensor, lm_kwargs, module_device
from qcore.pipeline.observers import as_rows, observer_spec, weight_input
from qcore.plugin.errors import ConfigError

if TYPE_CHECKING:
    from qcore.arch.introspect import ModelInfo
    from qcore.data import CalibrationData

GRADIENT_DTYPE = torch.bfloat16
"""dtype of the stored block-output gradients (half the memory of float32)."""


def gradient_pass(model: nn.Module, info: ModelInfo, calibration: CalibrationData, observers: Sequence[str],
                  batch_size: int = 8) -> tuple[dict[str, list[Tensor]], dict[str, dict[str, Any]]]:
    """``({block name: [grad per batch]}, {full linear name: {observer: result}})``."""
    specs = [observer_spec(o) for o in observers]
    wrong = [s.name for s in specs if s.where != "grad"]
    if wrong:
        raise ConfigError(f"Needs.gradient_observers takes gradient observers; {', '.join(wrong)} observe inputs "
                          "or outputs: use block.observe() for those")
    grads: dict[str, list[Tensor]] = {b.name: [] for b in info.blocks}
    linears = {f"{b.name}.{n}": b.module.get_submodule(n) for b in info.blocks for n in b.quantizable()}
    obs = {full: {s.name: s.load_factory()(lin) for s in specs} for full, lin in linears.items()}
    handles = []

    def block_hook(name: str):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            h = first_tensor(out)
            if h.requires_grad:
                h.register_hook(lambda g: grads[name].append(g.detach().to("cpu", GRADIENT_DTYPE)))
        return hook

    def linear_hook(full: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            x = weight_input(module, args[0].detach())

            def on_grad(g: Tensor) -> None:  # once per calibration window
                for i in range(x.shape[0]) if x.dim() > 2 else [None]:
                    xi, gi = (x, g) if i is None else (x[i], g[i])
                    for o in obs[full].values():
                        o.update(as_rows(xi), as_rows(gi))

            if out.requires_grad:
                out.register_hook(on_grad)
        return hook

    for b in info.blocks:
        handles.append(b.module.register_forward_hook(block_hook(b.name)))
    if specs:
        for full, lin in linears.items():
            handles.append(lin.register_forward_hook(linear_hook(full)))
    embed = model.get_submodule(info.embed) if info.embed else None
    if embed is None:
        raise ConfigError("the gradient pass needs the model's input embeddings; this model has none qcore found")
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    device = module_device(model)
    try:
        with torch.enable_grad():
            for batch in calibration.batches(batch_size):
                ids = batch.to(device)
                out = model(**lm_kwargs(model, ids), labels=ids)
                (out.loss * ids.shape[0]).backward()  # sum of the windows' mean losses: per-window grads
    finally:
        for h in handles:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
    stats = {full: {k: o.result() for k, o in per.items()} for full, per in obs.items()}
    return grads, stats
