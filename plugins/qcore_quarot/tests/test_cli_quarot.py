"""The qcore command with QuaRot: ``--a-bits`` / ``--kv-bits`` reach the methods that have them
(and are refused by name for the others), and ``qcore info`` shows the rotations."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from qcore.cli import build_parser, main, parse_options
from qcore.testing import STORIES_DIR, requires_shared
from qcore.tiny import tiny_model


def test_generic_flags_are_options() -> None:
    args = build_parser().parse_args(["check", "m", "--method", "quarot", "gptq", "--bits", "4",
                                      "--a-bits", "4", "--kv-bits", "8"])
    assert args.method == ["quarot", "gptq"]
    assert parse_options(args) == {"bits": 4, "a_bits": 4, "kv_bits": 8}


def test_kv_bits_for_a_method_without_it_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    rc = main(["quantize", str(tmp_path / "tiny"), "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--kv-bits", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"unknown option\(s\) (--kv-bits|kv_bits) for method 'gptq'", err), err
    assert "valid options" in err
    assert not (tmp_path / "out").exists()


@requires_shared
def test_quantize_quarot_gptq_a4_kv4_and_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "w4a4kv4"
    assert main(["quantize", str(STORIES_DIR), "--method", "quarot", "gptq", "--bits", "4", "--group-size", "-1",
                 "--a-bits", "4", "--kv-bits", "4", "--n-samples", "8", "--seq-len", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("quarot: R1: random Hadamard 64 (sylvester 64) on the residual stream, fused",
                 "quarot: R2: Hadamard 8 (sylvester 8) per head on v -> o, 5 attentions, fused",
                 "quarot: R4: online Hadamard 172 (williamson 172) before 5 down projections",
                 "quarot: R3: online Hadamard 8 (sylvester 8) on queries and keys after RoPE, 5 attentions",
                 "quarot: KV cache: 4-bit asymmetric per token and head, groups of whole head",
                 "quarot: activations: 4-bit per token, symmetric",
                 "other serialized modules: quarot.online_hadamard x5, quarot.qkv_transform x5"):
        assert line in text, text
    assert "gptq(bits=4" in text
