"""Plugin discovery (pluggy, entry-point group ``qcore``) and the registries it fills.

Each entry point names a module that implements :mod:`qcore.plugin.hookspecs` and declares the
contract versions it supports (``QCORE_API``). A plugin that fails to import, is built for another
contract, or raises in a hook is recorded with its error; the others keep working. Set
``QCORE_DISABLE_PLUGINS=name1,name2`` to skip plugins by entry-point name.

Methods are collected when the registry loads (cheap, no torch); observers, serializers and kernel
backends when first asked for (:meth:`Registry.extensions`).
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib import metadata
from typing import Any

import pluggy

from qcore.plugin import hookspecs
from qcore.plugin.errors import PluginLoadError, UnknownMethodError
from qcore.plugin.spec import RESERVED_OPTIONS, MethodSpec
from qcore.plugin.version import API_ATTRIBUTE, unsupported_reason

ENTRY_POINT_GROUP = "qcore"
DISABLE_ENV = "QCORE_DISABLE_PLUGINS"
CORE_DISTRIBUTION = "qcore-quant"
"""qcore's distribution on the package index (imported as ``qcore``; the index's ``qcore`` is an
unrelated project)."""
FIRST_PARTY_DISTRIBUTIONS: dict[str, str] = {
    "rtn": CORE_DISTRIBUTION,
    "gptq": "qcore-quant-gptq",
    "awq": "qcore-quant-awq",
    "hqq": "qcore-quant-hqq",
    "smoothquant": "qcore-quant-smoothquant",
    "qlora": "qcore-quant-qlora",
    "quarot": "qcore-quant-quarot",
    "adaround": "qcore-quant-adaround",
    "brecq": "qcore-quant-brecq",
}
"""Each method of qcore's own plugins -> the distribution that provides it: the only packages
qcore's messages suggest installing (a name the user typed is never turned into a package name)."""


def install_hint(method: str) -> str:
    """What to do about a method that is not installed: the pip command for a first-party method,
    else where to look (no package name is guessed)."""
    dist = FIRST_PARTY_DISTRIBUTIONS.get(method)
    if dist is not None:
        return f"install its plugin with: pip install {dist}"
    return ("no qcore plugin of that name is known: check the spelling against 'qcore list', "
            "'qcore plugins' shows what is installed, and a third-party plugin's own documentation names its package")


def known_distribution(dist: str) -> bool:
    """Whether ``dist`` is qcore's or one of its first-party plugins' (normalized as pip does)."""
    norm = dist.lower().replace("_", "-").replace(".", "-")
    return norm in set(FIRST_PARTY_DISTRIBUTIONS.values())


@dataclass
class PluginInfo:
    """What ``qcore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    status: str  # "ok", "failed", "incompatible" or "disabled"
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
        self._objects: dict[str, Any] = {}
        self._extensions: dict[str, dict[str, Any]] = {}

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
        why = unsupported_reason(getattr(plugin, API_ATTRIBUTE, None))
        if why is not None:
            info.status, info.error = "incompatible", why
            return
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
            clash = sorted(set(spec.config_cls.model_fields) & set(RESERVED_OPTIONS))
            if clash:
                self._failed(name, distribution, version, ValueError(
                    f"method '{spec.name}' declares option(s) {', '.join(clash)}, which qcore.quantize takes "
                    "itself (they would never reach the method): rename them"))
                return
            if spec.name in self.methods:
                other = self.methods[spec.name].plugin
                self._failed(name, distribution, version,
                             ValueError(f"method '{spec.name}' is already registered by plugin '{other}'"))
                return
        for spec in collected:
            self.methods[spec.name] = replace(spec, plugin=name, distribution=distribution, version=version)
            info.methods.append(spec.name)
        self._objects[name] = plugin
        self._extensions.clear()

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        info = self.plugins.pop(name, None)
        for method in info.methods if info is not None else []:
            self.methods.pop(method, None)
        plugin = self._objects.pop(name, None)
        if plugin is not None and self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        self._extensions.clear()

    # -- extensions (observers, serializers, kernel backends) ------------------------------------
    def extensions(self, hook: str) -> dict[str, Any]:
        """``{key: object}`` registered through ``hook`` by every working plugin (cached).

        ``hook`` is one of ``qcore_register_observers``, ``qcore_register_serializers`` and
        ``qcore_register_backends``; an object's key is its ``name`` (observers, backends) or
        ``type_name`` (serializers). A plugin whose hook raises, or that registers a key another
        plugin already has, is marked failed and contributes nothing to that hook.
        """
        if hook in self._extensions:
            return self._extensions[hook]
        found: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for name, plugin in sorted(self._objects.items()):
            info = self.plugins[name]
            if info.status != "ok":
                continue
            collected: list[Any] = []
            try:
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=collected.append)
                keys = [_extension_key(obj) for obj in collected]
                taken = [k for k in keys if k in found]
                if taken:
                    raise ValueError(f"{hook.removeprefix('qcore_register_')[:-1]} '{taken[0]}' is already "
                                     f"registered by plugin '{owner[taken[0]]}'")
            except Exception as exc:  # a broken plugin must not break the others
                self._failed(name, info.distribution, info.version, exc, hook)
                continue
            for key, obj in zip(keys, collected):
                found[key] = _owned(obj, name)
                owner[key] = name
        self._extensions[hook] = found
        return found

    def _failed(self, name: str, dist: str, version: str, exc: BaseException, hook: str = "") -> None:
        where = f" (in {hook})" if hook else ""
        old = self.plugins.get(name)
        self.plugins[name] = PluginInfo(
            name, dist, version, "failed", f"{type(exc).__name__}{where}: {exc}",
            methods=list(old.methods) if old is not None else [],
            traceback="".join(traceback.format_exception(exc)),
        )

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str) -> MethodSpec:
        if name in self.methods:
            return self.methods[name]
        broken = self.plugins.get(name)
        if broken is not None and broken.status != "ok" and name not in broken.methods:
            raise PluginLoadError(
                f"method '{name}' is unavailable: plugin '{broken.name}' "
                f"({broken.distribution or 'unknown distribution'}) {broken.status}: {broken.error}. "
                + ("Unset it in " + DISABLE_ENV if broken.status == "disabled"
                   else "Reinstall or fix that plugin; run 'qcore plugins' for details")
            )
        known = ", ".join(sorted(self.methods)) or "none"
        raise UnknownMethodError(
            f"unknown method '{name}'; installed methods: {known}. {install_hint(name).capitalize()}"
        )


def _extension_key(obj: Any) -> str:
    key = getattr(obj, "type_name", None) or getattr(obj, "name", None)
    if not isinstance(key, str) or not key:
        raise TypeError(f"register() got {type(obj).__name__} without a 'name' (or 'type_name' for serializers)")
    return key


def _owned(obj: Any, plugin: str) -> Any:
    """``obj`` marked with the plugin that registered it, where it has a ``plugin`` field/attribute."""
    if is_dataclass(obj) and not isinstance(obj, type) and "plugin" in {f.name for f in fields(obj)}:
        return obj if obj.plugin else replace(obj, plugin=plugin)
    try:
        if not getattr(obj, "plugin", ""):
            obj.plugin = plugin
    except (AttributeError, TypeError):  # objects that take no attributes stay as they are
        pass
    return obj


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


def extensions(hook: str) -> dict[str, Any]:
    """What every working plugin registered through ``hook`` (see :meth:`Registry.extensions`)."""
    return get_registry().extensions(hook)
