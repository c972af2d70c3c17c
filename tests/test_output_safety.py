"""No write of qcore's can delete a user's files: only a folder qcore wrote is replaced, only when
asked, never the input; interrupted writes are cleaned up; permissions follow the umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import qcore
from qcore import checkpoint
from qcore.plugin.errors import CheckpointError
from qcore.tiny import tiny_model


def quantized():
    model = tiny_model("llama")
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    return model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def qcore_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcore.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=dict(os.environ, QCORE_PROGRESS="0"))


@pytest.fixture
def float_dir(tmp_path: Path) -> Path:
    """A float Hugging Face folder with a file of the user's beside the weights."""
    model = tiny_model("llama")
    path = tmp_path / "my-model"
    model.save_pretrained(path)
    (path / "NOTES.md").write_text("my notes")
    return path


def test_cli_out_equal_to_the_input_is_refused_and_nothing_is_deleted(float_dir: Path) -> None:
    before = snapshot(float_dir)
    for extra in ([], ["--overwrite"]):
        out = qcore_cli("quantize", str(float_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                        "--out", str(float_dir), *extra, cwd=float_dir.parent)
        assert out.returncode == 1 and "input model" in out.stderr, out.stderr
    assert snapshot(float_dir) == before


def test_cli_out_dot_in_a_model_folder_is_refused(float_dir: Path) -> None:
    before = snapshot(float_dir)
    out = qcore_cli("quantize", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "32",
                    "--out", ".", "--overwrite", cwd=float_dir)
    assert out.returncode == 1 and "current directory" in out.stderr, out.stderr
    assert snapshot(float_dir) == before


def test_cli_needs_overwrite_to_replace_its_own_output(tmp_path: Path) -> None:
    args = ["quantize", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", "q"]
    assert qcore_cli(*args, cwd=tmp_path).returncode == 0
    first = snapshot(tmp_path / "q")
    again = qcore_cli(*args, cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr, again.stderr
    assert snapshot(tmp_path / "q") == first
    assert qcore_cli(*args, "--overwrite", cwd=tmp_path).returncode == 0


def test_a_users_file_inside_a_qcore_output_blocks_replacement(tmp_path: Path) -> None:
    target = checkpoint.save(quantized(), tmp_path / "ck")
    (target / "eval-notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="eval-notes.txt"):
        checkpoint.save(quantized(), target, overwrite=True)
    assert (target / "eval-notes.txt").read_text() == "mine"


def test_a_folder_without_the_marker_is_never_replaced(tmp_path: Path) -> None:
    target = checkpoint.save(quantized(), tmp_path / "ck")
    (target / checkpoint.MARKER_FILE).unlink()  # e.g. a checkpoint copied by hand, or any other folder
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="not written by qcore"):
        checkpoint.save(quantized(), target, overwrite=True)
    assert snapshot(target) == before


def test_save_refuses_the_folder_the_model_was_read_from(float_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    qcore.quantize(model, "rtn", bits=4, group_size=32)
    before = snapshot(float_dir)
    with pytest.raises(CheckpointError, match="input model"):
        checkpoint.save(model, float_dir, overwrite=True)
    assert snapshot(float_dir) == before


def test_leftovers_of_interrupted_writes_are_cleaned(tmp_path: Path) -> None:
    target = checkpoint.save(quantized(), tmp_path / "ck")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".ck{checkpoint.TMP_INFIX}{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".ck{checkpoint.OLD_INFIX}1234abcd"
    old.mkdir()
    checkpoint.save(quantized(), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        target = checkpoint.save(quantized(), tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_single_files_are_replaced_atomically_and_follow_the_umask(tmp_path: Path, umask: int) -> None:
    target = checkpoint.write_json(tmp_path / "sub" / "report.json", {"ppl": 1.5})
    old = os.umask(umask)
    try:
        with pytest.raises(OSError, match="injected"), checkpoint.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError("injected")
        assert target.read_text() == '{\n  "ppl": 1.5\n}\n'  # the earlier file is intact
        checkpoint.write_json(target, {"ppl": 2.5})
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
