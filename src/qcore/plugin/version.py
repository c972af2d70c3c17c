"""The contract's version, and the range a plugin declares it was built for. No torch import.

A plugin module sets ``QCORE_API = ">=1,<2"`` (comma-separated comparisons against
``major.minor``); a plugin whose range excludes :data:`API_VERSION`, or that declares none, is
reported by ``qcore plugins`` as incompatible, with the reason, and the others keep working.
"""
from __future__ import annotations

import re

API_VERSION = "1.0"
"""Version of ``qcore.plugin``: the major number changes when the contract breaks plugins."""
API_ATTRIBUTE = "QCORE_API"
"""Module attribute of a plugin holding the range of contract versions it supports."""

_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\d+)(?:\.(\d+))?\s*$")


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def unsupported_reason(declared: object, version: str = API_VERSION) -> str | None:
    """Why a plugin declaring ``declared`` cannot run on contract ``version`` (None when it can)."""
    if declared is None:
        return (f"declares no supported qcore.plugin version; set {API_ATTRIBUTE} = \">=1,<2\" in its plugin "
                "module once it is written against qcore.plugin")
    if not isinstance(declared, str) or not declared.strip():
        return f"{API_ATTRIBUTE} must be a string such as \">=1,<2\", got {declared!r}"
    have = _version(version)
    for clause in declared.split(","):
        m = _CLAUSE.match(clause)
        if not m:
            return f"cannot read {API_ATTRIBUTE} = {declared!r}; write comparisons such as \">=1,<2\""
        op, want = m.group(1), (int(m.group(2)), int(m.group(3) or 0))
        ok = {">=": have >= want, "<=": have <= want, "==": have == want, "!=": have != want,
              ">": have > want, "<": have < want}[op]
        if not ok:
            return (f"built for qcore.plugin {declared}, but this qcore provides {version}: install a "
                    "release of the plugin made for this qcore, or a qcore its range admits")
    return None
