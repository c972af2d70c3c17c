"""Calibration shared by processes (qcore.pipeline.distributed): two gloo processes, started as
torchrun starts them (RANK / WORLD_SIZE / MASTER_* in the environment), quantize a tiny model to
the single-process result within float tolerance; what cannot be shared is refused."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from qcore.testing import STORIES_DIR, TINYSTORIES_TXT, requires_shared
from qcore.tiny import tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
OPTS: dict[str, Any] = {"bits": 4, "group_size": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, size: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "QCORE_PROGRESS": "0"}


def run_processes(spec: dict[str, Any], size: int = 2) -> list[str]:
    """Run the worker in ``size`` processes; their outputs."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=_env(r, size, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(size)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return outs


def single_process(family: str, method: str, n: int, options: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (n, 32), generator=torch.Generator().manual_seed(1))
    qcore.quantize(model, method, calibration=ids, **options)
    return model


@pytest.mark.parametrize(("family", "method"), [("llama", "gptq"), ("qwen2", "awq"), ("llama", "smoothquant")])
def test_two_processes_give_the_single_process_model(tmp_path: Path, family: str, method: str) -> None:
    options = {"w_bits": 8} if method == "smoothquant" else dict(OPTS)
    run_processes({"family": family, "method": method, "n": 8, "options": options, "out": str(tmp_path / "ckpt")})
    shared = qcore.load(tmp_path / "ckpt")
    alone = single_process(family, method, 8, options)
    x = torch.randint(3, alone.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = alone(x).logits, shared(x).logits
    # the same combined statistics up to the order of float sums: the codes agree almost everywhere
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= 2e-2 * scale, float((a - b).abs().max())
    qa = {n: m for n, m in alone.named_modules() if type(m).__name__ == "QuantLinear"}
    qb = {n: m for n, m in shared.named_modules() if type(m).__name__ == "QuantLinear"}
    assert qa.keys() == qb.keys() and qa
    same = sum(int((qa[n].dequantize_weight() == qb[n].dequantize_weight()).sum()) for n in qa)
    total = sum(qa[n].dequantize_weight().numel() for n in qa)
    assert same / total >= 0.99, same / total
    # the record is the single-process one (the whole calibration set, not a process's share)
    assert shared.qcore_record["calibration"] == alone.qcore_record["calibration"]


def test_hessians_combined_over_processes_equal_one_process(tmp_path: Path) -> None:
    """GPTQ reads only the combined Hessian: with one calibration window per process pair the
    Hessian of two processes is the one-process Hessian (checked through the quantized weights
    of a model whose every linear sees both processes' windows)."""
    outs = run_processes({"family": "llama", "method": "gptq", "n": 2, "options": {**OPTS, "desc_act": False},
                          "out": str(tmp_path / "ckpt")})
    assert any("rank 1/2 done" in o for o in outs)
    shared = qcore.load(tmp_path / "ckpt")
    alone = single_process("llama", "gptq", 2, {**OPTS, "desc_act": False})
    errs = [abs(shared.qcore_record["weight_error"][k] - v) for k, v in alone.qcore_record["weight_error"].items()]
    assert max(errs) < 1e-3, max(errs)


def test_a_method_that_cannot_share_is_refused(tmp_path: Path) -> None:
    outs = run_processes({"family": "llama", "method": "brecq", "n": 4, "options": {**OPTS, "iterations": 2},
                          "out": str(tmp_path / "ckpt")})
    assert all("REFUSED ConfigError: method(s) brecq cannot share the calibration over 2 processes" in o
               for o in outs), outs
    assert not (tmp_path / "ckpt").exists()


def test_shards_take_every_nth_window_and_keep_the_whole_record() -> None:
    from qcore.data import CalibrationData
    from qcore.pipeline.distributed import shard
    from qcore.plugin.errors import CalibrationError

    data = CalibrationData(torch.arange(10).reshape(5, 2), {"n_samples": 5})
    assert shard(data, 1, 2).input_ids.tolist() == [[2, 3], [6, 7]]
    assert shard(data, 0, 2).record == {"n_samples": 5}
    with pytest.raises(CalibrationError, match="5 calibration windows cannot be shared by 8 processes"):
        shard(data, 0, 8)


@pytest.mark.shared
@requires_shared
def test_torchrun_cli_writes_once_and_matches_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m qcore quantize`` on stories260K: process 0 writes a
    checkpoint whose perplexity equals the single-process command's within 0.5%."""
    from qcore.eval import perplexity
    from qcore.models import load_model

    text = TINYSTORIES_TXT.read_text(encoding="utf-8")
    calib = tmp_path / "calib.txt"
    calib.write_text(text[len(text) // 2:], encoding="utf-8")
    args = ["quantize", str(STORIES_DIR), "-m", "gptq", "--bits", "4", "--group-size", "32", "--ignore",
            "*.mlp.down_proj", "--calibration", str(calib), "--n-samples", "16", "--seq-len", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QCORE_PROGRESS": "0"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "qcore", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("saved ") == 1  # one process writes
    one = subprocess.run([sys.executable, "-m", "qcore", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    _, tok = load_model(STORIES_DIR)
    ppl = {k: perplexity(qcore.load(tmp_path / k), TINYSTORIES_TXT, tok, max_tokens=4096).ppl for k in ("one", "two")}
    assert abs(ppl["two"] - ppl["one"]) <= 0.005 * ppl["one"], ppl
