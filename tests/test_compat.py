"""The compatibility matrix (data, rendering, staleness of docs/compatibility.md) and qcore.check."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcore
from qcore import compat
from qcore.compat import Verdict, check, dividing_group_sizes, matrix_rows, render_markdown
from qcore.plugin.config import WeightQuantConfig
from qcore.plugin.errors import CompatibilityError, ConfigError
from qcore.plugin.spec import Capabilities, MethodSpec
from qcore.testing import STORIES_DIR, requires_shared
from qcore.tiny import TINY_FAMILIES, tiny_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compatibility.md"


class FakeConfig(WeightQuantConfig):
    method = "fake"
    act_bits: int | None = None


class FakeTransformConfig(WeightQuantConfig):
    method = "faketransform"
    alpha: float = 0.5


FAKE = MethodSpec(
    name="fake", summary="test method", config_cls=FakeConfig, quantizer="x:y",
    capabilities=Capabilities(kind="weight-only", weight_bits=(3, 4), activation_bits=(8,),
                              architectures=("llama", "qwen*"), group_sizes=(-1, 32, 64)),
)
TRANSFORM = MethodSpec(
    name="faketransform", summary="test transform", config_cls=FakeTransformConfig, quantizer="x:y",
    capabilities=Capabilities(kind="transform", composes_with=("kind:weight-only",)),
)


@pytest.fixture(scope="module")
def smollm_shaped() -> torch.nn.Module:
    """SmolLM2-135M's linear shapes (hidden 576, MLP 1536, 9/3 heads) in 2 random layers."""
    return tiny_model("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64)


def test_issue_example_message(smollm_shaped: torch.nn.Module) -> None:
    verdict = check(smollm_shaped, "rtn", bits=4, group_size=128)
    assert not verdict.ok and verdict.family == "llama"
    assert verdict.reasons == [
        "group_size 128 does not divide in_features 576 of model.layers.0.self_attn.q_proj "
        "(and 11 more linears): use 64 or 32"
    ]
    assert "group_size=64 divides every quantized linear of this model" in verdict.recommendations
    with pytest.raises(CompatibilityError, match="use 64 or 32") as exc:
        verdict.raise_if_failed()
    assert not isinstance(exc.value, ConfigError)
    assert check(smollm_shaped, "rtn", bits=4, group_size=64).ok


def test_quantize_refuses_with_the_check_message(smollm_shaped: torch.nn.Module) -> None:
    with pytest.raises(CompatibilityError, match="does not divide in_features 576"):
        qcore.quantize(smollm_shaped, "rtn", bits=4, group_size=128)


def test_ragged_mlp_suggests_per_channel_and_ignore() -> None:
    # stories260K's MLP width 172 = 4 * 43: no group size of the table divides it
    model = tiny_model("llama", intermediate_size=172)
    verdict = check(model, "rtn", group_size=32)
    assert verdict.reasons == ["group_size 32 does not divide in_features 172 of model.layers.0.mlp.down_proj "
                               "(and 1 more linear): use -1 (one scale per output channel)"]
    assert verdict.recommendations == ['keep them in float with ignore=["*.mlp.down_proj"]']
    assert "Try: keep them in float" in verdict.message()
    assert check(model, "rtn", group_size=32, ignore=["*.mlp.down_proj"]).ok
    assert check(model, "rtn", group_size=-1).ok



def test_chain_message_names_a_shared_problem_once() -> None:
    model = tiny_model("llama", intermediate_size=172)
    verdict = check(model, ["rtn", "rtn"], group_size=32)
    assert sum("does not divide" in r for r in verdict.reasons) == 2  # each method reports it ...
    assert verdict.message().count("does not divide") == 1  # ... the message says it once
    assert verdict.message().count("keep them in float") == 1


@requires_shared
def test_real_stories260k() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32)
    verdict = check(model, "rtn", bits=4, group_size=32)
    assert not verdict.ok and "in_features 172 of model.layers.0.mlp.down_proj (and 4 more linears)" in verdict.reasons[0]
    assert check(model, "rtn", bits=4, group_size=64, ignore=["*.mlp.down_proj"]).ok


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_families_fit_group_32_and_64(family: str) -> None:
    model = tiny_model(family)
    for gs in (32, 64, -1):
        verdict = check(model, "rtn", group_size=gs)
        assert verdict.ok, verdict.message()
    assert verdict.family == family
    assert not check(model, "rtn", group_size=128).ok  # hidden 64: 128 never divides


def test_options_errors_list_valid_options() -> None:
    verdict = check(None, "rtn", bits=4, group_sizee=64)
    assert not verdict.ok and verdict.config_failure
    assert "unknown option(s) group_sizee for method 'rtn'; valid options: ignore, bits, group_size, sym" \
        in verdict.reasons[0]
    with pytest.raises(ConfigError) as exc:
        verdict.raise_if_failed()
    assert isinstance(exc.value, CompatibilityError)
    verdict = check(None, "rtn", group_size=0)
    assert not verdict.ok and "group_size" in verdict.reasons[0] and "valid options" in verdict.reasons[0]
    assert check(None, "rtn", bits=3, group_size=64).ok


def test_unknown_method() -> None:
    verdict = check(None, "definitely_not_a_method")
    assert not verdict.ok
    assert "unknown method 'definitely_not_a_method'; installed methods:" in verdict.reasons[0]
    assert "rtn" in verdict.reasons[0]


def test_capabilities_bits_groups_architecture() -> None:
    llama = tiny_model("llama")
    assert check(llama, FAKE, bits=4, group_size=32, act_bits=8).ok
    verdict = check(llama, FAKE, bits=8, group_size=128, act_bits=4)
    assert not verdict.ok
    assert "fake supports weight bits 3, 4, not 8" in verdict.reasons
    assert "fake supports activation bits 8, not 4" in verdict.reasons
    assert "fake supports group sizes -1, 32, 64, not 128" in verdict.reasons
    assert "use bits=4" in verdict.recommendations
    verdict = check(tiny_model("gpt2"), FAKE, bits=4, group_size=32)
    assert verdict.reasons == ["fake does not support architecture family 'gpt2' (it supports: llama, qwen*)"]
    assert any("support 'gpt2'" in r and "rtn" in r for r in verdict.recommendations)
    assert check(tiny_model("qwen3_moe"), FAKE, bits=4, group_size=32).ok


def test_chain_order_and_option_split() -> None:
    llama = tiny_model("llama")
    verdict = check(llama, [TRANSFORM, FAKE], alpha=0.8, bits=3, group_size=32)
    assert verdict.ok, verdict.message()
    assert [type(c).__name__ for c in verdict.configs] == ["FakeTransformConfig", "FakeConfig"]
    assert verdict.configs[0].alpha == 0.8 and verdict.configs[1].bits == 3
    assert verdict.configs[0].group_size == 32  # shared options go to every method declaring them
    verdict = check(llama, [FAKE, TRANSFORM])
    assert "'faketransform' cannot follow 'fake' in a chain ('fake' composes with: nothing)" in verdict.reasons
    assert "reverse the order: ['faketransform', 'fake']" in verdict.recommendations
    verdict = check(llama, [TRANSFORM, FAKE], beta=1)
    assert "unknown option(s) beta for chain faketransform + fake; valid options: faketransform:" \
        in verdict.reasons[0]
    assert check(llama, [FAKE], config=FakeConfig(group_size=64)).ok
    assert not check(llama, [FAKE], config=FakeTransformConfig()).ok


def test_router_and_ignore_are_exempt_from_group_checks() -> None:
    # MoE with 48 experts: routers are [48, 64]; expert MLP width 96 only fits 32
    model = tiny_model("qwen3_moe", num_experts=48, moe_intermediate_size=96)
    assert check(model, "rtn", group_size=32).ok
    verdict = check(model, "rtn", group_size=64)
    assert "in_features 96 of model.layers.0.mlp.experts.0.down_proj" in verdict.reasons[0]
    assert "use 32" in verdict.reasons[0]
    assert check(model, "rtn", group_size=64, ignore=["*.down_proj"]).ok


def test_matrix_rows_are_data() -> None:
    rows = matrix_rows([FAKE, TRANSFORM])
    assert len(rows) == 2 * len(compat.archtable.FAMILIES)
    fake = {r["family"]: r["supported"] for r in rows if r["method"] == "fake"}
    assert fake["llama"] and fake["qwen2"] and fake["qwen3_moe"] and not fake["gpt2"] and not fake["bert"]
    assert all(r["supported"] for r in rows if r["method"] == "faketransform")
    assert {r["family"] for r in rows} == set(TINY_FAMILIES)


def test_render_is_deterministic_and_complete() -> None:
    text = render_markdown([TRANSFORM, FAKE])
    assert text == render_markdown([FAKE, TRANSFORM])
    assert "| `fake` |" in text and "| `faketransform` | yes | - |" in text
    assert "| Llama (`llama`) | yes | yes |" in text and "| GPT-2 (`gpt2`) | no | yes |" in text
    assert "| `act_bits` | `int \\| None` | `null` |" in text
    assert "| SmolLM2-135M | 576, 1536 | 32, 64 |" in text


def test_dividing_group_sizes() -> None:
    assert dividing_group_sizes([576, 1536], (-1, 32, 64, 128)) == [64, 32]
    assert dividing_group_sizes([64, 172], (32, 64)) == []


def test_lazy_public_check() -> None:
    assert qcore.check is check
    assert isinstance(check(None, "rtn"), Verdict)


def test_compat_matrix_imports_no_torch() -> None:
    code = "import sys, qcore.compat as c; c.render_markdown(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _gen_compat():  # noqa: ANN202 - the tool module
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_compat", ROOT / "tools" / "gen_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_compatibility_md_is_current() -> None:
    tool = _gen_compat()
    missing = tool.missing_plugins()
    if missing:
        pytest.skip(f"repository plugin(s) {', '.join(missing)} not installed: the generated doc covers all "
                    "of them (make install)")
    assert DOC.is_file(), f"docs/compatibility.md is missing: run `{compat.REGENERATE}`"
    assert DOC.read_text() == tool.repo_markdown(), f"docs/compatibility.md is stale: run `{compat.REGENERATE}`"


def test_repo_plugins_found() -> None:
    names = _gen_compat().repo_plugins()
    assert {"rtn", "builtins", "gptq", "awq"} <= set(names)
