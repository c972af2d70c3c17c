"""Method configuration base classes (pydantic, ``extra="forbid"``) and per-layer precision maps.

No torch import.

``bits`` and ``group_size`` of :class:`WeightQuantConfig` take one value for every linear or a
per-layer map of fnmatch patterns over full module names, e.g.
``{"default": 4, "*.mlp.down_proj": 6}``. A layer takes the value of the most specific matching
pattern (most non-wildcard characters; ties broken by the pattern's text), else ``"default"``.
"""
from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qcore.plugin.errors import ConfigError

CONFIG_VERSION = 1
DEFAULT_KEY = "default"
"""The entry of a per-layer map that applies to layers no pattern matches."""

PerLayer = Union[int, dict[str, int]]
"""One value for every layer, or a per-layer map (see the module docstring)."""


@dataclass(frozen=True)
class LayerPrecision:
    """What a weight method uses for one linear."""

    bits: int
    group_size: int
    sym: bool


def _specificity(pattern: str) -> tuple[int, str]:
    return (sum(ch not in "*?[]" for ch in pattern), pattern)


def layer_value(value: PerLayer, name: str) -> int:
    """The value of a per-layer setting for the linear named ``name`` (full module name)."""
    if not isinstance(value, dict):
        return int(value)
    matches = [p for p in value if p != DEFAULT_KEY and fnmatch.fnmatchcase(name, p)]
    if matches:
        return int(value[max(matches, key=_specificity)])
    return int(value[DEFAULT_KEY])


def layer_values(value: PerLayer | None) -> list[int]:
    """Every value a per-layer setting can take (sorted, unique; [] for None)."""
    if value is None:
        return []
    return sorted({int(v) for v in value.values()}) if isinstance(value, dict) else [int(value)]


def check_per_layer(value: PerLayer, ok: Callable[[int], bool], what: str) -> PerLayer:
    """Validate every value of a per-layer setting; a map needs a ``"default"`` entry."""
    if isinstance(value, dict):
        if DEFAULT_KEY not in value:
            raise ValueError(f"a per-layer map needs a '{DEFAULT_KEY}' entry, e.g. "
                             f'{{"default": 4, "*.mlp.down_proj": 6}}; got {json.dumps(value)}')
        bad = {k: v for k, v in value.items() if not ok(int(v))}
    else:
        bad = {} if ok(int(value)) else {"": value}
    if bad:
        shown = ", ".join(f"{k}: {v}" if k else str(v) for k, v in bad.items())
        raise ValueError(f"{what} (got {shown})")
    return value


class QuantConfig(BaseModel):
    """Base of every method's options. A typo is an error; configs round-trip through JSON.

    Field docs are the attribute docstrings (``x: int = 1`` then a string): pydantic reads them
    into each field's ``description``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    method: ClassVar[str] = ""
    config_version: int = CONFIG_VERSION
    ignore: list[str] = []
    """fnmatch patterns of module names to leave in float (lm_head is never quantized)."""

    @classmethod
    def from_options(cls, **options: Any) -> QuantConfig:
        """Build from keyword options, with an error that lists the valid options."""
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for method '{cls.method or cls.__name__}'; "
                f"valid options: {', '.join(cls.option_names())}"
            )
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None

    @classmethod
    def option_names(cls) -> list[str]:
        return [n for n in cls.model_fields if n != "config_version"]

    def to_json_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.model_dump(mode="json")}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        version = data.get("config_version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"config_version {version} of '{cls.method}' is newer than this qcore understands "
                f"({CONFIG_VERSION}); upgrade qcore and the plugin"
            )
        return cls.from_options(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), sort_keys=True)

    def ignores(self, name: str) -> bool:
        """Whether the full module name ``name`` matches one of the ``ignore`` patterns."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.ignore)


class WeightQuantConfig(QuantConfig):
    """Shared options of methods that quantize weights to an integer grid."""

    bits: PerLayer = 4
    """Weight bits: one width, or a per-layer map such as {"default": 4, "*.mlp.down_proj": 6}."""
    group_size: PerLayer = 128
    """Input columns per scale; -1 means one scale per output channel. A per-layer map works as for bits."""
    sym: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, lambda g: g == -1 or g > 0,
                               "group_size must be -1 (per channel) or a positive integer such as 32, 64 or 128")

    @field_validator("bits")
    @classmethod
    def _bits_map(cls, v: PerLayer) -> PerLayer:
        return check_per_layer(v, lambda b: b > 0, "bits must be positive")

    def precision(self, name: str) -> LayerPrecision:
        """Bits, group size and symmetry of the linear named ``name`` (full module name)."""
        return LayerPrecision(layer_value(self.bits, name), layer_value(self.group_size, name), self.sym)

    def bit_widths(self) -> list[int]:
        """Every bit width this config may use."""
        return layer_values(self.bits)

    def group_sizes(self) -> list[int]:
        """Every group size this config may use."""
        return layer_values(self.group_size)


def allowed(values: Iterable[int]) -> Callable[[int], bool]:
    """A predicate for :func:`check_per_layer`: the value is one of ``values``."""
    options = frozenset(values)
    return lambda v: v in options


def _describe(cls: type[QuantConfig], exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return (
        f"invalid option for method '{cls.method or cls.__name__}': {'; '.join(parts)}; "
        f"valid options: {', '.join(cls.option_names())}"
    )
