"""What a run is given, checked before the slow work, for every method alike.

* the model: already quantized (:func:`quantized_parts`), not understood by the introspection
  (:func:`structure_problems`), non-finite weights (:func:`nonfinite_tensors`);
* the ``ignore`` patterns against the model's module names (:func:`ignore_problems`);
* the run's own options (:func:`check_run_options`, :func:`check_seq_len`, :func:`check_device`)
  and the token ids read (:func:`check_token_ids`: a tokenizer of another model).

``qcore.check`` reports the model problems as reasons (:func:`model_problems`) and
``qcore.quantize`` refuses with them. Non-finite activations and statistics are caught during
the pass by the engine (:func:`first_nonfinite`). Importing this module does not import torch.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.plugin.config import DEFAULT_KEY
from qcore.plugin.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from qcore.arch.introspect import ModelInfo
    from qcore.plugin.config import QuantConfig
    from qcore.plugin.spec import MethodSpec

QUANTIZATION_PACKAGES: tuple[str, ...] = (
    "bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum.quanto", "quanto", "torchao",
    "compressed_tensors", "eetq", "aqlm", "fbgemm_gpu",
)
"""Packages whose layer classes hold quantized weights (bitsandbytes' ``Linear4bit``, ...)."""
POSITION_ATTRS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "max_sequence_length",
                                   "n_ctx", "seq_length")
"""Config fields giving the number of positions a model was built for, read in this order."""
DEFAULT_SEQ_LEN = 512
"""Calibration window length when none is given (capped at the model's positions)."""
SHOWN = 4
"""How many names an error lists before '... and N more'."""
CHAIN_HINT = ("quantize the float model instead; to chain methods, give them all in one run: "
              "method=['smoothquant', 'gptq']")


@dataclass
class ModelProblem:
    """One reason the model cannot be quantized as given, and the fix."""

    reason: str
    fix: str = ""
    option: bool = False
    """True when an option (a pattern) is what is wrong."""


def _names(names: Sequence[str], shown: int = SHOWN) -> str:
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ----------------------------------------------------------------------------------------------
# already quantized
# ----------------------------------------------------------------------------------------------
def _package(cls: type) -> str:
    module = getattr(cls, "__module__", "") or ""
    return next((p for p in QUANTIZATION_PACKAGES if module == p or module.startswith(p + ".")), "")


def quantized_parts(model: nn.Module) -> list[str]:
    """What shows that ``model`` was quantized before, one description each (empty for a float model).

    Found generally, not per method: a module of a type that a registered checkpoint serializer
    stores (``QuantLinear``, a plugin's layers), a layer class of a quantization package
    (:data:`QUANTIZATION_PACKAGES`), a linear whose weight is not floating point, a
    ``qcore_record`` listing methods, or a ``quantization_config`` in the model's config.
    """
    from torch import nn

    from qcore.checkpoint.serializers import serializers

    found: list[str] = []
    types = {s.module_type: name for name, s in serializers().items()}
    layers: dict[str, list[str]] = {}  # what kind -> module names
    for name, module in model.named_modules():
        cls = type(module)
        if cls in types:
            kind = f"{cls.__name__} ({types[cls]})"
        elif _package(cls):
            kind = f"{_package(cls)} {cls.__name__}"
        elif hasattr(module, "in_features") and not isinstance(module, nn.Embedding):
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(weight, "dtype") or weight.dtype.is_floating_point:
                continue
            kind = f"{cls.__name__} with {str(weight.dtype).removeprefix('torch.')} weights"
        else:
            continue
        layers.setdefault(kind, []).append(name)
    for kind, names in layers.items():
        found.append(f"{len(names)} {kind} layer{'s' if len(names) > 1 else ''} ({_names(names, 2)})")
    record = getattr(model, "qcore_record", None)
    if isinstance(record, dict) and record.get("chain"):
        methods = " + ".join(str(e.get("method", "?")) for e in record["chain"])
        found.append(f"its qcore record lists {methods}")
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is not None:
        qcfg = qcfg if isinstance(qcfg, dict) else getattr(qcfg, "to_dict", lambda: {})()
        method = qcfg.get("quant_method") or qcfg.get("format") or "unknown method"
        found.append(f"its config has a quantization_config ({method})")
    return found


def quantized_problem(model: nn.Module, specs: Sequence[MethodSpec]) -> ModelProblem | None:
    """The refusal for a model that is already quantized, unless every method takes one."""
    if all(s.capabilities.takes_quantized for s in specs):
        return None
    found = quantized_parts(model)
    if not found:
        return None
    return ModelProblem(f"the model is already quantized: {'; '.join(found)}", CHAIN_HINT)


# ----------------------------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------------------------
def count_nonfinite(t: Any) -> tuple[int, int]:
    """(NaN count, infinite count) of a floating tensor; (0, 0) for anything else."""
    import torch

    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta":
        return 0, 0
    if bool(torch.isfinite(t).all()):
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe_counts(nan: int, inf: int) -> str:
    return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if p)


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """``"name (n NaN, m inf)"`` of every parameter and buffer holding a non-finite value."""
    out = []
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        nan, inf = count_nonfinite(t)
        if nan or inf:
            out.append(f"{name} ({describe_counts(nan, inf)})")
    return out


def nonfinite_problem(model: nn.Module) -> ModelProblem | None:
    bad = nonfinite_tensors(model)
    if not bad:
        return None
    return ModelProblem(f"non-finite values in the model's weights: {_names(bad)}",
                        "the float model itself is broken (a failed conversion, download or training run): "
                        "repair or re-download it; quantizing cannot make these values finite")


def first_nonfinite(value: Any, path: str = "") -> tuple[str, str] | None:
    """``(where, "n NaN, m inf")`` of the first non-finite tensor in ``value`` (a tensor, or
    dicts, lists and tuples of them), or None when all are finite."""
    nan, inf = count_nonfinite(value)
    if nan or inf:
        return path, describe_counts(nan, inf)
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_nonfinite(item, f"{path}[{key}]" if isinstance(value, (list, tuple))
                                else f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------------------------
# structure and ignore patterns
# ----------------------------------------------------------------------------------------------
def _ignored(name: str, configs: Sequence[QuantConfig]) -> bool:
    return any(c.ignores(name) for c in configs)


def structure_problems(info: ModelInfo, configs: Sequence[QuantConfig]) -> list[ModelProblem]:
    """Linears whose role the introspection does not know (``other``) and that would be quantized.

    qcore understands transformer blocks (attention q/k/v/o, gated or plain MLPs, MoE experts and
    routers). A block linear of no known role (a state-space mixer's ``in_proj``, a custom
    module's layers) may be used in ways a quantized layer does not support (its weight read
    directly), so such a model is refused unless those linears are kept in float."""
    from qcore.arch import table

    unknown = [name for name, li in info.linear_infos()
               if li.quantize and li.role.removeprefix(table.EXPERT_PREFIX) == "other"
               and not _ignored(name, configs)]
    if not unknown:
        return []
    rel = sorted({n.removeprefix(info.blocks_path + ".").split(".", 1)[-1] for n in unknown})
    patterns = " ".join(f"'*.{r}'" for r in rel[:SHOWN])
    return [ModelProblem(
        f"architecture '{info.family}' is not understood by qcore's introspection: {len(unknown)} block "
        f"linear(s) have no known role ({_names(unknown)}); qcore knows transformer blocks (attention "
        "q/k/v/o and MLP projections), and a layer of another kind may be used in ways a quantized "
        "layer does not support",
        f"keep them in float with ignore={json.dumps(['*.' + r for r in rel[:SHOWN]])} (--ignore {patterns}) "
        "if the model calls them only as layers, or add their names to qcore.arch.table (LEAF_ROLES, "
        "PATH_ROLES) if they are attention or MLP projections")]


def ignore_problems(model: nn.Module | None, info: ModelInfo, configs: Sequence[QuantConfig]) -> list[ModelProblem]:
    """``ignore`` patterns that match no module, or only modules holding quantizable linears
    without matching the linears themselves, and patterns that leave nothing to quantize."""
    problems: list[ModelProblem] = []
    linears = [name for name, li in info.linear_infos() if li.quantize]
    modules = [n for n, _ in model.named_modules() if n] if model is not None else linears
    patterns = list(dict.fromkeys(p for c in configs for p in c.ignore))
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            continue
        hits = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        holders = [n for n in hits if any(lin.startswith(n + ".") for lin in linears)]
        if hits and not holders:
            continue  # lm_head, embeddings, norms, routers: never quantized anyway
        if holders:
            problems.append(ModelProblem(
                f"ignore pattern '{pattern}' matches {_names(holders)}, which hold linears, but no linear "
                "itself (patterns match the full names of linear layers)",
                f"use '{pattern}.*' to keep every linear inside in float", option=True))
            continue
        generic = sorted({"*." + n.removeprefix(info.blocks_path + ".").split(".", 1)[-1] for n in linears})
        close = difflib.get_close_matches(pattern, list(dict.fromkeys(generic + modules)), n=3, cutoff=0.5)
        example = linears[0] if linears else ""
        problems.append(ModelProblem(
            f"ignore pattern '{pattern}' matches no module of this model"
            + (f" (close names: {', '.join(close)})" if close else ""),
            f"patterns are fnmatch patterns over full module names such as '{example}' "
            f"(e.g. '*.{example.rsplit('.', 1)[-1]}' for that linear in every block)" if example else "",
            option=True))
    for cfg in configs:
        for field_name in type(cfg).model_fields:
            value = getattr(cfg, field_name)
            if not isinstance(value, dict) or DEFAULT_KEY not in value:
                continue
            for pattern in value:
                if pattern != DEFAULT_KEY and not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
                    generic = sorted({"*." + n.removeprefix(info.blocks_path + ".").split(".", 1)[-1]
                                      for n in linears})
                    close = difflib.get_close_matches(pattern, generic + linears, n=3, cutoff=0.5)
                    problems.append(ModelProblem(
                        f"{field_name} pattern '{pattern}' matches no quantizable linear of this model"
                        + (f" (close names: {', '.join(close)})" if close else ""),
                        f"patterns are fnmatch patterns over full linear names such as '{linears[0]}'"
                        if linears else "", option=True))
    for cfg in configs:
        if cfg.ignore and linears and all(cfg.ignores(n) for n in linears):
            problems.append(ModelProblem(
                f"ignore={json.dumps(cfg.ignore)} keeps all {len(linears)} quantizable linears in float: nothing is left "
                f"to quantize with {cfg.method or type(cfg).__name__}",
                "narrow the patterns (or save the float model as it is)", option=True))
            break
    return problems


def model_problems(model: nn.Module | None, info: ModelInfo | None, specs: Sequence[MethodSpec],
                   configs: Sequence[QuantConfig]) -> list[ModelProblem]:
    """Why the (float) model cannot be quantized by this chain as given: non-finite weights, an
    architecture the introspection does not understand, ``ignore`` and per-layer patterns that
    match nothing or leave nothing. An already quantized model is :func:`quantized_problem`'s."""
    problems: list[ModelProblem] = []
    if model is not None:
        nonfinite = nonfinite_problem(model)
        if nonfinite is not None:
            problems.append(nonfinite)
    if info is not None:
        problems += structure_problems(info, configs)
        problems += ignore_problems(model, info, configs)
    return problems


# ----------------------------------------------------------------------------------------------
# the run's own options
# ----------------------------------------------------------------------------------------------
def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``; a bool, a fraction or a smaller number is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            not isinstance(value, numbers.Integral) and not float(value).is_integer()):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number, got {value!r} (a float); write {int(value)}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_run_options(n_samples: Any, seq_len: Any, seed: Any) -> None:
    """``n_samples``, ``seq_len`` (None: the default) and ``seed`` of ``qcore.quantize``."""
    positive_int(n_samples, "n_samples")
    if seq_len is not None:
        positive_int(seq_len, "seq_len")
    positive_int(seed, "seed", minimum=0)


def max_positions(model: Any) -> tuple[int, str] | None:
    """(positions, config field) the model was built for, or None when its config does not say."""
    config = getattr(model, "config", None)
    for attr in POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, attr
    return None


def check_seq_len(model: Any, seq_len: int | None, what: str = "seq_len") -> int:
    """``seq_len`` checked against the model's positions; None gives the default, capped there."""
    limit = max_positions(model)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit[0]) if limit else DEFAULT_SEQ_LEN
    if limit is not None and seq_len > limit[0]:
        raise ConfigError(f"{what}={seq_len} is longer than the {limit[0]} positions this model was built for "
                          f"(config {limit[1]}); use {what}={limit[0]} or less")
    return seq_len


def vocab_rows(model: Any) -> int | None:
    """Rows of the model's input embedding (the token ids it can read), or None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embed = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        embed = None
    rows = getattr(embed, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(model: Any, ids: Any, what: str = "the calibration text") -> None:
    """Token ids the model can embed: a tokenizer of another model gives ids past its vocabulary."""
    rows = vocab_rows(model)
    if rows is None or ids.numel() == 0:
        return
    top, low = int(ids.max()), int(ids.min())
    if top >= rows or low < 0:
        bad = top if top >= rows else low
        raise ConfigError(f"{what} holds token id {bad}, but the model's embedding has {rows} rows (ids 0 to "
                          f"{rows - 1}): the tokenizer belongs to another model; pass this model's own "
                          "tokenizer (tokenizer=...)")


def check_device(device: Any) -> None:
    """A device this torch can use (``"cuda"`` on a CPU-only build is refused here, not mid-run)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from None
    build = f"this torch {torch.__version__}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no usable CUDA GPU"
            raise ConfigError(f"device={device!r} cannot be used: {build} {why}; use device='cpu' (or install a "
                              "CUDA build of torch on a machine with a GPU)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device={device!r} cannot be used: {count} CUDA GPU(s) visible "
                              f"(cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device={device!r} cannot be used: {build} has no usable MPS backend; use device='cpu'")
    elif dev.type not in ("cpu", "meta"):
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", None)
        if not callable(available) or not available():
            raise ConfigError(f"device={device!r} cannot be used by {build}; use device='cpu'")
    if dev.type == "meta":
        raise ConfigError("device='meta' holds no data; use cpu or cuda")
