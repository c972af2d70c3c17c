"""Resolving a method chain and its options into configs: the one function behind both
``qcore.quantize`` and ``qcore.check``, so the configs checked are the configs that run.

Options go to every method of the chain whose config declares them (``group_size`` reaches both
``awq`` and ``gptq``); ``config=`` passes ready config objects instead. A method's
``Capabilities.chain_options`` then carry an explicitly given option to the weight method that
follows (``smoothquant``'s ``w_bits`` becomes ``gptq``'s ``bits``; conflicting values are a
problem). No torch import.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from qcore.plugin.config import QuantConfig
from qcore.plugin.errors import CompatibilityError, ConfigError, QcoreError
from qcore.plugin.spec import MethodSpec


@dataclass
class Problem:
    """Why a chain cannot run, what to do instead, and whether an option caused it."""

    reason: str
    fix: str = ""
    option: bool = False


@dataclass
class Chain:
    """A resolved chain: one spec and one config per method (None where the config failed)."""

    names: list[str]
    specs: list[MethodSpec] = field(default_factory=list)
    configs: list[QuantConfig | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def ready_configs(self) -> list[QuantConfig]:
        return [c for c in self.configs if c is not None]

    def raise_if_failed(self) -> None:
        """Raise the first problem as ``ConfigError`` (options) or ``CompatibilityError``."""
        if self.ok:
            return
        p = self.problems[0]
        text = p.reason + (f"; {p.fix}" if p.fix else "")
        raise (ConfigError if p.option else CompatibilityError)(text)


def resolve_chain(method: str | MethodSpec | Sequence[str | MethodSpec], config: Any = None,
                  options: dict[str, Any] | None = None) -> Chain:
    """Specs and configs of ``method`` (a name, a spec or a chain of them) with its problems."""
    from qcore.registry import get_registry

    items = [method] if isinstance(method, (str, MethodSpec)) else list(method)
    chain = Chain(names=[m if isinstance(m, str) else m.name for m in items])
    options = dict(options or {})
    if not items:
        chain.problems.append(Problem("no method given", "pass a method name such as 'rtn' or a chain such as "
                                      "['awq', 'gptq']", option=True))
        return chain
    registry = get_registry()
    for m in items:
        try:
            chain.specs.append(m if isinstance(m, MethodSpec) else registry.get(m))
        except QcoreError as exc:
            chain.problems.append(Problem(str(exc)))
    if len(chain.specs) != len(items):
        return chain
    chain.configs = _configs(chain, config, options)
    _check_order(chain)
    _carry_chain_options(chain)
    return chain


def _configs(chain: Chain, config: Any, options: dict[str, Any]) -> list[QuantConfig | None]:
    specs = chain.specs
    if config is not None:
        given = [config] if isinstance(config, QuantConfig) else list(config)
        if options:
            chain.problems.append(Problem(f"pass either config= or options ({', '.join(sorted(options))}), not both",
                                          option=True))
        if len(given) != len(specs):
            chain.problems.append(Problem(f"{len(specs)} method(s) but {len(given)} config(s)",
                                          "give one config per method of the chain", option=True))
            return [None] * len(specs)
        out: list[QuantConfig | None] = []
        for spec, cfg in zip(specs, given):
            if isinstance(cfg, spec.config_cls):
                out.append(cfg.model_copy(deep=True))
            else:
                chain.problems.append(Problem(f"method '{spec.name}' takes a {spec.config_cls.__name__}, got "
                                              f"{type(cfg).__name__}", option=True))
                out.append(None)
        return out
    used: set[str] = set()
    out = []
    for spec in specs:
        mine = {k: v for k, v in options.items() if k in spec.config_cls.model_fields}
        used |= set(mine)
        try:
            out.append(spec.config_cls.from_options(**mine))
        except ConfigError as exc:
            chain.problems.append(Problem(str(exc), option=True))
            out.append(None)
    unknown = sorted(set(options) - used)
    if unknown:
        valid = ("; ".join(f"{s.name}: {', '.join(s.config_cls.option_names())}" for s in specs)
                 if len(specs) > 1 else ", ".join(specs[0].config_cls.option_names()))
        what = f"method '{specs[0].name}'" if len(specs) == 1 else "chain " + " + ".join(s.name for s in specs)
        chain.problems.append(Problem(f"unknown option(s) {', '.join(unknown)} for {what}; valid options: {valid}",
                                      option=True))
    return out


def _check_order(chain: Chain) -> None:
    for first, second in zip(chain.specs, chain.specs[1:]):
        if first.composes_before(second):
            continue
        allowed = ", ".join(first.capabilities.composes_with) or "nothing"
        fix = (f"reverse the order: ['{second.name}', '{first.name}']" if second.composes_before(first)
               else f"quantize with '{first.name}' or '{second.name}' alone")
        chain.problems.append(Problem(f"'{second.name}' cannot follow '{first.name}' in a chain ('{first.name}' "
                                      f"composes with: {allowed})", fix))


def _carry_chain_options(chain: Chain) -> None:
    """Apply each method's ``chain_options`` to the next weight method of the chain."""
    for i, (spec, cfg) in enumerate(zip(chain.specs, chain.configs)):
        if cfg is None or not spec.capabilities.chain_options:
            continue
        nxt = next((j for j in range(i + 1, len(chain.specs)) if chain.specs[j].capabilities.quantizes_weights), None)
        if nxt is None or chain.configs[nxt] is None:
            continue
        target, tspec = chain.configs[nxt], chain.specs[nxt]
        for own, theirs in spec.capabilities.chain_options:
            if own not in cfg.model_fields_set or theirs not in type(target).model_fields:
                continue
            value = getattr(cfg, own)
            if theirs in target.model_fields_set and getattr(target, theirs) != value:
                chain.problems.append(Problem(
                    f"{spec.name} {own}={value} conflicts with {tspec.name} {theirs}={getattr(target, theirs)}",
                    f"give only {theirs}= (the weight method's) or make them equal", option=True))
                continue
            try:
                setattr(target, theirs, value)  # validate_assignment: the target's own rules apply
            except ValidationError as exc:
                chain.problems.append(Problem(f"{spec.name} {own}={value} is not a valid {tspec.name} {theirs}: "
                                              f"{exc.errors()[0]['msg']}", option=True))
