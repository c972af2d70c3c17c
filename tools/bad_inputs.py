"""Run qcore on bad inputs and write the table of what each gives: docs/bad-inputs.md.

    python tools/bad_inputs.py > docs/bad-inputs.md

Every row is produced by actually running the case (the CLI's ``main`` in this process, or the
Python API) on qcore's random tiny models and a character-level tokenizer built here, in a
temporary folder (shown as ``$TMP``). Takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("QCORE_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TEXT = " ".join(string.ascii_letters + string.digits for _ in range(60))


@dataclass
class Case:
    group: str
    what: str
    how: str
    run: Callable[[Path], tuple[str, str]]


def cli(*argv: str) -> Callable[[Path], tuple[str, str]]:
    def run(tmp: Path) -> tuple[str, str]:
        from qcore.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([a.replace("$TMP", str(tmp)) for a in argv])
        text = (err.getvalue() or out.getvalue()).strip()
        return f"exit {code}", text
    return run


def api(fn: Callable[[Path], Any]) -> Callable[[Path], tuple[str, str]]:
    def run(tmp: Path) -> tuple[str, str]:
        try:
            result = fn(tmp)
        except Exception as exc:  # noqa: BLE001 - the table shows whatever is raised
            return type(exc).__name__, str(exc)
        return "no error", str(result or "")
    return run


# -- fixtures written once into the temporary folder -------------------------------------------
def prepare(tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import qcore
    from qcore.testing import char_tokenizer
    from qcore.tiny import tiny_model

    char_tokenizer(tmp / "tok")
    tiny_model("llama").save_pretrained(tmp / "model")
    (tmp / "model" / "NOTES.md").write_text("my notes")
    broken = tiny_model("llama")
    with torch.no_grad():
        broken.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp / "broken")
    quantized = tiny_model("llama")
    qcore.quantize(quantized, "rtn", bits=4, group_size=32)
    qcore.save(quantized, tmp / "ckpt")
    config = AutoConfig.for_model("mamba", vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2,
                                  intermediate_size=128, conv_kernel=4, time_step_rank=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "mamba")
    (tmp / "calib.txt").write_text(TEXT)
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (tmp / "bad.json").write_text('{"bits": 4,')
    (tmp / "list.json").write_text("[4, 128]")
    (tmp / "other").mkdir()
    (tmp / "other" / "thesis.tex").write_text("years of work")


# -- API cases -----------------------------------------------------------------------------------
def _tiny():
    from qcore.tiny import tiny_model

    return tiny_model("llama")


def twice(tmp: Path) -> Any:
    import qcore

    model = _tiny()
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    return qcore.quantize(model, "rtn", bits=3, group_size=32) and "quantized again"


def qlora_then(tmp: Path) -> Any:
    import qcore

    model = _tiny()
    qcore.quantize(model, "qlora")
    return qcore.quantize(model, "gptq", group_size=32, calibration=_calib()) and "quantized again"


def bnb_layer(tmp: Path) -> Any:
    import bitsandbytes as bnb

    import qcore

    model = _tiny()
    lin = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False)
    return qcore.quantize(model, "rtn", group_size=32) and "quantized"


def hf_quantized(tmp: Path) -> Any:
    import qcore

    model = _tiny()
    model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    return qcore.quantize(model, "rtn", group_size=32) and "quantized"


def _calib():
    from qcore.testing import tiny_calibration

    return tiny_calibration()


def poisoned(where: str, value: float, method: str, check: bool = True) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        import torch

        import qcore

        model = _tiny()
        with torch.no_grad():
            model.get_parameter(where).view(-1)[3] = value
        return qcore.quantize(model, method, group_size=32, calibration=_calib(), check=check) and "quantized"
    return run


def hooked(module: str, value: float, method: str) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        import qcore

        model = _tiny()

        def hook(_m: Any, _a: Any, out: Any) -> Any:
            first = (out[0] if isinstance(out, tuple) else out).clone()
            first[..., 5] = value
            return (first, *out[1:]) if isinstance(out, tuple) else first
        model.get_submodule(module).register_forward_hook(hook)
        return qcore.quantize(model, method, group_size=32, calibration=_calib()) and "quantized"
    return run


def overflow(tmp: Path) -> Any:
    import torch

    import qcore

    model = _tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, :2] = torch.tensor([3e38, -3e38])
    return qcore.quantize(model, "rtn", group_size=32) and "quantized"


def custom_module(tmp: Path) -> Any:
    from torch import nn

    import qcore

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix_a, self.mix_b = nn.Linear(32, 64), nn.Linear(64, 32)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    return qcore.quantize(Custom(), "rtn", group_size=-1) and "quantized"


def no_blocks(tmp: Path) -> Any:
    from torch import nn

    import qcore

    return qcore.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), "rtn", group_size=-1)


def opts(**kwargs: Any) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        from transformers import AutoTokenizer

        import qcore

        return qcore.quantize(_tiny(), "gptq", group_size=32, calibration=[TEXT],
                              tokenizer=AutoTokenizer.from_pretrained(tmp / "tok"),
                              **{"n_samples": 4, "seq_len": 64, **kwargs}) and "quantized"
    return run


def other_vocab(tmp: Path) -> Any:
    import qcore
    from qcore.testing import tiny_calibration

    return qcore.quantize(_tiny(), "gptq", group_size=32, calibration=tiny_calibration(vocab_size=512)) and "quantized"


def qlora_round_trip(tmp: Path) -> Any:
    import torch

    import qcore

    code, text = cli("quantize", "tiny-llama", "-m", "qlora", "--out", "$TMP/qlora")(tmp)
    if code != "exit 0":
        raise RuntimeError(text)
    model = qcore.load(tmp / "qlora")
    logits = model(torch.randint(3, 128, (1, 16))).logits
    return f"saved, loaded by qcore.load, forward runs (logits finite: {bool(torch.isfinite(logits).all())})"


def nan_perplexity(tmp: Path) -> Any:
    import torch

    from qcore.eval import perplexity

    model = _tiny()
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * float("nan"))
    return perplexity(model, torch.randint(3, 100, (1, 256)), seq_len=64)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


T = "--tokenizer"
GPTQ = ["-m", "gptq", "--group-size", "32", "--n-samples", "4", "--seq-len", "64"]
CASES: list[Case] = [
    # output safety
    Case("output safety", "--out is the input model folder", "qcore quantize $TMP/model --out $TMP/model --overwrite",
         cli("quantize", "$TMP/model", "--group-size", "32", "--out", "$TMP/model", "--overwrite")),
    Case("output safety", "--out is a folder of other files", "qcore quantize tiny-llama --out $TMP/other --overwrite",
         cli("quantize", "tiny-llama", "--group-size", "32", "--out", "$TMP/other", "--overwrite")),
    Case("output safety", "--out is an earlier qcore output, no --overwrite", "qcore quantize tiny-llama --out $TMP/ckpt",
         cli("quantize", "tiny-llama", "--group-size", "32", "--out", "$TMP/ckpt")),
    # already quantized
    Case("already quantized", "quantized twice in one process", "qcore.quantize(model, 'rtn') twice", api(twice)),
    Case("already quantized", "a qcore checkpoint", "qcore check $TMP/ckpt", cli("check", "$TMP/ckpt")),
    Case("already quantized", "a qcore checkpoint", "qcore quantize $TMP/ckpt --out $TMP/again",
         cli("quantize", "$TMP/ckpt", "--out", "$TMP/again")),
    Case("already quantized", "QLoRA, then another method", "qcore.quantize(qlora_model, 'gptq')", api(qlora_then)),
    Case("already quantized", "a bitsandbytes layer", "Linear8bitLt in a float model", api(bnb_layer)),
    Case("already quantized", "a model with a quantization_config", "config.quantization_config = {awq}",
         api(hf_quantized)),
    Case("QLoRA checkpoint", "save and load a QLoRA model", "qcore quantize tiny-llama -m qlora --out DIR; qcore.load(DIR)",
         api(qlora_round_trip)),
    # non-finite
    Case("non-finite", "NaN in a linear's weight", "rtn", api(poisoned("model.layers.1.mlp.up_proj.weight", float("nan"), "rtn"))),
    Case("non-finite", "inf in a norm's weight", "awq",
         api(poisoned("model.layers.1.post_attention_layernorm.weight", float("inf"), "awq"))),
    Case("non-finite", "NaN in a weight, compatibility check off", "hqq, check=False",
         api(poisoned("model.embed_tokens.weight", float("nan"), "hqq", check=False))),
    Case("non-finite", "NaN activations inside a block", "gptq, hook on model.layers.1.mlp.act_fn",
         api(hooked("model.layers.1.mlp.act_fn", float("nan"), "gptq"))),
    Case("non-finite", "inf at an attention output", "smoothquant, hook on model.layers.0.self_attn",
         api(hooked("model.layers.0.self_attn", float("inf"), "smoothquant"))),
    Case("non-finite", "NaN at a block's last module", "gptq, hook on model.layers.0.mlp",
         api(hooked("model.layers.0.mlp", float("nan"), "gptq"))),
    Case("non-finite", "finite weights whose range overflows", "rtn, weights +-3e38", api(overflow)),
    Case("non-finite", "perplexity of a model giving NaN", "qcore.eval.perplexity", api(nan_perplexity)),
    Case("non-finite", "qcore eval of a model with a NaN weight", "qcore eval $TMP/broken",
         cli("eval", "$TMP/broken", T, "$TMP/tok", "--data", "$TMP/calib.txt", "--eval-seq-len", "64")),
    # architecture
    Case("architecture", "a state-space model (Mamba)", "qcore check $TMP/mamba --group-size -1",
         cli("check", "$TMP/mamba", "--group-size", "-1")),
    Case("architecture", "a custom module of unknown linears", "qcore.quantize(Custom(), 'rtn')", api(custom_module)),
    Case("architecture", "no block list", "qcore.quantize(nn.Sequential(...), 'rtn')", api(no_blocks)),
    # ignore and per-layer patterns
    Case("patterns", "--ignore names a block", "--ignore model.layers.0",
         cli("check", "tiny-llama", "--group-size", "32", "--ignore", "model.layers.0")),
    Case("patterns", "--ignore with a typo", "--ignore '*.mlp.down_prj'",
         cli("check", "tiny-llama", "--group-size", "32", "--ignore", "*.mlp.down_prj")),
    Case("patterns", "--ignore leaves nothing", "--ignore '*'",
         cli("check", "tiny-llama", "--group-size", "32", "--ignore", "*")),
    Case("patterns", "a per-layer bits map with a typo", '-o bits=\'{"default": 4, "*.mlp.dwn_proj": 8}\'',
         cli("check", "tiny-llama", "--group-size", "32", "-o", 'bits={"default": 4, "*.mlp.dwn_proj": 8}')),
    # options
    Case("options", "zero calibration windows", "--n-samples 0",
         cli("quantize", "tiny-llama", *GPTQ, "--n-samples", "0", "--out", "$TMP/o")),
    Case("options", "a fractional count", "n_samples=2.5", api(opts(n_samples=2.5))),
    Case("options", "a negative seed", "seed=-1", api(opts(seed=-1))),
    Case("options", "windows longer than the model's positions", "--seq-len 600",
         cli("quantize", "tiny-llama", *GPTQ, "--seq-len", "600", T, "$TMP/tok", "--out", "$TMP/o")),
    Case("options", "a device this torch cannot use", "--device cuda (CPU build) / cuda:7",
         cli("quantize", "tiny-llama", *GPTQ, "--device", "cuda" if not _has_cuda() else "cuda:7", "--out", "$TMP/o")),
    Case("options", "token ids past the model's vocabulary", "calibration windows from a 512-token vocabulary",
         api(other_vocab)),
    Case("options", "unknown bit width", "--bits 99", cli("quantize", "tiny-llama", "--bits", "99", "--out", "$TMP/o")),
    Case("options", "invalid method option", "-o damp_percent=3",
         cli("quantize", "tiny-llama", *GPTQ, "-o", "damp_percent=3", "--out", "$TMP/o")),
    Case("options", "a method order that cannot chain", "-m rtn qlora",
         cli("quantize", "tiny-llama", "-m", "rtn", "qlora", "--out", "$TMP/o")),
    Case("files", "calibration file missing", "--calibration $TMP/missing.txt",
         cli("quantize", "tiny-llama", *GPTQ, T, "$TMP/tok", "--calibration", "$TMP/missing.txt", "--out", "$TMP/o")),
    Case("files", "calibration file empty", "--calibration $TMP/empty.txt",
         cli("quantize", "tiny-llama", *GPTQ, T, "$TMP/tok", "--calibration", "$TMP/empty.txt", "--out", "$TMP/o")),
    Case("files", "calibration file not UTF-8", "--calibration $TMP/latin1.txt",
         cli("quantize", "tiny-llama", *GPTQ, T, "$TMP/tok", "--calibration", "$TMP/latin1.txt", "--out", "$TMP/o")),
    Case("files", "config JSON invalid", "--config $TMP/bad.json", cli("check", "tiny-llama", "--config", "$TMP/bad.json")),
    Case("files", "config JSON not an object", "--config $TMP/list.json",
         cli("check", "tiny-llama", "--config", "$TMP/list.json")),
    Case("files", "a model without a tokenizer, method reads text", "qcore quantize tiny-llama -m gptq",
         cli("quantize", "tiny-llama", *GPTQ, "--out", "$TMP/o")),
    Case("files", "--tokenizer folder without a tokenizer", "--tokenizer $TMP/other",
         cli("quantize", "tiny-llama", *GPTQ, T, "$TMP/other", "--out", "$TMP/o")),
]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main() -> int:
    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        prepare(tmp)
        for case in CASES:
            outcome, message = case.run(tmp)
            message = message.replace(str(tmp), "$TMP")
            rows.append(f"| {case.group} | {_cell(case.what)} | `{_cell(case.how)}` | {outcome} | {_cell(message)} |")
    print("# Bad inputs and what qcore answers", "",
          "Generated by `python tools/bad_inputs.py > docs/bad-inputs.md`, which runs every case below on",
          "qcore's random tiny models (`qcore.tiny`) and a character-level tokenizer, in a temporary folder",
          "shown as `$TMP`; do not edit by hand. CLI rows show the exit code and what `qcore` printed,",
          "Python rows the exception raised. `tests/test_bad_input.py` and `tests/test_output_safety.py`",
          "test these classes, with more cases each.", "",
          "| class | input | how | result | message |", "|---|---|---|---|---|", *rows, sep="\n")
    print(f"{len(rows)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
