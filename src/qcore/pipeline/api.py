"""The Python API: ``qcore.quantize`` and ``qcore.finetune``."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qcore.plugin.config import QuantConfig
from qcore.plugin.errors import CalibrationError, CompatibilityError, ConfigError
from qcore.plugin.protocol import Propagation, Trainer
from qcore.plugin.spec import MethodSpec
from qcore.progress import get_logger
from qcore.registry import get_method

log = get_logger("api")


def quantize(
    model: nn.Module | str | os.PathLike[str],
    method: str | Sequence[str],
    *,
    config: QuantConfig | Sequence[QuantConfig] | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    propagate: Propagation | None = None,
    device: str | torch.device | None = None,
    check: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    restart: bool = False,
    **options: Any,
) -> Any:
    """Quantize ``model`` in place with one method or a chain, and return it.

    ``method`` is a name (``"gptq"``) or a chain (``["smoothquant", "gptq"]``: a transform, then
    a weight method, in one pass over the calibration data). Options go to every method in the
    chain whose config declares them; ``config=`` passes ready config objects instead (see
    :func:`qcore.pipeline.chain.resolve_chain`, which ``qcore.check`` uses too). ``calibration``
    is anything :func:`qcore.data.get_calibration` takes (texts, a file, a ``CalibrationData``,
    ``None`` for the default corpus); it is used only when a method needs it. ``propagate``:
    ``"quantized"`` (default) or ``"float"`` inputs for each next block. ``seq_len``: calibration
    window length (None: 512, or the model's positions when fewer; longer is refused).

    Refused before any slow work (:mod:`qcore.pipeline.validate`): an already quantized model
    (unless every method declares ``Capabilities.takes_quantized``), non-finite weights, an
    architecture the introspection does not understand, ``ignore`` patterns that match nothing or
    leave nothing, counts that are not positive whole numbers, a device this torch cannot use.

    Mixed precision: ``budget_bits=3.5`` (average bits per weight, scales and zero points
    included) or ``budget_bytes=...``, with ``budget_candidates=[2, 3, 4, 8]`` and
    ``budget_criterion="hessian" | "fisher"``, measures each layer's sensitivity on the
    calibration text and gives the weight method a per-layer ``bits`` map that fits the budget
    (:mod:`qcore.pipeline.budget`; it needs calibration data even for ``rtn``).

    Models larger than memory: pass the folder of a float safetensors checkpoint as ``model`` and
    the output folder as ``out``: the model is never loaded whole, each block is read from the
    shards on its turn and written when done (:mod:`qcore.pipeline.stream`); returns the path of
    the checkpoint. An interrupted run resumes when called again with the same arguments
    (``restart=True`` starts over); ``overwrite`` replaces an earlier qcore output at ``out``.
    """
    if isinstance(model, (str, os.PathLike)):
        if out is None:
            raise ConfigError(f"quantizing the folder {model} streams it into a checkpoint: pass out=OUTPUT_FOLDER "
                              "(or load the model first and pass the model)")
        from qcore.pipeline.stream import quantize_streaming

        return quantize_streaming(model, method, out=out, config=config, calibration=calibration,
                                  tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                  propagate=propagate, device=device, overwrite=overwrite, restart=restart,
                                  **options)
    if out is not None or overwrite or restart:
        raise ConfigError("out=, overwrite= and restart= belong to streamed runs (model given as a folder); "
                          "save an in-memory model with qcore.save(model, path)")
    from qcore.pipeline import validate
    from qcore.pipeline.budget import split_budget
    from qcore.pipeline.chain import resolve_chain

    validate.check_run_options(n_samples, seq_len, seed)
    validate.check_device(device)
    budget = split_budget(options)
    chain = resolve_chain(method, config, options)
    if budget is not None:
        from qcore.pipeline.budget import budget_problems

        chain.problems += budget_problems(chain, budget)
    if check:
        from qcore.compat import check_chain

        check_chain(model, chain).raise_if_failed()
    else:
        chain.raise_if_failed()
        quantized = validate.quantized_problem(model, chain.specs)
        if quantized is not None:
            raise CompatibilityError(f"{quantized.reason}; {quantized.fix}")
    plan = None
    if budget is not None:  # layers, widths and feasibility before any slow work
        from qcore.arch.introspect import inspect_model
        from qcore.pipeline.budget import make_plan

        plan = make_plan(inspect_model(model), chain, budget)
    specs, configs = chain.specs, chain.ready_configs()
    calib = None
    if plan is not None or any(s.capabilities.needs_calibration for s in specs):
        names = chain.names if plan is None else [*chain.names, "a size budget"]
        calib = _calibration(model, calibration, tokenizer, n_samples, seq_len, seed, names)
    allocation = None
    if plan is not None:
        from qcore.pipeline.budget import allocate_bits, apply_allocation

        allocation = allocate_bits(model, plan, calib, device=device)
        apply_allocation(chain, allocation)

    quantizers = [spec.load_quantizer()(cfg, spec) for spec, cfg in zip(specs, configs)]
    from qcore.pipeline.engine import run_chain

    start = time.perf_counter()
    run = run_chain(model, quantizers, calibration=calib, propagate=propagate, device=device)
    elapsed = time.perf_counter() - start
    _attach_record(model, specs, run, elapsed)
    if allocation is not None:
        model.qcore_record["budget"] = allocation.record
    log.info("quantized with %s in %.1f s", " + ".join(chain.names), elapsed)
    return model


def _calibration(model: nn.Module, source: Any, tokenizer: Any, n_samples: int, seq_len: int | None,
                 seed: int, names: list[str]) -> Any:
    from qcore.data import CalibrationData, get_calibration
    from qcore.pipeline.validate import check_seq_len, check_token_ids

    if isinstance(source, (CalibrationData, torch.Tensor)):
        if isinstance(source, torch.Tensor):  # token ids [n, seq_len], as run_chain takes them
            from qcore.pipeline.engine import _as_calibration

            source = _as_calibration(source)
        check_seq_len(model, source.seq_len, "the calibration windows' seq_len")
        check_token_ids(model, source.input_ids, "the calibration data")
        return source
    seq_len = check_seq_len(model, seq_len)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "qcore_tokenizer", None)
    if tokenizer is None:
        raise CalibrationError(
            f"{' + '.join(names)} needs calibration data: pass tokenizer=... (with calibration= texts "
            "or a file, or nothing for the default corpus), or calibration=CalibrationData(...)"
        )
    calib = get_calibration(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    check_token_ids(model, calib.input_ids)
    return calib


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
        if spec.capabilities.trains:
            quantizer = spec.load_quantizer()(spec.config_cls.from_json_dict(entry["config"]), spec)
            if not isinstance(quantizer, Trainer):
                raise ConfigError(f"method '{spec.name}' declares trains=True but its quantizer has no "
                                  "finetune(model, data, ...); fix the plugin")
            return quantizer.finetune(model, data, **kwargs)
    raise ConfigError("finetune needs a model quantized with an adapter method: run "
                      "qcore.quantize(model, 'qlora', ...) first")
