"""Shared test helpers and the conformance suite every method plugin's tests subclass.

Usage in a plugin's tests::

    from qcore.testing import MethodConformance

    class TestGPTQConformance(MethodConformance):
        method = "gptq"
        plugin_module = "qcore_gptq.plugin"
        tiny_options = {"bits": 4, "group_size": 32}
        unsupported = [({"bits": 5}, "bits")]   # options, text the error must contain

This module imports pytest; it is meant for tests only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

#: ../shared beside the project checkout (present in development and CI, not on users' machines).
SHARED: Path = Path(os.environ.get("QCORE_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
HAS_SHARED = (SHARED / "models" / "stories260K" / "config.json").is_file()
requires_shared = pytest.mark.skipif(not HAS_SHARED, reason=f"needs ../shared (real models and text), not found at {SHARED}")
STORIES_DIR = SHARED / "models" / "stories260K"
TINYSTORIES_TXT = SHARED / "data" / "tinystories_train_head.txt"
WIKITEXT2_TXT = SHARED / "data" / "wikitext2_raw_test.txt"


def tiny_calibration(vocab_size: int = 128, n_samples: int = 4, seq_len: int = 32, seed: int = 0) -> Any:
    """Random-token calibration windows for tiny-model tests."""
    import torch

    from qcore.data import CalibrationData

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_samples, seq_len), generator=gen)
    return CalibrationData(input_ids=ids, record={"source": "random tokens", "n_samples": n_samples,
                                                  "seq_len": seq_len, "seed": seed})


def imports_torch(module: str) -> bool:
    """Whether importing ``module`` in a fresh interpreter pulls in torch."""
    code = f"import sys, importlib; importlib.import_module({module!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


class MethodConformance:
    """Shared checks for one method. Subclass and set the class attributes."""

    method: ClassVar[str] = ""
    plugin_module: ClassVar[str] = ""
    tiny_options: ClassVar[dict[str, Any]] = {}
    tiny_family: ClassVar[str] = "llama"
    unsupported: ClassVar[list[tuple[dict[str, Any], str]]] = []

    def _spec(self) -> Any:
        import qcore

        return qcore.get_method(self.method)

    def test_entry_point_resolves(self) -> None:
        from importlib import metadata

        eps = [ep for ep in metadata.entry_points(group="qcore") if ep.name == self.method]
        assert eps, f"no 'qcore' entry point named {self.method!r}: is the plugin installed?"
        assert eps[0].value.split(":")[0] == self.plugin_module
        spec = self._spec()
        assert spec.name == self.method
        assert spec.summary and "\n" not in spec.summary

    def test_plugin_imports_without_torch(self) -> None:
        assert not imports_torch(self.plugin_module), f"{self.plugin_module} imports torch at import time"
        config_module = self._spec().config_cls.__module__
        assert not imports_torch(config_module), f"{config_module} imports torch at import time"

    def test_config_round_trip(self) -> None:
        cls = self._spec().config_cls
        cfg = cls.from_options(**self.tiny_options)
        data = json.loads(cfg.to_json())
        assert data["method"] == self.method and "config_version" in data
        assert cls.from_json_dict(data) == cfg

    def test_config_rejects_unknown_option(self) -> None:
        from qcore.plugin.errors import ConfigError

        cls = self._spec().config_cls
        with pytest.raises(ConfigError, match="valid options"):
            cls.from_options(**self.tiny_options, definitely_not_an_option=1)

    def test_tiny_model_quantizes(self) -> None:
        import torch

        import qcore
        from qcore.tiny import tiny_model

        model = tiny_model(self.tiny_family)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        qcore.quantize(model, self.method, calibration=tiny_calibration(model.config.vocab_size),
                       **self.tiny_options)
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        record = model.qcore_record
        assert record["chain"][-1]["method"] == self.method

    def test_unsupported_options_raise(self) -> None:
        import qcore
        from qcore.tiny import tiny_model

        for options, text in self.unsupported:
            model = tiny_model(self.tiny_family)
            with pytest.raises(qcore.QcoreError, match=text):
                qcore.quantize(model, self.method, calibration=tiny_calibration(model.config.vocab_size),
                               **options)
