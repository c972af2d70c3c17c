"""Bad input is refused with the problem and the fix, as classes (not case by case): an already
quantized model, non-finite values, an architecture the introspection does not understand,
``ignore`` patterns that match nothing or leave nothing, and options checked before the slow work.

Each class is tested on several routes into it, through the Python API and the CLI's ``main``.
Models are the random tiny models of :mod:`qcore.tiny`; text is read by a character-level
tokenizer built here (no download)."""
from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qcore
from qcore import checkpoint
from qcore.cli import main
from qcore.data import read_texts
from qcore.plugin.errors import (
    CalibrationError,
    CompatibilityError,
    ConfigError,
    NonFiniteError,
    QcoreError,
)
from qcore.registry import get_method
from qcore.testing import char_tokenizer, tiny_calibration
from qcore.tiny import tiny_model

GROUP = 32
TEXT = " ".join(string.ascii_letters + string.digits for _ in range(60))  # ~3.7k characters = tokens


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    return char_tokenizer(tmp_path / "tok")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Exit code and the one-line error (or the printed output) of ``qcore ARGS``."""
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.err + cap.out


# ----------------------------------------------------------------------------------------------
# already quantized
# ----------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """A foreign quantized linear: int8 weight, class unknown to qcore."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("weight", torch.zeros(lin.out_features, lin.in_features, dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.float().t()


def _quantized_twice() -> nn.Module:
    model = tiny_model("llama")
    qcore.quantize(model, "rtn", bits=4, group_size=GROUP)
    return model


def _loaded_checkpoint(tmp: Path) -> nn.Module:
    checkpoint.save(_quantized_twice(), tmp / "ckpt")
    return checkpoint.load(tmp / "ckpt")


def _qlora() -> nn.Module:
    pytest.importorskip("qcore_qlora")
    model = tiny_model("llama")
    qcore.quantize(model, "qlora")
    return model


def _bnb_layer() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    lin = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False)
    return model


def _foreign_int8() -> nn.Module:
    model = tiny_model("llama")
    model.model.layers[1].self_attn.o_proj = Int8Linear(model.model.layers[1].self_attn.o_proj)
    return model


def _hf_quantization_config() -> nn.Module:
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    return model


QUANTIZED_ROUTES = {
    "quantized twice in one process": (lambda tmp: _quantized_twice(), "QuantLinear"),
    "loaded by qcore.load": (_loaded_checkpoint, "QuantLinear"),
    "qlora, then another method": (lambda tmp: _qlora(), "Linear4bit"),
    "a bitsandbytes layer": (lambda tmp: _bnb_layer(), "bitsandbytes Linear8bitLt"),
    "a foreign int8 linear": (lambda tmp: _foreign_int8(), "int8 weights"),
    "a config with quantization_config": (lambda tmp: _hf_quantization_config(), "quantization_config (gptq)"),
}


@pytest.mark.parametrize("route", list(QUANTIZED_ROUTES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_already_quantized_is_refused(route: str, method: str, tmp_path: Path) -> None:
    make, shown = QUANTIZED_ROUTES[route]
    model = make(tmp_path)
    verdict = qcore.check(model, method, group_size=GROUP)
    assert not verdict.ok and "already quantized" in verdict.message() and shown in verdict.message()
    assert "quantize the float model" in verdict.message()
    for check in (True, False):  # the compatibility check off does not let it through
        with pytest.raises(CompatibilityError, match="already quantized.*give them all in one run"):
            qcore.quantize(model, method, group_size=GROUP, calibration=tiny_calibration(), check=check)


def test_a_method_that_declares_it_may_take_a_quantized_model(tmp_path: Path) -> None:
    spec = get_method("rtn")
    opted = dataclasses.replace(spec, name="rtn-on-quantized",
                                capabilities=dataclasses.replace(spec.capabilities, takes_quantized=True))
    model = _quantized_twice()
    assert not qcore.check(model, spec, group_size=GROUP).ok
    assert qcore.check(model, opted, group_size=GROUP).ok


def test_cli_refuses_a_qcore_checkpoint_as_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint.save(_quantized_twice(), tmp_path / "ckpt")
    for command in (["check", str(tmp_path / "ckpt")], ["quantize", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]):
        code, text = cli(capsys, *command, "--bits", "4", "--group-size", str(GROUP))
        assert code == 1 and "already quantized" in text and "--method smoothquant gptq" in text, text
    assert not (tmp_path / "o").exists()


def test_qlora_checkpoint_saved_by_the_cli_loads_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("qcore_qlora")
    code, text = cli(capsys, "quantize", "tiny-llama", "-m", "qlora", "--out", str(tmp_path / "q"))
    assert code == 0, text
    model = checkpoint.load(tmp_path / "q")
    logits = model(torch.randint(3, 128, (1, 16))).logits
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------------------------
def _poison(model: nn.Module, where: str, value: float) -> None:
    with torch.no_grad():
        model.get_parameter(where).view(-1)[3] = value


def _hook_output(module: nn.Module, value: float, column: int = 5) -> None:
    def hook(_m: nn.Module, _a: tuple, out: Any) -> Any:
        first = (out[0] if isinstance(out, tuple) else out).clone()
        first[..., column] = value
        return (first, *out[1:]) if isinstance(out, tuple) else first
    module.register_forward_hook(hook)


WEIGHT_CASES = [  # (method, parameter, value)
    ("rtn", "model.layers.1.mlp.up_proj.weight", float("nan")),
    ("hqq", "model.layers.0.self_attn.k_proj.weight", float("inf")),
    ("awq", "model.layers.1.post_attention_layernorm.weight", float("nan")),  # a norm, not a linear
    ("smoothquant", "model.embed_tokens.weight", float("-inf")),
    ("gptq", "lm_head.weight", float("nan")),
]


@pytest.mark.parametrize(("method", "where", "value"), WEIGHT_CASES)
def test_nonfinite_weights_are_named(method: str, where: str, value: float) -> None:
    model = tiny_model("llama")
    _poison(model, where, value)
    verdict = qcore.check(model, method, group_size=GROUP)
    assert not verdict.ok and f"non-finite values in the model's weights: {where}" in verdict.message()
    with pytest.raises(CompatibilityError, match=where.replace(".", r"\.")):
        qcore.quantize(model, method, group_size=GROUP, calibration=tiny_calibration())
    with pytest.raises(NonFiniteError, match=where.replace(".", r"\.")):  # the engine checks too
        qcore.quantize(model, method, group_size=GROUP, calibration=tiny_calibration(), check=False)


ACTIVATION_CASES = [  # (method, module whose output is poisoned, value, expected text)
    ("gptq", "model.layers.1.mlp.act_fn", float("nan"), "'hessian' statistic of model.layers.1.mlp.down_proj"),
    ("awq", "model.layers.0.self_attn.v_proj", float("inf"), "'absmean' statistic of model.layers.0."),
    ("smoothquant", "model.layers.1.input_layernorm", float("nan"), "model.layers.1.self_attn.q_proj"),
    # the block's last linear: no statistic sees it, the block output check does
    ("gptq", "model.layers.0.mlp", float("nan"),
     "output of the quantized block model.layers.0 on calibration batch 0, first at the output of "
     "model.layers.0.mlp (LlamaMLP)"),
    ("awq", "model.layers.1.self_attn", float("nan"), "first at the output of model.layers.1.self_attn"),
    ("gptq", "model.embed_tokens", float("inf"), "input of the first block model.layers.0"),
]


@pytest.mark.parametrize(("method", "where", "value", "expected"), ACTIVATION_CASES)
def test_nonfinite_activations_are_named(method: str, where: str, value: float, expected: str) -> None:
    model = tiny_model("llama")
    _hook_output(model.get_submodule(where), value)
    with pytest.raises(NonFiniteError) as info:
        qcore.quantize(model, method, group_size=GROUP, calibration=tiny_calibration())
    assert expected in str(info.value), str(info.value)


def test_nonfinite_quantization_result_is_named() -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # finite weights whose range (max - min) overflows float32
        model.model.layers[0].mlp.gate_proj.weight[0, :2] = torch.tensor([3e38, -3e38])
    with pytest.raises(NonFiniteError, match="quantizing model.layers.0.mlp.gate_proj gave non-finite"):
        qcore.quantize(model, "rtn", group_size=GROUP)


def test_nan_perplexity_is_an_error(tmp_path: Path, tok_dir: Path, text_file: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    from qcore.eval import perplexity

    model = tiny_model("llama")
    _hook_output(model.model.layers[1].mlp, float("nan"))
    ids = torch.randint(3, 100, (1, 256))
    with pytest.raises(NonFiniteError, match="loss is nan on evaluation windows 0-"):
        perplexity(model, ids, seq_len=64)
    broken = tiny_model("llama")
    _poison(broken, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    broken.save_pretrained(tmp_path / "broken")
    code, text = cli(capsys, "eval", str(tmp_path / "broken"), "--tokenizer", str(tok_dir), "--data", str(text_file),
                     "--eval-seq-len", "64")
    assert code == 1 and "loss is nan" in text and "no perplexity" in text, text


# ----------------------------------------------------------------------------------------------
# architectures the introspection does not understand
# ----------------------------------------------------------------------------------------------
def _mamba() -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mamba", vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2,
                                  intermediate_size=128, conv_kernel=4, time_step_rank=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix_a, self.mix_b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix_b(torch.relu(self.mix_a(x)))


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


ARCH_CASES = {
    "a state-space model (mamba)": (_mamba, "architecture 'mamba' is not understood", "mixer.in_proj"),
    "a custom module of unknown linears": (Custom, "architecture 'Custom' is not understood", "layers.0.mix_a"),
    "no block list": (lambda: nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                      "no block list found", "BLOCK_PATH_OVERRIDES"),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_architecture_not_understood_is_refused(case: str) -> None:
    make, reason, detail = ARCH_CASES[case]
    model = make()
    verdict = qcore.check(model, "rtn", group_size=-1)
    assert not verdict.ok and reason in verdict.message() and detail in verdict.message(), verdict.message()
    with pytest.raises(QcoreError, match=reason):
        qcore.quantize(model, "rtn", group_size=-1)


def test_cli_check_reports_an_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _mamba().save_pretrained(tmp_path / "mamba")
    code, text = cli(capsys, "check", str(tmp_path / "mamba"), "--group-size", "-1")
    assert code == 1 and "REFUSED" in text and "not understood" in text and "--ignore '*.mixer" in text, text


def test_keeping_the_unknown_linears_in_float_is_the_working_fix() -> None:
    model = _mamba()
    ids = torch.randint(3, 128, (1, 12))
    ref = model(ids).logits
    ignore = ["*.mixer.in_proj", "*.mixer.x_proj", "*.mixer.dt_proj"]
    assert qcore.check(model, "rtn", group_size=-1, ignore=ignore).ok
    qcore.quantize(model, "rtn", bits=8, group_size=-1, ignore=ignore)
    out = model(ids).logits  # the forward runs (out_proj quantized, the mixer's own linears float)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------
# ignore patterns and per-layer maps
# ----------------------------------------------------------------------------------------------
IGNORE_CASES = [  # (options, expected text)
    ({"ignore": ["model.layers.0"]}, "use 'model.layers.0.*'"),
    ({"ignore": ["*.mlp.down_prj"]}, "matches no module of this model (close names: *.mlp.down_proj"),
    ({"ignore": ["*"]}, "nothing is left to quantize"),
    ({"ignore": ["*proj"]}, "keeps all 14 quantizable linears in float"),
    ({"ignore": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.mlp.*"]}, "nothing is left"),
    ({"bits": {"default": 4, "*.mlp.dwn_proj": 8}}, "bits pattern '*.mlp.dwn_proj' matches no quantizable linear"),
    ({"group_size": {"default": 32, "model.layer.*": 64}}, "group_size pattern 'model.layer.*' matches no"),
]


@pytest.mark.parametrize(("options", "expected"), IGNORE_CASES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_patterns_that_match_nothing_or_leave_nothing(options: dict, expected: str, method: str) -> None:
    model = tiny_model("llama")
    options = {"group_size": GROUP, **options}
    verdict = qcore.check(model, method, **options)
    assert not verdict.ok and expected in verdict.message(), verdict.message()
    with pytest.raises(ConfigError, match="pattern|ignore="):
        qcore.quantize(model, method, calibration=tiny_calibration(), **options)


def test_patterns_of_never_quantized_modules_are_fine() -> None:
    model = tiny_model("qwen3_moe")
    assert qcore.check(model, "rtn", group_size=GROUP, ignore=["lm_head", "*.mlp.gate", "*.layers.0.*"]).ok


def test_cli_ignore_errors_speak_in_flags(capsys: pytest.CaptureFixture) -> None:
    code, text = cli(capsys, "check", "tiny-llama", "--group-size", "32", "--ignore", "*")
    assert code == 1 and "--ignore '*' keeps all" in text and "ignore=" not in text, text


# ----------------------------------------------------------------------------------------------
# options, checked before the slow work and against the model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"n_samples": 0}, "n_samples must be at least 1, got 0"),
    ({"n_samples": -8}, "n_samples must be at least 1"),
    ({"n_samples": 2.5}, "n_samples must be a whole number, got 2.5"),
    ({"n_samples": 16.0}, "n_samples must be a whole number, got 16.0 (a float); write 16"),
    ({"n_samples": True}, "n_samples must be a whole number"),
    ({"seq_len": 0}, "seq_len must be at least 1"),
    ({"seq_len": "64"}, "seq_len must be a whole number"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"seq_len": 129}, "seq_len=129 is longer than the 128 positions this model was built for"),
    ({"device": "cuda:7"}, "device='cuda:7' cannot be used"),
    ({"device": "not-a-device"}, "is not a device name"),
])
def test_run_options(kwargs: dict, expected: str, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ConfigError) as info:
        qcore.quantize(tiny_model("llama"), "gptq", group_size=GROUP, calibration=[TEXT],
                       tokenizer=AutoTokenizer.from_pretrained(tok_dir), **{"n_samples": 4, **kwargs})
    assert expected in str(info.value)


def test_ready_calibration_windows_longer_than_the_model_are_refused() -> None:
    with pytest.raises(ConfigError, match="seq_len=200 is longer than the 128 positions"):
        qcore.quantize(tiny_model("gpt2"), "gptq", group_size=GROUP, calibration=tiny_calibration(seq_len=200))


def test_token_ids_past_the_vocabulary_are_refused() -> None:
    """A tokenizer of another (larger) model gives ids the embedding cannot look up."""
    from qcore.eval import perplexity

    with pytest.raises(ConfigError, match="the calibration data holds token id .* embedding has 128 rows"):
        qcore.quantize(tiny_model("llama"), "gptq", group_size=GROUP, calibration=tiny_calibration(vocab_size=512))
    with pytest.raises(ConfigError, match="the evaluation text holds token id 300"):
        perplexity(tiny_model("llama"), torch.full((1, 64), 300), seq_len=32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_cuda_on_a_cpu_build_is_refused_up_front(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qcore.cli._load_model", _no_load)
    code, text = cli(capsys, "quantize", "tiny-llama", "-m", "gptq", "--device", "cuda", "--out", "/nonexistent/x")
    assert code == 1 and "--device cuda cannot be used" in text and "--device cpu" in text, text


def _no_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before the options were checked")


@pytest.mark.parametrize(("args", "expected"), [
    (["--bits", "99"], "rtn supports weight bits"),
    (["-o", "nosuch=1"], "unknown option(s) nosuch"),
    (["--n-samples", "0", "-m", "gptq"], "--n-samples must be at least 1"),
    (["--seq-len", "-5", "-m", "gptq"], "--seq-len must be at least 1"),
    (["--group-size", "0"], "--group-size"),
    (["-m", "gptq", "-o", "damp_percent=3"], "damp_percent must be in (0, 1)"),
    (["-m", "rtn", "qlora"], "cannot follow"),
    (["--eval", "--eval-tokens", "0"], "--eval-tokens must be at least 1"),
])
def test_option_errors_come_before_the_model_load(args: list[str], expected: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qcore.cli._load_model", _no_load)
    code, text = cli(capsys, "quantize", "tiny-llama", *args, "--out", str(tmp_path / "o"))
    assert code == 1 and expected in text, text
    assert "n_samples" not in text and "seq_len" not in text and "group_size" not in text, text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("content", "expected"), [
    (None, "neither an existing file"),  # missing
    ("", "holds no text"),
    ("   \n\n", "holds no text"),
    (b"\xff\xfe\x00bad", "is not UTF-8 text"),
])
def test_calibration_file_errors_name_the_file(content: str | bytes | None, expected: str, tmp_path: Path,
                                               tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "calib.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, text = cli(capsys, "quantize", "tiny-llama", "-m", "gptq", "--group-size", "32", "--tokenizer", str(tok_dir),
                     "--calibration", str(path), "--n-samples", "4", "--seq-len", "64", "--out", str(tmp_path / "o"))
    assert code == 1 and expected in text and str(path) in text, text
    with pytest.raises(CalibrationError, match=expected):
        read_texts(path) if content is not None else read_texts(str(path))


def test_calibration_directory_without_text(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    with pytest.raises(CalibrationError, match=f"the .txt files of directory {tmp_path / 'd'} hold|holds no text"):
        read_texts(tmp_path / "d")


@pytest.mark.parametrize(("content", "expected"), [
    ('{"bits": 4,', "is not valid JSON (line 1"),
    ("[4, 128]", "holds a JSON list, not an object"),
    (None, "cannot read it"),
])
def test_config_file_errors_name_the_file(content: str | None, expected: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "opts.json"
    if content is not None:
        path.write_text(content)
    code, text = cli(capsys, "check", "tiny-llama", "--config", str(path))
    assert code == 1 and f"--config {path}" in text and expected in text, text


def test_tokenizer_flag_reads_text_for_a_model_without_one(tmp_path: Path, tok_dir: Path, text_file: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    common = ["quantize", "tiny-llama", "-m", "gptq", "--group-size", "32", "--calibration", str(text_file),
              "--n-samples", "4", "--seq-len", "64"]
    code, text = cli(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 1 and "comes without a tokenizer" in text and "--tokenizer FOLDER" in text, text
    code, text = cli(capsys, *common, "--tokenizer", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "a"))
    assert code == 1 and f"--tokenizer {tmp_path / 'nothing-here'}" in text, text
    code, text = cli(capsys, *common, "--tokenizer", str(tok_dir), "--out", str(tmp_path / "b"))
    assert code == 0, text
    record = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "gptq" in json.dumps(record) and (tmp_path / "b" / "tokenizer.json").is_file()


def test_default_window_fits_a_short_model(tmp_path: Path, tok_dir: Path, text_file: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """No --seq-len: 512 capped at the model's 128 positions (gpt2 cannot run past them)."""
    code, text = cli(capsys, "quantize", "tiny-gpt2", "-m", "gptq", "--group-size", "32", "--tokenizer", str(tok_dir),
                     "--calibration", str(text_file), "--n-samples", "4", "--out", str(tmp_path / "g"))
    assert code == 0, text
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert '"seq_len": 128' in json.dumps(config)
