"""The peers' virtual environments: parsed from bench/requirements-peers.txt, created on demand, cached.

Each ``# [env NAME]`` section of the requirements file is one environment, created at
``ROOT/NAME`` with the interpreter that runs this script (its base Python) and torch pinned by the
project's ``constraints.txt``. A stamp file in the environment holds the lines it was built from:
an environment whose stamp matches is reused as is; one whose lines changed is updated in place.

    .venv/bin/python bench/peer_envs.py --root .peers gptqmodel llmc   # create or update, print paths
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-peers.txt"
CONSTRAINTS = HERE.parent / "constraints.txt"
STAMP = ".qcore-peer-requirements"
SECTION = re.compile(r"^#\s*\[env\s+([A-Za-z0-9_.-]+)(\s+optional)?\]\s*$")
PIP_ENV = re.compile(r"^#\s*pip-env:\s*([A-Z_][A-Z0-9_]*)=(.*)$")

log = logging.getLogger("bench.peer_envs")


def parse(path: Path = REQUIREMENTS) -> dict[str, list[str]]:
    """Environment name -> its requirement lines (comments and blank lines dropped) and its
    ``# pip-env: KEY=VALUE`` lines, kept as ``KEY=VALUE`` entries prefixed with ``env:``."""
    envs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        m = SECTION.match(raw.strip())
        if m:
            current = envs.setdefault(m.group(1), [])
            continue
        var = PIP_ENV.match(raw.strip())
        if var and current is not None:
            current.append(f"env:{var.group(1)}={var.group(2).strip()}")
            continue
        line = raw.split("#", 1)[0].strip()
        if line and current is not None:
            current.append(line)
    return envs


def optional(path: Path = REQUIREMENTS) -> set[str]:
    """Environments marked ``optional`` (built only when named)."""
    return {m.group(1) for m in map(SECTION.match, (ln.strip() for ln in path.read_text().splitlines()))
            if m and m.group(2)}


def python_of(root: Path, name: str) -> Path:
    """The interpreter of environment ``name`` under ``root``."""
    return root / name / "bin" / "python"


def ensure(name: str, root: Path, envs: dict[str, list[str]] | None = None) -> Path:
    """Create or update environment ``name`` under ``root``; returns its interpreter.

    Raises ``RuntimeError`` with pip's last lines when the install fails (the stamp is then not
    written, so the next call retries)."""
    envs = parse() if envs is None else envs
    if name not in envs:
        raise KeyError(f"no environment {name!r} in {REQUIREMENTS.name}: known {', '.join(sorted(envs))}")
    lines = [ln for ln in envs[name] if not ln.startswith("env:")]
    pip_env = dict(ln[4:].split("=", 1) for ln in envs[name] if ln.startswith("env:"))
    pinned = [ln.strip() for ln in CONSTRAINTS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    wanted = "\n".join(pinned + envs[name]) + "\n"
    py = python_of(root, name)
    stamp = root / name / STAMP
    if py.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return py
    if not py.is_file():
        log.info("creating the peer environment %s at %s", name, root / name)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(root / name)], check=True)
    log.info("installing into %s: %s", name, " ".join(lines))
    env = {**os.environ, **pip_env, "PIP_CONSTRAINT": str(CONSTRAINTS)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-c", str(CONSTRAINTS), *lines], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"pip could not install the peer environment {name}: {tail}")
    stamp.write_text(wanted, encoding="utf-8")
    return py


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE.parent / ".peers")
    ap.add_argument("names", nargs="*", help="environments (default: all but the optional ones)")
    args = ap.parse_args()
    envs = parse()
    for name in args.names or sorted(set(envs) - optional()):
        print(f"{name}: {ensure(name, args.root, envs)}")


if __name__ == "__main__":
    main()
