"""The plugin contract: ``qcore.plugin`` is torch-free and is all a first-party plugin imports;
one function resolves a chain for both ``qcore.check`` and ``qcore.quantize``; per-layer maps."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qcore
from qcore.plugin import ConfigError, WeightQuantConfig, layer_value
from qcore.testing import private_imports
from qcore.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted((ROOT / "plugins").glob("qcore_*/src/**/*.py"))


def test_contract_imports_without_torch() -> None:
    code = "import sys, qcore.plugin, qcore.plugin.hookspecs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_first_party_plugins_import_only_the_public_contract() -> None:
    assert PLUGIN_SOURCES, "no plugin sources found"
    bad = private_imports(PLUGIN_SOURCES)
    assert not bad, "plugins must import only qcore.plugin:\n" + "\n".join(bad)


def test_the_walk_catches_an_internal_import(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("from qcore.pipeline.engine import BlockContext\nimport qcore.registry\nfrom qcore.plugin import Needs\n")
    assert [b.rsplit(" ", 1)[1] for b in private_imports([src])] == ["qcore.pipeline.engine", "qcore.registry"]


def test_check_validates_exactly_the_configs_that_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods sharing option names (group_size, ignore), given one config each, and an option
    carried along the chain (smoothquant's w_bits -> gptq's bits)."""
    import qcore.compat
    import qcore.pipeline.engine as engine
    from qcore_gptq.config import GPTQConfig
    from qcore_smoothquant.config import SmoothQuantConfig

    checked: list = []
    ran: list = []
    real_check, real_run = qcore.compat.check_chain, engine.run_chain

    def spy_check(model, chain):  # noqa: ANN001, ANN202
        checked.append([c.model_copy() for c in chain.configs])
        return real_check(model, chain)

    def spy_run(model, quantizers, **kw):  # noqa: ANN001, ANN202
        ran.append([q.config.model_copy() for q in quantizers])
        return real_run(model, quantizers, **kw)

    monkeypatch.setattr(qcore.compat, "check_chain", spy_check)
    monkeypatch.setattr(engine, "run_chain", spy_run)
    model = tiny_model("llama")
    configs = [SmoothQuantConfig(group_size=-1, w_bits=8, ignore=["*.mlp.*"]),
               GPTQConfig(group_size=32, ignore=["*.self_attn.o_proj"])]
    from qcore.testing import tiny_calibration

    qcore.quantize(model, ["smoothquant", "gptq"], config=configs, calibration=tiny_calibration())
    assert checked == ran and len(ran[0]) == 2
    assert ran[0][1].bits == 8 and ran[0][1].group_size == 32 and ran[0][0].group_size == -1
    assert ran[0][1].ignore == ["*.self_attn.o_proj"]
    verdict = qcore.check(model, ["smoothquant", "gptq"], config=configs)
    assert [c.model_dump() for c in verdict.configs] == [c.model_dump() for c in ran[0]]


def test_carried_option_conflict_is_refused() -> None:
    verdict = qcore.check(None, ["smoothquant", "gptq"], w_bits=8, bits=4)
    assert not verdict.ok and "conflicts with gptq bits=4" in verdict.message()


def test_per_layer_map_resolution() -> None:
    bits = {"default": 4, "*.mlp.*": 6, "*.mlp.down_proj": 8, "model.layers.0.*": 3}
    assert layer_value(bits, "model.layers.1.self_attn.q_proj") == 4
    assert layer_value(bits, "model.layers.1.mlp.up_proj") == 6
    assert layer_value(bits, "model.layers.1.mlp.down_proj") == 8  # the most specific pattern wins
    assert layer_value(bits, "model.layers.0.self_attn.q_proj") == 3
    cfg = WeightQuantConfig(bits=bits, group_size={"default": 32, "*.o_proj": -1})
    assert cfg.precision("model.layers.0.self_attn.o_proj").group_size == -1
    with pytest.raises(ValueError, match="default"):
        WeightQuantConfig(bits={"*.mlp.*": 6})
    with pytest.raises(ConfigError, match="bits must be one of 2, 3, 4 or 8"):
        qcore.get_method("gptq").config_cls.from_options(bits={"default": 4, "*.mlp.*": 5})


def test_compat_validates_every_layers_choice() -> None:
    model = tiny_model("llama")  # hidden 64, mlp 128
    ok = qcore.check(model, "rtn", bits={"default": 4, "*.down_proj": 8}, group_size={"default": 32, "*.down_proj": 128})
    assert ok.ok, ok.message()
    bad = qcore.check(model, "rtn", group_size={"default": 32, "*.o_proj": 128})
    assert not bad.ok and "group_size 128 does not divide in_features 64 of model.layers.0.self_attn.o_proj" in bad.message()
    bad = qcore.check(model, "rtn", bits={"default": 4, "*.down_proj": 5})
    assert not bad.ok and "not 5" in bad.message()
