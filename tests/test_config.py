"""Method configs: pydantic, extra='forbid', JSON round trip with a version."""
from __future__ import annotations

import json

import pytest

from qcore.plugin.config import CONFIG_VERSION
from qcore.plugin.errors import ConfigError
from qcore.methods.rtn import RTNConfig


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig.from_options(bitz=4)
    msg = str(info.value)
    assert "bitz" in msg and "valid options" in msg and "group_size" in msg and "bits" in msg


def test_invalid_value_names_field() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        RTNConfig.from_options(group_size=0)
    with pytest.raises(ConfigError, match="bits"):
        RTNConfig.from_options(bits="four")


def test_json_round_trip_with_version() -> None:
    cfg = RTNConfig.from_options(bits=3, group_size=64, sym=True, ignore=["*.down_proj"])
    data = json.loads(cfg.to_json())
    assert data["method"] == "rtn" and data["config_version"] == CONFIG_VERSION
    assert RTNConfig.from_json_dict(data) == cfg


def test_newer_config_version_is_refused() -> None:
    data = RTNConfig().to_json_dict() | {"config_version": CONFIG_VERSION + 1}
    with pytest.raises(ConfigError, match="upgrade qcore"):
        RTNConfig.from_json_dict(data)


def test_assignment_is_validated() -> None:
    cfg = RTNConfig()
    with pytest.raises(Exception):
        cfg.group_size = -7
