"""Regenerate docs/compatibility.md from the methods of this repository.

    python tools/gen_compat.py > docs/compatibility.md

The methods are qcore's built-ins plus every ``plugins/qcore_*`` package (their entry points,
read from the pyproject.toml files), as registered in this environment; a repository plugin that
is not installed or fails to load is an error (install everything with ``make install`` first).
tests/test_compat.py fails when the committed file differs from this output.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def entry_points(pyproject: Path) -> list[str]:
    """Names in the ``[project.entry-points.qcore]`` table of a pyproject.toml."""
    data = tomllib.loads(pyproject.read_text())
    return sorted(data.get("project", {}).get("entry-points", {}).get("qcore", {}))


def repo_plugins(root: Path = ROOT) -> list[str]:
    """Entry-point names of qcore's built-ins and of ``plugins/qcore_*``."""
    names = entry_points(root / "pyproject.toml")
    for project in sorted((root / "plugins").glob("qcore_*/pyproject.toml")):
        names += entry_points(project)
    return sorted(set(names))


def missing_plugins(root: Path = ROOT) -> list[str]:
    """Repository plugins that are not installed or failed to load."""
    from qcore.registry import get_registry

    plugins = get_registry().plugins
    return [n for n in repo_plugins(root) if n not in plugins or plugins[n].status != "ok"]


def repo_markdown(root: Path = ROOT) -> str:
    """docs/compatibility.md as it should read."""
    from qcore.compat import installed_specs, render_markdown

    names = set(repo_plugins(root))
    return render_markdown([s for s in installed_specs() if s.plugin in names])


def main() -> int:
    missing = missing_plugins()
    if missing:
        sys.stderr.write(f"gen_compat: repository plugin(s) {', '.join(missing)} not installed or broken; "
                         "install every plugin (make install) first\n")
        return 1
    sys.stdout.write(repo_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
