"""Discovery, broken plugins, disabling, and the light import path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qcore
from qcore.plugin.errors import PluginLoadError, UnknownMethodError
from qcore.registry import Registry


def run_py(code: str, extra_path: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **(env or {}))
    if extra_path is not None:
        environ["PYTHONPATH"] = os.pathsep.join([str(extra_path), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, timeout=300)


def fake_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """'Install' a distribution the way pip leaves it: a module plus a .dist-info with entry points."""
    info = root / f"{dist}-0.3.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    eps = "[qcore]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    return root


BROKEN = {"qcore_broken_mod": "raise ImportError('needs libfoo, which is not installed')\n"}


def test_list_methods_does_not_import_torch() -> None:
    out = run_py("""
        import sys, qcore
        methods = qcore.list_methods()
        assert 'rtn' in methods and methods['rtn']
        print('torch' in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_builtin_rtn_registers_through_entry_point() -> None:
    plugins = {p.name: p for p in qcore.list_plugins()}
    assert plugins["rtn"].status == "ok" and plugins["rtn"].distribution == "qcore-quant"
    assert qcore.get_method("rtn").plugin == "rtn"


def test_unknown_method_names_installed_ones() -> None:
    with pytest.raises(UnknownMethodError, match="installed methods: .*rtn"):
        qcore.get_method("no-such-method")


def test_broken_plugin_is_reported_and_others_work(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qcore_broken", {"broken": "qcore_broken_mod"}, BROKEN)
    out = run_py("""
        import json, qcore
        from qcore.plugin.errors import PluginLoadError
        info = {p.name: p.__dict__ for p in qcore.list_plugins()}
        try:
            qcore.get_method('broken')
        except PluginLoadError as exc:
            err = str(exc)
        print(json.dumps({'plugins': info, 'methods': qcore.list_methods(), 'err': err}, default=str))
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    broken = data["plugins"]["broken"]
    assert broken["status"] == "failed" and broken["distribution"] == "qcore_broken"
    assert "needs libfoo" in broken["error"]
    assert "rtn" in data["methods"]
    assert "broken" in data["err"] and "needs libfoo" in data["err"]


def test_cli_plugins_shows_broken_plugin(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qcore_broken", {"broken": "qcore_broken_mod"}, BROKEN)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "qcore.cli", "plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("| broken"))
    assert "qcore_broken" in line and "0.3.1" in line and "failed" in line
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("broken: "))  # errors: whole lines below
    assert "ImportError" in error and "needs libfoo" in error
    out = subprocess.run([sys.executable, "-m", "qcore.cli", "plugins", "--json"], capture_output=True, text=True,
                         env=env)
    broken = next(p for p in json.loads(out.stdout) if p["plugin"] == "broken")
    assert broken["status"] == "failed" and "needs libfoo" in broken["error"]


def test_disable_plugins_by_name(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qcore_broken", {"broken": "qcore_broken_mod"}, BROKEN)
    out = run_py("""
        import qcore
        print({p.name: p.status for p in qcore.list_plugins()}['broken'], 'rtn' in qcore.list_methods())
    """, tmp_path, env={"QCORE_DISABLE_PLUGINS": "broken"})
    assert out.stdout.split() == ["disabled", "True"], out.stderr


def test_plugin_registering_a_taken_name_fails_alone() -> None:
    reg = Registry()
    reg.load_entry_points()

    class Dup:
        QCORE_API = ">=1,<2"

        @qcore.hookimpl
        def qcore_register_methods(self, register):
            register(qcore.get_method("rtn"))

    reg.register_plugin(Dup(), "dup")
    assert reg.plugins["dup"].status == "failed" and "already registered" in reg.plugins["dup"].error
    assert reg.get("rtn").plugin == "rtn"
    with pytest.raises(PluginLoadError, match="dup"):
        reg.get("dup")


def test_hook_that_raises_is_contained() -> None:
    reg = Registry()

    class Bad:
        QCORE_API = ">=1,<2"

        @qcore.hookimpl
        def qcore_register_methods(self, register):
            raise RuntimeError("boom")

    bad = Bad()
    reg.register_plugin(bad, "bad")
    assert reg.plugins["bad"].status == "failed" and "boom" in reg.plugins["bad"].error
    assert not reg.pm.is_registered(bad)


OLD_CONTRACT = {"qcore_old_mod": """
    import qcore
    QCORE_API = ">=0.1,<1"

    @qcore.hookimpl
    def qcore_register_methods(register):
        raise AssertionError("an incompatible plugin's hooks are never called")
"""}


def test_plugin_built_for_another_contract_is_reported_by_name(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qcore_old", {"old": "qcore_old_mod"}, OLD_CONTRACT)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "qcore.cli", "plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("| old"))
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("old: "))
    assert "incompatible" in line and ">=0.1,<1" in error and qcore.API_VERSION in error
    assert "| rtn" in out.stdout and "| gptq" in out.stdout  # the others keep working


@pytest.mark.parametrize("declared, ok", [(">=1,<2", True), (">=1.0", True), ("==1.0", True), (">=2", False),
                                          ("<1", False), (None, False), ("one", False)])
def test_api_range(declared: str | None, ok: bool) -> None:
    from qcore.plugin.version import unsupported_reason

    assert (unsupported_reason(declared, "1.0") is None) == ok


def test_extension_hook_that_raises_is_contained() -> None:
    reg = Registry()
    reg.load_entry_points()

    class BadObserver:
        QCORE_API = ">=1,<2"

        @qcore.hookimpl
        def qcore_register_observers(self, register):
            raise RuntimeError("observer boom")

    class Taken:
        QCORE_API = ">=1,<2"

        @qcore.hookimpl
        def qcore_register_observers(self, register):
            from qcore.plugin import ObserverSpec

            register(ObserverSpec("hessian", "a second hessian", "x:y"))

    reg.register_plugin(BadObserver(), "zbad")
    reg.register_plugin(Taken(), "ztaken")
    found = reg.extensions("qcore_register_observers")
    assert {"hessian", "absmax", "absmean", "inputs"} <= set(found) and found["hessian"].plugin == "builtins"
    assert reg.plugins["zbad"].status == "failed" and "observer boom" in reg.plugins["zbad"].error
    assert "qcore_register_observers" in reg.plugins["zbad"].error
    assert reg.plugins["ztaken"].status == "failed" and "already registered" in reg.plugins["ztaken"].error


def test_a_method_option_named_like_a_quantize_argument_is_refused() -> None:
    from qcore.plugin import Capabilities, MethodSpec, QuantConfig

    class SeedConfig(QuantConfig):
        method = "seedy"
        seed: int = 0

    class Seedy:
        QCORE_API = ">=1,<2"

        @qcore.hookimpl
        def qcore_register_methods(self, register):
            register(MethodSpec("seedy", "s", SeedConfig, "x:y", Capabilities(kind="weight-only")))

    reg = Registry()
    reg.register_plugin(Seedy(), "seedy")
    assert reg.plugins["seedy"].status == "failed" and "seed" in reg.plugins["seedy"].error
    assert "seedy" not in reg.methods
