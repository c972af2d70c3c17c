"""qcore.quantize: option routing, chains, checks, records; the main job through the CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import qcore
from qcore.plugin.errors import CalibrationError, CompatibilityError, ConfigError
from qcore.methods.rtn import RTNConfig
from qcore.quant.linear import QuantLinear
from qcore.registry import get_registry
from qcore.testing import STORIES_DIR, requires_shared
from qcore.tiny import tiny_model


def n_block_linears(model: torch.nn.Module) -> int:
    return sum(len(b.linears) for b in qcore.inspect_model(model).blocks)


def test_quantize_replaces_every_block_linear_and_records() -> None:
    model = tiny_model("qwen3")
    expected = n_block_linears(model)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(ids).logits
    qcore.quantize(model, "rtn", bits=8, group_size=32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == expected
    assert not isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8-bit is close to float
    rec = model.qcore_record
    assert rec["chain"][0]["method"] == "rtn" and rec["chain"][0]["config"]["bits"] == 8
    assert len(rec["modules"]) == expected


def test_config_object_and_options_are_equivalent() -> None:
    a, b = tiny_model("llama"), tiny_model("llama")
    qcore.quantize(a, "rtn", bits=4, group_size=32)
    qcore.quantize(b, "rtn", config=RTNConfig(bits=4, group_size=32))
    ids = torch.arange(10)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(ConfigError, match="not both"):
        qcore.quantize(tiny_model("llama"), "rtn", config=RTNConfig(), bits=4)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError, match="valid options: .*group_size"):
        qcore.quantize(tiny_model("llama"), "rtn", bitz=4)


def test_ignore_keeps_modules_float() -> None:
    model = tiny_model("llama")
    qcore.quantize(model, "rtn", bits=4, group_size=32, ignore=["*.mlp.down_proj"])
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_check_refuses_before_touching_the_model() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompatibilityError, match="group_size 48 does not divide"):
        qcore.quantize(model, "rtn", bits=4, group_size=48)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_chain_order_is_checked() -> None:
    with pytest.raises(CompatibilityError, match="cannot follow 'rtn'"):
        qcore.quantize(tiny_model("llama"), ["rtn", "rtn"], bits=4, group_size=32)


def test_calibrated_method_without_text_or_tokenizer_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = get_registry()
    spec = reg.methods["rtn"]
    calibrated = replace(spec, name="rtn-calibrated",
                         capabilities=replace(spec.capabilities, needs_calibration=True))
    monkeypatch.setitem(reg.methods, "rtn-calibrated", calibrated)
    with pytest.raises(CalibrationError, match="tokenizer="):
        qcore.quantize(tiny_model("llama"), "rtn-calibrated", bits=4, group_size=32)


@requires_shared
def test_main_job_on_real_model(tmp_path) -> None:
    """The README's main job, on stories260K: quantize, save, reload, report perplexity and size."""
    from qcore.cli import main

    out, report = tmp_path / "q", tmp_path / "report.json"
    code = main(["quantize", str(STORIES_DIR), "--method", "rtn", "--bits", "4", "--group-size", "-1",
                 "--out", str(out), "--eval", "--data", "tinystories", "--eval-tokens", "4096",
                 "--eval-seq-len", "256", "--json", str(report)])
    assert code == 0
    r = json.loads(report.read_text())
    f, q = r["float"]["perplexity"], r["quantized"]["perplexity"]
    assert 1.0 < f < 10.0 and f < q < 2 * f  # 4-bit RTN is worse than float, not broken
    from qcore.checkpoint import describe_checkpoint

    on_disk = describe_checkpoint(out)
    assert on_disk["quantized_bytes"] < 0.30 * on_disk["quantized_fp16_bytes"]
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".*tmp*"))
    # the evaluation travels with the checkpoint: its record and its model card
    ev = json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]
    assert (ev["perplexity"], ev["float_perplexity"], ev["data"]) == (q, f, "tinystories")
    assert f"| quantized | {q:.3f} |" in (out / "README.md").read_text()
