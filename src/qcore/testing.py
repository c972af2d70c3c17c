"""Shared test helpers and the conformance suite every method plugin's tests subclass.

Usage in a plugin's tests::

    from qcore.testing import MethodConformance

    class TestGPTQConformance(MethodConformance):
        method = "gptq"
        plugin_module = "qcore_gptq.plugin"
        tiny_options = {"bits": 4, "group_size": 32}
        unsupported = [({"bits": 5}, "bits")]   # options, text the error must contain

The suite fails a method that does nothing: after quantizing a tiny model every linear the
method should quantize must be packed, the logits' error must stay within ``max_error_vs_rtn``
times round-to-nearest's at the same bits and group size, and save -> load must reproduce the
logits exactly.

This module imports pytest; it is meant for tests only.
"""
from __future__ import annotations

import fnmatch
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


def char_tokenizer(folder: Path) -> Path:
    """A character-level tokenizer (ids below the tiny models' vocabulary of 128), saved to ``folder``."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def imports_torch(module: str) -> bool:
    """Whether importing ``module`` in a fresh interpreter pulls in torch."""
    code = f"import sys, importlib; importlib.import_module({module!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


def qcore_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of ``qcore`` or a ``qcore.*`` module in a source file."""
    import ast

    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "qcore" or name.startswith("qcore.")]


def is_public_import(module: str) -> bool:
    """Whether a plugin may import ``module``: only the contract, ``qcore.plugin`` (whose
    ``HELPERS`` re-export the helpers a method needs)."""
    return module == "qcore.plugin" or module.startswith("qcore.plugin.")


def private_imports(sources: list[Path]) -> list[str]:
    """``file:line imports module`` for every import of qcore's internals in ``sources``."""
    return [f"{p}:{line} imports {name}" for p in sources for line, name in qcore_imports(p)
            if not is_public_import(name)]


def assert_same_tensors(theirs: Path, ours: Path, expect: Any = None) -> None:
    """Both folders' ``model.safetensors`` hold the same names, dtypes and values;
    ``expect(name, tensor)`` maps one of ``theirs`` to what ``ours`` must hold (a convention change)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(Path(theirs) / "model.safetensors")), load_file(str(Path(ours) / "model.safetensors"))
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key, t in a.items():
        want = expect(key, t) if expect is not None else t
        assert b[key].dtype == t.dtype and torch.equal(b[key], want), key


def max_relative_error(got: Any, ref: Any) -> float:
    """max|got - ref| / max|ref|, in float32 (a reader against a writer's own results)."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def relative_error(got: Any, ref: Any) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in float64."""
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


class MethodConformance:
    """Shared checks for one method. Subclass and set the class attributes."""

    method: ClassVar[str] = ""
    plugin_module: ClassVar[str] = ""
    tiny_options: ClassVar[dict[str, Any]] = {}
    tiny_family: ClassVar[str] = "llama"
    unsupported: ClassVar[list[tuple[dict[str, Any], str]]] = []
    rtn_options: ClassVar[dict[str, Any] | None] = None
    """RTN settings the error bound compares against (default: ``tiny_options``' bits and group
    size, else 4 bits, group 32)."""
    max_error_vs_rtn: ClassVar[float] = 1.5
    """The method's relative logit error may be at most this multiple of RTN's."""
    from_pretrained: ClassVar[bool] = True
    """Whether transformers' ``from_pretrained`` loads the method's checkpoints (:mod:`qcore.hf`);
    False for modules whose serializer loads their tensors itself (the refusal is tested)."""

    _cache: ClassVar[dict[str, Any]] = {}

    def is_packed(self, module: Any) -> bool:
        """Whether ``module`` holds the method's low-bit weights (qcore's ``QuantLinear``)."""
        from qcore.quant.linear import QuantLinear

        return isinstance(module, QuantLinear)

    def _quantized(self) -> tuple[Any, Any, Any, list[str]]:
        """(quantized model, float logits, inputs, names of the linears it should quantize), once per class."""
        key = type(self).__qualname__
        if key not in self._cache:
            import torch

            import qcore
            from qcore.arch.introspect import inspect_model
            from qcore.tiny import tiny_inputs, tiny_model

            model = tiny_model(self.tiny_family)
            ids = tiny_inputs(model, seq_len=16, seed=1)
            with torch.no_grad():
                ref = model(ids).logits
            ignore = list(self.tiny_options.get("ignore", []))
            targets = [n for n in inspect_model(model).quantizable() if not any(fnmatch.fnmatchcase(n, p) for p in ignore)]
            qcore.quantize(model, self.method, calibration=tiny_calibration(model.config.vocab_size),
                           **self.tiny_options)
            self._cache[key] = (model, ref, ids, targets)
        return self._cache[key]

    def _rtn_error(self, ref: Any, ids: Any) -> float:
        import torch

        import qcore
        from qcore.tiny import tiny_model

        opts = self.rtn_options or {"bits": self.tiny_options.get("bits", 4),
                                    "group_size": self.tiny_options.get("group_size", 32)}
        model = tiny_model(self.tiny_family)
        qcore.quantize(model, "rtn", **opts)
        with torch.no_grad():
            return relative_error(model(ids).logits, ref)

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

        model, _, ids, targets = self._quantized()
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        assert model.qcore_record["chain"][-1]["method"] == self.method
        left = [n for n in targets if not self.is_packed(model.get_submodule(n))]
        assert targets and not left, f"{len(left)} of {len(targets)} linears were not packed, e.g. {left[:3]}"

    def test_error_below_bound(self) -> None:
        import torch

        model, ref, ids, _ = self._quantized()
        with torch.no_grad():
            err = relative_error(model(ids).logits, ref)
        rtn = self._rtn_error(ref, ids)
        assert 0.0 < err < 1.0, f"relative logit error {err:.4f}: the method changed nothing or broke the model"
        assert err <= self.max_error_vs_rtn * rtn, (
            f"relative logit error {err:.4f} > {self.max_error_vs_rtn} x RTN's {rtn:.4f}")

    def test_save_load_reproduces_logits(self, tmp_path: Path) -> None:
        import torch

        import qcore

        model, _, ids, _ = self._quantized()
        path = qcore.save(model, tmp_path / "ck")
        loaded = qcore.load(path)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)

    def test_from_pretrained_reproduces_logits(self, tmp_path: Path) -> None:
        """transformers' from_pretrained of the checkpoint (qcore.hf registered) gives the same
        logits, and its save_pretrained folder loads again identically with qcore.load."""
        import torch
        from transformers import AutoModelForCausalLM

        import qcore
        import qcore.hf  # noqa: F401 - registers "qcore" with transformers
        from qcore.plugin.errors import CheckpointError

        model, _, ids, _ = self._quantized()
        path = qcore.save(model, tmp_path / "ck")
        if not self.from_pretrained:
            with pytest.raises(CheckpointError, match="qcore.load"):
                AutoModelForCausalLM.from_pretrained(path)
            return
        hf_model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            expected = model(ids).logits
            assert torch.equal(hf_model(ids).logits, expected)
            hf_model.save_pretrained(tmp_path / "hf")
            assert torch.equal(qcore.load(tmp_path / "hf")(ids).logits, expected)

    def test_per_layer_precision(self, tmp_path: Path) -> None:
        """A per-layer map of bits and group sizes reaches every layer, the checkpoint and ``qcore info``."""
        import qcore
        from qcore.checkpoint import describe_checkpoint
        from qcore.plugin import WeightQuantConfig
        from qcore.tiny import tiny_model

        spec = self._spec()
        if not issubclass(spec.config_cls, WeightQuantConfig):
            pytest.skip(f"{self.method} has no bits/group_size")
        caps = spec.capabilities
        base_bits = self.tiny_options.get("bits", 4)
        other = max(b for b in caps.weight_bits if b != base_bits)
        base_group = self.tiny_options.get("group_size", 32)
        options = {**self.tiny_options, "bits": {"default": base_bits, "*.mlp.down_proj": other},
                   "group_size": {"default": base_group, "*.self_attn.o_proj": -1}}
        model = tiny_model(self.tiny_family)
        qcore.quantize(model, self.method, calibration=tiny_calibration(model.config.vocab_size), **options)
        cfg = spec.config_cls.from_options(**options)
        modules = model.qcore_record["modules"]
        assert modules
        for name, meta in modules.items():
            want = cfg.precision(name)
            assert (meta["bits"], meta["group_size"]) == (want.bits, want.group_size), name
        assert {m["bits"] for m in modules.values()} == {base_bits, other}
        rows = {r["name"]: r for r in describe_checkpoint(qcore.save(model, tmp_path / "ck"))["layers"]}
        for name, meta in modules.items():
            assert (rows[name]["bits"], rows[name]["group_size"]) == (meta["bits"], meta["group_size"])

    def test_unsupported_options_raise(self) -> None:
        import qcore
        from qcore.tiny import tiny_model

        for options, text in self.unsupported:
            model = tiny_model(self.tiny_family)
            with pytest.raises(qcore.QcoreError, match=text):
                qcore.quantize(model, self.method, calibration=tiny_calibration(model.config.vocab_size),
                               **options)
