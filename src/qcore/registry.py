"""Plugin discovery (pluggy, entry-point group ``qcore``) and the method registry.

Each entry point names a module that implements :mod:`qcore.plugin.hookspecs`. A plugin that fails to
import or register is recorded with its error; the others keep working. Set
``QCORE_DISABLE_PLUGINS=name1,name2`` to skip plugins by entry-point name.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import pluggy

from qcore.plugin import hookspecs
from qcore.plugin.errors import PluginLoadError, UnknownMethodError
from qcore.plugin.spec import MethodSpec

ENTRY_POINT_GROUP = "qcore"
DISABLE_ENV = "QCORE_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    """What ``qcore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    status: str  # "ok", "failed" or "disabled"
    error: str = ""
    methods: list[str] = field(default_factory=list)
    traceback: str = ""


class Registry:
    """Loaded plugins and the methods they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.methods: dict[str, MethodSpec] = {}

    # -- loading -------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.plugins:
                continue
            dist = ep.dist.name if ep.dist else ""
            version = ep.dist.version if ep.dist else ""
            if ep.name in disabled:
                self.plugins[ep.name] = PluginInfo(ep.name, dist, version, "disabled",
                                                   f"disabled by {DISABLE_ENV}")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                self._failed(ep.name, dist, version, exc)
                continue
            self.register_plugin(module, ep.name, dist, version)

    def register_plugin(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin object (module or instance) and collect its methods."""
        info = PluginInfo(name, distribution, version, "ok")
        self.plugins[name] = info
        collected: list[MethodSpec] = []

        def register(spec: MethodSpec) -> None:
            if not isinstance(spec, MethodSpec):
                raise TypeError(f"register() takes a qcore.MethodSpec, got {type(spec).__name__}")
            collected.append(spec)

        try:
            self.pm.register(plugin, name=name)
            impl = [i for i in self.pm.hook.qcore_register_methods.get_hookimpls() if i.plugin is plugin]
            for hook_impl in impl:
                hook_impl.function(register=register)
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._failed(name, distribution, version, exc)
            return
        for spec in collected:
            if spec.name in self.methods:
                other = self.methods[spec.name].plugin
                self._failed(name, distribution, version,
                             ValueError(f"method '{spec.name}' is already registered by plugin '{other}'"))
                return
        for spec in collected:
            self.methods[spec.name] = replace(spec, plugin=name, distribution=distribution, version=version)
            info.methods.append(spec.name)

    def _failed(self, name: str, dist: str, version: str, exc: BaseException) -> None:
        self.plugins[name] = PluginInfo(
            name, dist, version, "failed", f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        )

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str) -> MethodSpec:
        if name in self.methods:
            return self.methods[name]
        broken = self.plugins.get(name)
        if broken is not None and broken.status != "ok":
            raise PluginLoadError(
                f"method '{name}' is unavailable: plugin '{broken.name}' "
                f"({broken.distribution or 'unknown distribution'}) {broken.status}: {broken.error}. "
                + ("Unset it in " + DISABLE_ENV if broken.status == "disabled"
                   else "Reinstall or fix that plugin; run 'qcore plugins' for details")
            )
        known = ", ".join(sorted(self.methods)) or "none"
        raise UnknownMethodError(
            f"unknown method '{name}'; installed methods: {known}. "
            f"Install its plugin (pip install qcore-{name}) or run 'qcore list'"
        )


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
        _REGISTRY.load_entry_points()
    return _REGISTRY


def get_method(name: str) -> MethodSpec:
    return get_registry().get(name)


def list_methods() -> dict[str, str]:
    """Method name -> one-line summary, for every loaded method (imports no torch)."""
    reg = get_registry()
    return {name: reg.methods[name].summary for name in sorted(reg.methods)}


def list_plugins() -> list[PluginInfo]:
    return sorted(get_registry().plugins.values(), key=lambda p: p.name)
