"""Attention transforms: a module attached to an attention module that rewrites its queries, keys
and values right before the attention kernel (after RoPE and the KV-cache update).

transformers' attention modules compute q, k, v, apply RoPE, update the cache, then call
``attention_interface(module, query, key, value, attention_mask, **kwargs)``, the function named by
``config._attn_implementation`` in ``AttentionInterface`` (``[batch, heads, tokens, head_dim]``
tensors; keys and values hold every cached token). :func:`attach` sets a transform as the child
:data:`ATTACH_NAME` of an attention module and :func:`install` routes the model through
``qcore+<base>`` (registered once per base implementation in transformers' attention and mask
interfaces): it applies ``module.attention_transform(query, key, value) -> (query, key, value)``
where one is attached, then calls the base implementation (``sdpa``, ``eager``...). The model is
not copied and its modules are not replaced.

A transform is saved like any serialized module (its type needs a registered serializer);
``qcore.load`` rebuilds it at the same place (a new child is allowed only under this name) and
calls :func:`install` again (the routing itself is not saved: transformers never writes
``_attn_implementation``). A transform sees every cached token at every step, so one that acts on
each token independently (per-token quantization, a rotation of the head dimension) gives the same
result with and without a cache.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from qcore.plugin.errors import ArchitectureError

ATTACH_NAME = "attention_transform"
"""The child name of an attention module's transform."""
PREFIX = "qcore+"
"""``config._attn_implementation`` of a routed model: ``qcore+sdpa``, ``qcore+eager``..."""


def _base_function(module: nn.Module, base: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # each modeling file has its own eager function
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ArchitectureError(f"{type(module).__name__}'s module has no eager_attention_forward; "
                                    "use attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _dispatcher(base: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        transform = getattr(module, ATTACH_NAME, None)
        if transform is not None:
            query, key, value = transform(query, key, value)
        return _base_function(module, base)(module, query, key, value, *args, **kwargs)

    attention.__name__ = f"qcore_{base}_attention"
    return attention


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules carrying an attention transform, by full name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, ATTACH_NAME, None), nn.Module)]


def install(model: nn.Module) -> bool:
    """Route ``model``'s attention through the qcore dispatcher when a module carries a transform
    (idempotent); returns whether it is routed."""
    found = attention_modules(model)
    config = getattr(model, "config", None)
    if not found or config is None:
        return False
    base = getattr(config, "_attn_implementation", None) or "eager"
    if base.startswith(PREFIX):
        return True
    for name, module in found:
        if not hasattr(sys.modules[type(module).__module__], "ALL_ATTENTION_FUNCTIONS"):
            raise ArchitectureError(f"{name} ({type(module).__name__}) does not call transformers' attention "
                                    "interface, so an attention transform cannot run there")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ArchitectureError(f"attention implementation {base!r} is not in transformers' AttentionInterface")
    key = PREFIX + base
    if key not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(key, _dispatcher(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS and key not in ALL_MASK_ATTENTION_FUNCTIONS:
        type(ALL_MASK_ATTENTION_FUNCTIONS).register(key, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = key
    return True


def attach(model: nn.Module, attention: str, transform: nn.Module) -> None:
    """Set ``transform`` as the attention transform of module ``attention`` (a full name) and route
    the model through it."""
    module = model.get_submodule(attention)
    if isinstance(getattr(module, ATTACH_NAME, None), nn.Module):
        raise ArchitectureError(f"{attention} already has an attention transform; compose them into one module")
    setattr(module, ATTACH_NAME, transform)
    install(model)
