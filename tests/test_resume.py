"""Resumable streamed runs: killed (SIGKILL) or interrupted (Ctrl-C) at several points, the same
call continues after the last finished block and writes the checkpoint of an uninterrupted run;
other options or data refuse to resume; the state folder survives other writes of the output."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from qcore.checkpoint import atomic_dir
from qcore.checkpoint.atomic import PARTIAL_INFIX, TMP_INFIX
from qcore.pipeline import stream
from qcore.plugin.errors import CheckpointError


def _sibling(name: str) -> Any:
    """A module of this folder (pytest's importlib mode puts none on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"qcore_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_streaming = _sibling("test_streaming")
OPTS, assert_same_checkpoint, calib_ids, make_src = (_streaming.OPTS, _streaming.assert_same_checkpoint,
                                                     _streaming.calib_ids, _streaming.make_src)

CHAIN = ["awq", "gptq"]
LAYERS = 4

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import qcore
    from qcore.checkpoint import streaming
    from qcore.pipeline import stream

    src, out, point, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "inside_block":  # block k loaded, halfway through its quantization
        from qcore.pipeline.engine import BlockContext
        quantize_linear = BlockContext.quantize_linear
        def q(self, name, qw):
            if self.index == k and name.endswith("o_proj"):
                die()
            return quantize_linear(self, name, qw)
        BlockContext.quantize_linear = q
    elif point == "before_state":  # block k's part and activations written, its state not yet
        write_state = stream.StreamedRun._write_state
        def w(self):
            if self.done == k + 1:
                die()
            write_state(self)
        stream.StreamedRun._write_state = w
    elif point == "after_block":  # block k finished and recorded
        finish = stream.StreamedRun.finish_block
        def f(self, index, binfo, hidden):
            finish(self, index, binfo, hidden)
            if index == k:
                die()
        stream.StreamedRun.finish_block = f
    elif point == "assembling":  # every block done, the first weight file being written
        write = streaming.write_safetensors
        def ws(path, specs, metadata=None):
            write(path, specs, metadata)
            die()
        streaming.write_safetensors = ws
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    qcore.quantize(src, %r, calibration=ids, out=out, bits=4, group_size=32)
    print("finished without being killed")
""" % (CHAIN,))


def run_killed(src: Path, out: Path, point: str, k: int, tmp_path: Path) -> None:
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(src), str(out), point, str(k)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The source folder and the checkpoint of an uninterrupted streamed run of CHAIN."""
    tmp = tmp_path_factory.mktemp("ref")
    src = make_src(tmp / "src", layers=LAYERS)
    return src, qcore.quantize(str(src), CHAIN, calibration=calib_ids(), out=tmp / "ref", **OPTS)


def state_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_INFIX}"


@pytest.mark.parametrize(("point", "k", "done"), [("inside_block", 1, 1), ("before_state", 2, 2),
                                                  ("after_block", 0, 1), ("assembling", 0, LAYERS)])
def test_killed_run_resumes_to_the_uninterrupted_checkpoint(reference: tuple[Path, Path], tmp_path: Path,
                                                            point: str, k: int, done: int,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    src, ref = reference
    out = tmp_path / "out"
    run_killed(src, out, point, k, tmp_path)
    assert not out.exists()
    state = json.loads((state_dir(out) / stream.STATE_FILE).read_text())
    assert state["done"] == done
    with caplog.at_level(logging.WARNING, logger="qcore"):
        qcore.quantize(str(src), CHAIN, calibration=calib_ids(), out=out, **OPTS)
    assert f"after block {done} of {LAYERS}" in caplog.text
    assert_same_checkpoint(ref, out)
    assert not state_dir(out).exists()
    assert not list(tmp_path.glob(f".out{TMP_INFIX}*")), "the killed process's temporary folder is cleaned"


def test_other_options_or_data_refuse_to_resume(reference: tuple[Path, Path], tmp_path: Path) -> None:
    src, ref = reference
    out = tmp_path / "out"
    run_killed(src, out, "after_block", 1, tmp_path)
    with pytest.raises(CheckpointError, match="other methods or options.*--restart"):
        qcore.quantize(str(src), CHAIN, calibration=calib_ids(), out=out, bits=3, group_size=32)
    with pytest.raises(CheckpointError, match="other calibration data"):
        qcore.quantize(str(src), CHAIN, calibration=calib_ids(seed=5), out=out, **OPTS)
    with pytest.raises(CheckpointError, match="other methods or options"):
        qcore.quantize(str(src), "gptq", calibration=calib_ids(), out=out, **OPTS)
    assert json.loads((state_dir(out) / stream.STATE_FILE).read_text())["done"] == 2, "a refusal keeps the state"
    fresh = qcore.quantize(str(src), "gptq", calibration=calib_ids(), out=out, restart=True, **OPTS)
    expected = qcore.quantize(str(src), "gptq", calibration=calib_ids(), out=tmp_path / "expected", **OPTS)
    assert_same_checkpoint(expected, fresh)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(reference: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from qcore.cli import main

    src, _ = reference
    out = tmp_path / "out"
    load = stream.StreamedRun.load_block

    def interrupt_at_2(self: stream.StreamedRun, index: int, binfo: Any) -> None:
        if index == 2:
            raise KeyboardInterrupt
        load(self, index, binfo)

    monkeypatch.setattr(stream.StreamedRun, "load_block", interrupt_at_2)
    args = ["quantize", str(src), "--stream", "--out", str(out), "-m", "rtn", "--bits", "4", "--group-size", "32"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "stopped after 2 of 4 blocks" in err and "rerun the same command to resume" in err
    assert not out.exists()
    monkeypatch.setattr(stream.StreamedRun, "load_block", load)
    assert main(args) == 0
    expected = qcore.quantize(str(src), "rtn", out=tmp_path / "expected", **OPTS)
    assert_same_checkpoint(expected, out)


def test_state_survives_other_writes_and_abandoned_state_is_reported(reference: tuple[Path, Path], tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    src, _ = reference
    out = tmp_path / "out"
    run_killed(src, out, "after_block", 0, tmp_path)
    dead_tmp = tmp_path / f".out{TMP_INFIX}999999999-x"  # a temporary folder of a process that is gone
    dead_tmp.mkdir()
    with caplog.at_level(logging.WARNING, logger="qcore"), atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert not dead_tmp.exists()
    assert state_dir(out).is_dir() and (state_dir(out) / stream.STATE_FILE).is_file()
    assert "rerun the same command to resume" in caplog.text


def test_two_processes_cannot_share_a_state_folder(tmp_path: Path) -> None:
    first = stream.StreamedRun(None, None, tmp_path / "state", {"x": 1})  # type: ignore[arg-type]
    try:
        with pytest.raises(CheckpointError, match="another qcore process"):
            stream.StreamedRun(None, None, tmp_path / "state", {"x": 1})  # type: ignore[arg-type]
    finally:
        first.close()
    stream.StreamedRun(None, None, tmp_path / "state", {"x": 1}).close()  # type: ignore[arg-type]


def test_hidden_states_on_disk_are_the_next_blocks_inputs(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """The kept activations are exactly what the uninterrupted run fed the next block."""
    src, _ = reference
    out = tmp_path / "out"
    run_killed(src, out, "after_block", 1, tmp_path)
    from safetensors.torch import load_file

    kept = load_file(str(state_dir(out) / stream.HIDDEN_FILE.format(index=2)))
    assert len(kept) == 1 and all(torch.isfinite(t).all() for t in kept.values())
    assert not (state_dir(out) / stream.HIDDEN_FILE.format(index=1)).exists(), "older activations are dropped"
