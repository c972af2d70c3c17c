"""Method configuration base classes (pydantic, extra='forbid'). No torch import."""
from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qcore.plugin.errors import ConfigError

CONFIG_VERSION = 1


class QuantConfig(BaseModel):
    """Base of every method's options. A typo is an error; configs round-trip through JSON."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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


class WeightQuantConfig(QuantConfig):
    """Shared options of methods that quantize weights to an integer grid."""

    bits: int = 4
    group_size: int = 128
    """Input columns per scale; -1 means one scale per output channel."""
    sym: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be -1 (per channel) or a positive integer such as 32, 64 or 128")
        return v


def _describe(cls: type[QuantConfig], exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return (
        f"invalid option for method '{cls.method or cls.__name__}': {'; '.join(parts)}; "
        f"valid options: {', '.join(cls.option_names())}"
    )
