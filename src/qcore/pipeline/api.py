"""The Python API: ``qcore.quantize`` and ``qcore.finetune``."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qcore.plugin.config import QuantConfig
from qcore.plugin.errors import CalibrationError, CompatibilityError, ConfigError
from qcore.progress import get_logger
from qcore.registry import get_method
from qcore.plugin.spec import MethodSpec

log = get_logger("api")


def quantize(
    model: nn.Module,
    method: str | Sequence[str],
    *,
    config: QuantConfig | Sequence[QuantConfig] | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    propagate: str = "quantized",
    device: str | torch.device | None = None,
    check: bool = True,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place with one method or a chain, and return it.

    ``method`` is a name (``"gptq"``) or a chain (``["smoothquant", "gptq"]``: a transform, then
    a weight method, in one pass over the calibration data). Options go to every method in the
    chain whose config declares them; ``config=`` passes ready config objects instead.
    ``calibration`` is anything :func:`qcore.data.get_calibration` takes (texts, a file, a
    ``CalibrationData``, ``None`` for the default corpus); it is used only when a method needs it.
    """
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise ConfigError("no method given; pass a name such as 'rtn' or a chain such as ['awq', 'gptq']")
    specs = [get_method(n) for n in names]
    configs = build_configs(specs, config, options)
    check_chain(specs)
    if check:
        from qcore.compat import check as check_model

        merged = {k: v for cfg in configs for k, v in cfg.model_dump().items() if k != "config_version"}
        check_model(model, names if len(names) > 1 else names[0], **merged).raise_if_failed()

    calib = None
    if any(s.capabilities.needs_calibration for s in specs):
        calib = _calibration(model, calibration, tokenizer, n_samples, seq_len, seed, names)

    quantizers = [spec.load_quantizer()(cfg, spec) for spec, cfg in zip(specs, configs)]
    from qcore.pipeline.engine import run_chain

    start = time.perf_counter()
    run = run_chain(model, quantizers, calibration=calib, propagate=propagate, device=device)
    elapsed = time.perf_counter() - start
    _attach_record(model, specs, run, elapsed)
    log.info("quantized with %s in %.1f s", " + ".join(names), elapsed)
    return model


def build_configs(specs: list[MethodSpec], config: Any, options: dict[str, Any]) -> list[QuantConfig]:
    """One config per method, from ready objects or from keyword options."""
    if config is not None:
        if options:
            raise ConfigError(f"pass either config= or options ({', '.join(sorted(options))}), not both")
        configs = [config] if isinstance(config, QuantConfig) else list(config)
        if len(configs) != len(specs):
            raise ConfigError(f"{len(specs)} method(s) but {len(configs)} config(s): give one config per method")
        for spec, cfg in zip(specs, configs):
            if not isinstance(cfg, spec.config_cls):
                raise ConfigError(f"method '{spec.name}' takes a {spec.config_cls.__name__}, "
                                  f"got {type(cfg).__name__}")
        return configs
    if len(specs) == 1:
        return [specs[0].config_cls.from_options(**options)]
    used: set[str] = set()
    configs = []
    for spec in specs:
        fields = set(spec.config_cls.option_names())
        mine = {k: v for k, v in options.items() if k in fields}
        used |= set(mine)
        configs.append(spec.config_cls.from_options(**mine))
    unknown = sorted(set(options) - used)
    if unknown:
        valid = {s.name: s.config_cls.option_names() for s in specs}
        listing = "; ".join(f"{n}: {', '.join(v)}" for n, v in valid.items())
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for chain "
                          f"{' + '.join(s.name for s in specs)}; valid options: {listing}")
    return configs


def check_chain(specs: list[MethodSpec]) -> None:
    """Refuse chains whose order the methods do not allow."""
    for first, second in zip(specs, specs[1:]):
        if not first.composes_before(second):
            allowed = ", ".join(first.capabilities.composes_with) or "nothing"
            raise CompatibilityError(
                f"'{second.name}' cannot follow '{first.name}' in a chain ('{first.name}' composes with: "
                f"{allowed}); reorder the chain or quantize with one method"
            )


def _calibration(model: nn.Module, source: Any, tokenizer: Any, n_samples: int, seq_len: int,
                 seed: int, names: list[str]) -> Any:
    from qcore.data import CalibrationData, get_calibration

    if isinstance(source, CalibrationData):
        return source
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "qcore_tokenizer", None)
    if tokenizer is None:
        raise CalibrationError(
            f"{' + '.join(names)} needs calibration data: pass tokenizer=... (with calibration= texts "
            "or a file, or nothing for the default corpus), or calibration=CalibrationData(...)"
        )
    return get_calibration(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)


def _attach_record(model: nn.Module, specs: list[MethodSpec], run: Any, elapsed: float) -> None:
    """Complete the record the engine keeps in ``model.qcore_record`` (saved with checkpoints)."""
    record = model.qcore_record
    for entry, spec in zip(record["chain"][-len(specs):], specs):
        entry["distribution"] = spec.distribution
    record["seconds"] = round(record.get("seconds", 0.0) + elapsed, 3)


def finetune(model: nn.Module, data: Any, **kwargs: Any) -> Any:
    """Train the adapters of a model quantized with an adapter method (e.g. ``qlora``).

    Dispatches to the adapter method's quantizer ``finetune`` so that the core knows no method.
    """
    record = getattr(model, "qcore_record", None) or {}
    for entry in reversed(record.get("chain", [])):
        spec = get_method(entry["method"])
        if spec.capabilities.kind == "adapter":
            cls = spec.load_quantizer()
            if not hasattr(cls, "finetune"):
                break
            cfg = spec.config_cls.from_json_dict(entry["config"])
            return cls(cfg, spec).finetune(model, data, **kwargs)
    raise ConfigError("finetune needs a model quantized with an adapter method: run "
                      "qcore.quantize(model, 'qlora', ...) first")
