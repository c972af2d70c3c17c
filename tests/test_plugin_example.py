"""docs/examples/qcore-pow2, a third-party plugin written only against ``qcore.plugin``: pip-installed
into a temporary folder, its own tests (the conformance suite) run, and its checkpoint, which holds
its own module type, saved and loaded."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "qcore-pow2"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("pow2")
    pkg = tmp / "qcore-pow2"
    shutil.copytree(EXAMPLE, pkg, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    site = tmp / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--target", str(site), str(pkg)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                QCORE_PROGRESS="0", POW2_TESTS=str(pkg / "tests"), POW2_TMP=str(tmp))


def test_the_example_imports_only_the_public_contract() -> None:
    from qcore.testing import private_imports

    sources = sorted(EXAMPLE.glob("src/**/*.py"))
    assert sources and not private_imports(sources)


@pytest.mark.slow
def test_example_plugin_is_listed_and_passes_the_conformance_suite(installed: dict[str, str]) -> None:
    listing = subprocess.run([sys.executable, "-m", "qcore.cli", "plugins"], capture_output=True, text=True,
                             env=installed)
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith("| pow2"))
    assert "qcore-quant-pow2" in line and "0.1.0" in line and "ok" in line
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", installed["POW2_TESTS"]],
                           capture_output=True, text=True, env=installed, cwd=installed["POW2_TMP"], timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    from qcore.testing import MethodConformance

    suite = sum(name.startswith("test_") for name in dir(MethodConformance))
    assert f"{suite} passed" in tests.stdout, tests.stdout[-500:]  # every test of the shared suite


@pytest.mark.slow
def test_example_checkpoint_with_its_own_module_saves_and_loads(installed: dict[str, str]) -> None:
    code = (
        "import json, torch, qcore\n"
        "from qcore.testing import tiny_calibration\n"
        "from qcore.tiny import tiny_inputs, tiny_model\n"
        "m = tiny_model('qwen3'); x = tiny_inputs(m)\n"
        "qcore.quantize(m, 'pow2', bits=4, group_size=32, calibration=tiny_calibration(), max_shift=3)\n"
        "q = [x for x in m.modules() if type(x).__name__ == 'QuantLinear']\n"
        "s = q[0].scales.float()\n"
        "assert torch.equal(torch.exp2(torch.log2(s).round()), s), 'scales are not powers of two'\n"
        "shifts = [x for x in m.modules() if type(x).__name__ == 'InputShift']\n"
        "assert shifts, 'no input transform was set'\n"
        f"path = qcore.save(m, {installed['POW2_TMP']!r} + '/ck')\n"
        "types = {v.get('type') for v in json.load(open(path / 'config.json'))['quantization_config']['modules'].values()}\n"
        "assert 'pow2.input_shift' in types, types\n"
        "back = qcore.load(path)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(back(x).logits, m(x).logits)\n"
        "print(len(q), len(shifts))\n"
    )
    use = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, timeout=300)
    assert use.returncode == 0, use.stderr[-3000:]
    n_quant, n_shift = map(int, use.stdout.split())
    assert n_quant > 0 and n_shift > 0
