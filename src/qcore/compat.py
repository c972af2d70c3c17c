"""The compatibility matrix as data, and ``qcore.check``.

The matrix is computed, never written by hand: methods come from the registry (each
``MethodSpec.capabilities``), architecture families from :data:`qcore.arch.table.FAMILIES`,
options from each method's config class. :func:`check` applies the same data to one model;
``qcore.quantize`` runs it first and refuses with its message.

``docs/compatibility.md`` is generated from it by ``tools/gen_compat.py`` (the methods of this
repository: qcore's built-ins plus ``plugins/qcore_*``). Importing this module does not import
torch; :func:`check` does when it inspects a model.
"""
from __future__ import annotations

import fnmatch
import json
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qcore.arch import table as archtable
from qcore.plugin.config import QuantConfig, layer_value, layer_values
from qcore.plugin.errors import CompatibilityError, ConfigError, QcoreError
from qcore.registry import get_registry
from qcore.plugin.spec import MethodSpec

if TYPE_CHECKING:
    from qcore.arch.introspect import ModelInfo
    from qcore.pipeline.chain import Chain

ACT_BITS_FIELDS: tuple[str, ...] = ("act_bits", "activation_bits", "a_bits")
"""Config fields holding a method's activation bit width (checked against ``activation_bits``)."""

REGENERATE = "python tools/gen_compat.py > docs/compatibility.md"


class ConfigCompatibilityError(ConfigError, CompatibilityError):
    """A refusal caused (at least in part) by an unknown or invalid option: both error types."""


# ----------------------------------------------------------------------------------------------
# the verdict
# ----------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """Whether a method (or chain) can quantize a model with these options, and why not."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    family: str = ""
    configs: list[QuantConfig] = field(default_factory=list, repr=False)
    config_failure: bool = field(default=False, repr=False)
    """True when an option was unknown or invalid (``raise_if_failed`` then raises an error that
    is both a ``ConfigError`` and a ``CompatibilityError``)."""

    def message(self) -> str:
        """One line: what is refused, why, and what to do instead."""
        if self.ok:
            return f"{' + '.join(self.methods)} can quantize this {self.family or 'model'}"
        target = f" on {self.family}" if self.family else ""
        reasons = dict.fromkeys(self.reasons)  # a chain's methods may each report the same problem
        text = f"cannot quantize with {' + '.join(self.methods) or '?'}{target}: " + "; ".join(reasons)
        if self.recommendations:
            text += ". Try: " + "; ".join(dict.fromkeys(self.recommendations))
        return text

    def raise_if_failed(self) -> None:
        """Raise ``CompatibilityError`` (``ConfigCompatibilityError`` for option errors) unless ok."""
        if self.ok:
            return
        cls = ConfigCompatibilityError if self.config_failure else CompatibilityError
        raise cls(self.message())


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def family_supported(spec: MethodSpec, family: str) -> bool:
    """Whether ``spec.capabilities.architectures`` (fnmatch patterns) admit ``family``."""
    return any(fnmatch.fnmatchcase(family, p) for p in spec.capabilities.architectures)


def dividing_group_sizes(in_features: list[int] | tuple[int, ...], candidates: tuple[int, ...]) -> list[int]:
    """Positive ``candidates`` that divide every value of ``in_features``, largest first."""
    return sorted((g for g in set(candidates) if g > 0 and all(n % g == 0 for n in in_features)),
                  reverse=True)


def _or_list(values: list[Any]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _config_value(config: QuantConfig, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in type(config).model_fields:
            return getattr(config, name)
    return None


# ----------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------
def check(model: Any, method: str | MethodSpec | list[str | MethodSpec] | tuple[str | MethodSpec, ...],
          **options: Any) -> Verdict:
    """Check that ``method`` (a name, a spec, or a chain of them) can quantize ``model``.

    ``model`` is an ``nn.Module`` (inspected with :func:`qcore.arch.introspect.inspect_model`, which
    rewrites Conv1D/fused experts exactly, in place), a ``ModelInfo``, or ``None`` to check
    only the options. ``options`` go to every method whose config declares them (``budget_bits``,
    ``budget_bytes``, ``budget_candidates`` and ``budget_criterion`` describe a size budget, see
    :mod:`qcore.pipeline.budget`);
    ``config=`` passes a ready config (or one per method of a chain) instead. The chain is
    resolved by :func:`qcore.pipeline.chain.resolve_chain`, as ``qcore.quantize`` does.
    """
    from qcore.pipeline.budget import budget_problems, split_budget
    from qcore.pipeline.chain import resolve_chain

    config = options.pop("config", None)
    try:
        budget = split_budget(options)  # budget_bits=... (qcore.quantize's mixed precision)
    except ConfigError as exc:
        names = [m if isinstance(m, str) else m.name for m in ([method] if isinstance(method, (str, MethodSpec))
                                                               else method)]
        return Verdict(ok=False, reasons=[str(exc)], methods=names, config_failure=True)
    chain = resolve_chain(method, config, options)
    if budget is not None:
        chain.problems += budget_problems(chain, budget)
    verdict = check_chain(model, chain)
    if budget is not None and verdict.ok and model is not None:
        _check_budget(model, chain, budget, verdict)
    return verdict


def _check_budget(model: Any, chain: Chain, budget: Any, verdict: Verdict) -> None:
    """The budget must be reachable with the candidate widths on this model's layers."""
    from qcore.pipeline.budget import make_plan

    info = _model_info(model, verdict)
    if info is None:
        return
    try:
        make_plan(info, chain, budget)
    except ConfigError as exc:
        verdict.reasons.append(str(exc))
        verdict.config_failure = True
        verdict.ok = False


def check_chain(model: Any, chain: Chain) -> Verdict:
    """The verdict on a resolved chain (what ``qcore.quantize`` runs) for ``model``."""
    verdict = Verdict(ok=True, methods=list(chain.names))
    for p in chain.problems:
        verdict.reasons.append(p.reason)
        if p.fix:
            verdict.recommendations.append(p.fix)
        verdict.config_failure = verdict.config_failure or p.option
    specs, configs = chain.specs, chain.configs
    if len(specs) != len(chain.names):
        verdict.ok = False
        return verdict
    for spec, cfg in zip(specs, configs):
        if cfg is not None:
            _check_bits(spec, cfg, verdict)
    from qcore.pipeline import validate

    module = model if hasattr(model, "named_modules") else None
    quantized = validate.quantized_problem(module, specs) if module is not None else None
    if quantized is not None:  # introspecting its quantized layers would only confuse the verdict
        verdict.reasons.append(quantized.reason)
        verdict.recommendations.append(quantized.fix)
        verdict.configs = [c for c in configs if c is not None]
        verdict.ok = False
        return verdict
    info = _model_info(model, verdict) if model is not None else None
    if info is not None:
        verdict.family = info.family
        registry = get_registry()
        for spec in specs:
            if not family_supported(spec, info.family):
                verdict.reasons.append(
                    f"{spec.name} does not support architecture family '{info.family}' "
                    f"(it supports: {', '.join(spec.capabilities.architectures)})")
                others = sorted(n for n, s in registry.methods.items()
                                if s.capabilities.kind == spec.capabilities.kind and family_supported(s, info.family))
                if others:
                    verdict.recommendations.append(f"methods of kind {spec.capabilities.kind} that support "
                                                   f"'{info.family}': {', '.join(others)}")
        for spec, cfg in zip(specs, configs):
            if cfg is not None:
                _check_groups(spec, cfg, info, verdict)
        for problem in validate.model_problems(module, info, specs, [c for c in configs if c is not None]):
            verdict.reasons.append(problem.reason)
            if problem.fix:
                verdict.recommendations.append(problem.fix)
            verdict.config_failure = verdict.config_failure or problem.option
    verdict.configs = [c for c in configs if c is not None]
    verdict.ok = not verdict.reasons
    return verdict


def _check_bits(spec: MethodSpec, cfg: QuantConfig, verdict: Verdict) -> None:
    """Every bit width and group size the config may use (per-layer maps included) must be among
    the method's capabilities."""
    caps = spec.capabilities
    for bits in layer_values(_config_value(cfg, ("bits",))):
        if caps.weight_bits and bits not in caps.weight_bits:
            verdict.reasons.append(f"{spec.name} supports weight bits {', '.join(map(str, caps.weight_bits))}, "
                                   f"not {bits}")
            near = min(caps.weight_bits, key=lambda b: (abs(b - bits), -b))
            verdict.recommendations.append(f"use bits={near}")
    abits = _config_value(cfg, ACT_BITS_FIELDS)
    if isinstance(abits, int) and caps.activation_bits and abits not in caps.activation_bits:
        verdict.reasons.append(f"{spec.name} supports activation bits "
                               f"{', '.join(map(str, caps.activation_bits))}, not {abits}")
    for gs in layer_values(_config_value(cfg, ("group_size",))):
        if caps.group_sizes and gs not in caps.group_sizes:
            verdict.reasons.append(f"{spec.name} supports group sizes {', '.join(map(str, caps.group_sizes))}, "
                                   f"not {gs}")


def _model_info(model: Any, verdict: Verdict) -> ModelInfo | None:
    from qcore.arch.introspect import ModelInfo, inspect_model

    if isinstance(model, ModelInfo):
        return model
    try:
        return inspect_model(model)
    except QcoreError as exc:
        verdict.reasons.append(str(exc))
        return None


def _check_groups(spec: MethodSpec, cfg: QuantConfig, info: ModelInfo, verdict: Verdict) -> None:
    """Each quantized linear's group size (per-layer maps applied) must divide its in_features."""
    gs_value = _config_value(cfg, ("group_size",))
    if gs_value is None:
        return
    targets = [(name, li) for name, li in info.linear_infos() if li.quantize and not cfg.ignores(name)]
    sized = [(name, li, layer_value(gs_value, name)) for name, li in targets]
    bad = [(name, li, gs) for name, li, gs in sized if gs > 0 and li.in_features % gs]
    if not bad:
        return
    name, li, gs = bad[0]
    widths = sorted({t.in_features for _, t in targets})
    fits = dividing_group_sizes(widths, spec.capabilities.group_sizes)
    if fits:
        fix = _or_list(fits)
    elif -1 in spec.capabilities.group_sizes:
        fix = "-1 (one scale per output channel)"
    else:
        fix = "ignore= for these linears"
    more = f" (and {len(bad) - 1} more linear{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    verdict.reasons.append(f"group_size {gs} does not divide in_features {li.in_features} of {name}{more}: "
                           f"use {fix}")
    if fits:
        verdict.recommendations.append(f"group_size={fits[0]} divides every quantized linear of this model")
    rel = sorted({n.removeprefix(info.blocks_path + ".").split(".", 1)[1] for n, _, _ in bad})
    patterns = [f"*.{r}" for r in rel[:4]]
    if len(rel) <= 4:
        keep = f"keep them in float with ignore={json.dumps(patterns)}"
        verdict.recommendations.append(f"or {keep}" if fits else keep)


# ----------------------------------------------------------------------------------------------
# the matrix (data) and its rendering
# ----------------------------------------------------------------------------------------------
def installed_specs() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    reg = get_registry()
    return [reg.methods[n] for n in sorted(reg.methods)]


def _bits(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values)) if values else "-"


def matrix_rows(specs: list[MethodSpec] | None = None) -> list[dict[str, Any]]:
    """One row per (method, architecture family): the matrix as data."""
    specs = installed_specs() if specs is None else specs
    rows = []
    for spec in specs:
        caps = spec.capabilities
        for fam in archtable.FAMILIES:
            rows.append({
                "method": spec.name, "plugin": spec.distribution or spec.plugin, "kind": caps.kind,
                "family": fam.model_type, "supported": family_supported(spec, fam.model_type),
                "weight_bits": list(caps.weight_bits), "activation_bits": list(caps.activation_bits),
                "group_sizes": list(caps.group_sizes), "needs_calibration": caps.needs_calibration,
                "trains": caps.trains, "distributed": caps.distributed, "composes_with": list(caps.composes_with),
                "options": spec.config_cls.option_names(),
            })
    return rows


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and args:
        return " | ".join(_type_name(a) for a in args)
    return re.sub(r"\btyping\.", "", str(annotation)).replace("NoneType", "None")


def option_rows(spec: MethodSpec) -> list[dict[str, str]]:
    """option, type, default and doc of each option of ``spec``'s config."""
    rows = []
    for name in spec.config_cls.option_names():
        info = spec.config_cls.model_fields[name]
        default = info.get_default(call_default_factory=True)
        rows.append({"option": name, "type": _type_name(info.annotation),
                     "default": json.dumps(default, sort_keys=True, default=str),
                     "doc": " ".join((info.description or "").split())})
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(specs: list[MethodSpec] | None = None) -> str:
    """The compatibility matrix as Markdown (deterministic for a given set of methods)."""
    specs = installed_specs() if specs is None else sorted(specs, key=lambda s: s.name)
    out: list[str] = [
        "# Compatibility matrix",
        "",
        f"Generated from the registered methods' capabilities and `qcore.arch.table` by `{REGENERATE}`;",
        "do not edit by hand (`tests/test_compat.py` fails when this file is stale). `qcore compat`",
        "prints the same tables for the methods installed; `qcore.check(model, method, **options)` applies",
        "them to one model, and `qcore.quantize` runs that check first.",
        "",
        "## Methods",
        "",
        "| method | plugin | kind | weight bits | activation bits | group sizes | calibration | trains "
        "| torchrun | may be followed by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in specs:
        c = s.capabilities
        out.append(f"| `{s.name}` | {s.distribution or s.plugin} | {c.kind} | {_bits(c.weight_bits)} | "
                   f"{_bits(c.activation_bits)} | {_bits(c.group_sizes)} | "
                   f"{'needed' if c.needs_calibration else 'no'} | {'yes' if c.trains else 'no'} | "
                   f"{'yes' if c.distributed else 'no'} | {', '.join(c.composes_with) or '-'} |")
    out += ["", "Group size -1 means one scale per output channel. torchrun: the method shares the calibration "
            "windows over several processes (`Capabilities.distributed`).", ""]

    out += ["## Architectures", "",
            "`yes`: the method's `architectures` admit the family; every family is introspected by",
            "`qcore.arch.introspect` (tests build a tiny model of each from its config).", "",
            "| family (`model_type`) | " + " | ".join(f"`{s.name}`" for s in specs) + " | structure |",
            "|---|" + "---|" * len(specs) + "---|"]
    for fam in archtable.FAMILIES:
        cells = " | ".join("yes" if family_supported(s, fam.model_type) else "no" for s in specs)
        out.append(f"| {fam.display} (`{fam.model_type}`) | {cells} | {_cell(fam.notes)} |")
    out.append("")

    out += ["## Chains", "",
            "Row method first, then column method (`qcore.quantize(model, [row, column])`).", "",
            "| first \\ then | " + " | ".join(f"`{s.name}`" for s in specs) + " |",
            "|---|" + "---|" * len(specs)]
    for a in specs:
        out.append(f"| `{a.name}` | " + " | ".join("yes" if a.composes_before(b) else "-" for b in specs) + " |")
    out.append("")

    out += ["## Rules `qcore.check` applies", "",
            "- every option must be declared by the config of a method in the chain (unknown or invalid "
            "options are refused with the list of valid ones);",
            "- `bits`, activation bits and `group_size` must be among the method's capabilities above;",
            "- the model's `config.model_type` must match the method's architectures;",
            "- a positive `group_size` must divide `in_features` of every linear the method quantizes "
            "(ragged groups are not supported); linears matched by `ignore` and MoE routers (never "
            "quantized) are exempt. The refusal names the first offending linear and the group sizes "
            "that work;",
            "- each method of a chain must list the next one (or its kind) in `composes_with`;",
            "- the model must be a float model: a module of a type a checkpoint serializer stores "
            "(`QuantLinear`, ...), a layer of a quantization package (bitsandbytes, ...), an integer weight, "
            "a `qcore_record` or a `quantization_config` is refused (chain methods in one run instead), "
            "unless every method sets `Capabilities.takes_quantized`;",
            "- every weight must be finite (the refusal names the tensors); non-finite activations, "
            "statistics and quantization results are refused during the run, naming the module;",
            "- every block linear to be quantized must have a known role (attention or MLP projection): "
            "others (a state-space mixer, a custom layer) must be kept in float with `ignore`;",
            "- each `ignore` pattern and each pattern of a per-layer map must match a linear (patterns "
            "matching only never-quantized modules such as `lm_head` are accepted), and `ignore` must "
            "leave something to quantize;",
            "- a size budget (`budget_bits` or `budget_bytes`, below) needs a method that quantizes weights "
            "with `bits`; its candidate widths must be among that method's weight bits, an int `bits` must "
            "not be given with it, and the budget must be reachable on the model's layers (at least every "
            "layer at the narrowest candidate, scales and zero points included).", ""]

    sizes = sorted({g for s in specs for g in s.capabilities.group_sizes if g > 0}) or [32, 64, 128]
    out += ["## Group sizes for common shapes", "",
            "| model | in_features of its linears | positive group sizes that divide all |",
            "|---|---|---|"]
    for model, widths in archtable.KNOWN_SHAPES:
        fits = dividing_group_sizes(widths, tuple(sizes))
        out.append(f"| {model} | {', '.join(map(str, widths))} | "
                   f"{', '.join(map(str, sorted(fits))) or 'none: use -1 or ignore='} |")
    out.append("")

    out += ["## Options", ""]
    for s in specs:
        out += [f"### `{s.name}` ({s.config_cls.__name__})", "", _cell(s.summary), "",
                "| option | type | default | description |", "|---|---|---|---|"]
        for row in option_rows(s):
            out.append(f"| `{row['option']}` | `{_cell(row['type'])}` | `{_cell(row['default'])}` | "
                       f"{_cell(row['doc'])} |")
        for note in s.capabilities.notes:
            out.append("")
            out.append(f"Note: {_cell(note)}")
        out.append("")
    out += _budget_options()
    return "\n".join(out).rstrip("\n") + "\n"


def _budget_options() -> list[str]:
    """The size-budget keywords of ``qcore.quantize`` (mixed precision, every weight method)."""
    from qcore.pipeline.budget import BudgetConfig

    out = ["### Size budget (`qcore.quantize` keywords, every weight method)", "",
           "Mixed precision: per-layer widths chosen by sensitivity within the budget "
           "(`qcore.pipeline.budget`).", "",
           "| option | type | default | description |", "|---|---|---|---|"]
    for name, info in BudgetConfig.model_fields.items():
        default = json.dumps(info.get_default(call_default_factory=True), default=str)
        out.append(f"| `budget_{name}` | `{_cell(_type_name(info.annotation))}` | `{_cell(default)}` | "
                   f"{_cell(' '.join((info.description or '').split()))} |")
    out.append("")
    return out
