"""docs/plugins.md's example plugin, installed with pip into a temp folder and used."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", re.S)


def write_example(root: Path) -> Path:
    pkg = root / "qcore-pow2"
    files = BLOCK.findall(DOC.read_text())
    assert len(files) >= 5, "docs/plugins.md lost its example files"
    for rel, body in files:
        target = pkg / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    return pkg


@pytest.mark.slow
def test_doc_example_plugin_installs_and_quantizes(tmp_path: Path) -> None:
    pkg = write_example(tmp_path)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--target", str(site), str(pkg)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    listing = subprocess.run([sys.executable, "-m", "qcore.cli", "plugins"], capture_output=True, text=True, env=env)
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith("| pow2"))
    assert "qcore-pow2" in line and "0.1.0" in line and "ok" in line
    # The example's own tests: the shared conformance suite, run against the installed plugin.
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "6 passed" in tests.stdout
    use = subprocess.run([sys.executable, "-c", (
        "import torch, qcore\n"
        "from qcore.tiny import tiny_model\n"
        "m = tiny_model('qwen3')\n"
        "qcore.quantize(m, 'pow2', bits=4, group_size=32)\n"
        "q = [x for x in m.modules() if type(x).__name__ == 'QuantLinear']\n"
        "s = q[0].scales.float()\n"
        "assert torch.equal(torch.exp2(torch.log2(s).round()), s), 'scales are not powers of two'\n"
        "print(len(q), bool(torch.isfinite(m(torch.arange(8)[None]).logits).all()))\n")],
        capture_output=True, text=True, env=env, timeout=300)
    assert use.returncode == 0, use.stderr[-3000:]
    n, finite = use.stdout.split()
    assert int(n) > 0 and finite == "True"
