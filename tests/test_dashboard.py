"""The benchmark dashboard's machinery (bench/dashboard.py, dashboard_report.py, peer_envs.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from runpy import run_path

import pytest

from qcore.testing import STORIES_DIR

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def dash() -> dict:
    return run_path(str(BENCH / "dashboard.py"))


@pytest.fixture(scope="module")
def report() -> dict:
    return run_path(str(BENCH / "dashboard_report.py"))


def test_requirements_file_parses_into_one_environment_per_peer(dash: dict) -> None:
    envs = run_path(str(BENCH / "peer_envs.py"))["parse"]()
    needed = {p.env for p in dash["PEERS"]}
    assert needed <= set(envs), f"peers without an environment section: {needed - set(envs)}"
    assert envs["gptqmodel"] == ["gptqmodel==7.6.0"]
    assert all(line and not line.startswith("#") for lines in envs.values() for line in lines)


def test_environment_with_a_matching_stamp_is_reused_without_pip(tmp_path: Path) -> None:
    pe = run_path(str(BENCH / "peer_envs.py"))
    envs = {"x": ["somepkg==1.0"]}
    py = tmp_path / "x" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    pinned = [ln.strip() for ln in Path(pe["CONSTRAINTS"]).read_text().splitlines() if ln.strip()]
    (tmp_path / "x" / pe["STAMP"]).write_text("\n".join(pinned + envs["x"]) + "\n")
    assert pe["ensure"]("x", tmp_path, envs) == py  # an empty file: running pip would fail
    with pytest.raises(KeyError, match="known x"):
        pe["ensure"]("y", tmp_path, envs)


def test_every_installed_method_gets_a_job_at_the_bits_it_takes(dash: dict) -> None:
    import qcore

    suite = dash["SUITES"]["smollm2"]
    methods = sorted(qcore.list_methods())
    jobs = dash["qcore_jobs"](suite, methods)
    assert {j.method for j in jobs} == set(methods)
    by = {(j.method, j.bits): j for j in jobs}
    assert ("gptq", 2) in by and by[("gptq", 2)].options["bits"] == 2
    if "smoothquant" in methods:
        assert [j.bits for j in jobs if j.method == "smoothquant"] == [8]
    if "quarot" in methods:
        assert by[("quarot", 3)].options["w_bits"] == 3
    peers = dash["peer_jobs"](suite, None)
    assert {j.peer for j in peers} == {p.name for p in dash["PEERS"]}
    assert len({j.key for j in jobs + peers}) == len(jobs + peers)


def test_packed_bytes_follow_the_budget_formula(dash: dict) -> None:
    from qcore.pipeline.budget import packed_bytes

    shapes = [(1536, 576, True), (576, 1536, False)]
    assert dash["packed_bytes"](shapes, (4, 64)) == packed_bytes(1536, 576, 4, 64) + 2 * 576 * 1536
    assert dash["packed_bytes"](shapes, None) == 4 * 576 * 1536
    assert dash["packed_bytes"](shapes, (3, 64)) < dash["packed_bytes"](shapes, (4, 64))


def test_error_line_names_the_exception_and_where(dash: dict) -> None:
    tail = ("noise\nTraceback (most recent call last):\n"
            '  File "/x/lib/python3.11/site-packages/pkg/mod.py", line 7, in f\n    1 / 0\n'
            "ZeroDivisionError: division by zero\n")
    assert dash["error_line"](tail) == "ZeroDivisionError: division by zero (at pkg/mod.py:7 f)"
    assert dash["error_line"]("just a message\n") == "just a message"
    assert dash["error_line"]("") == "failed without output"


def test_child_reports_its_own_peak_rss_and_a_timeout(dash: dict, tmp_path: Path) -> None:
    grow = "b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096])"
    rc, rss, _, _ = dash["run_child"]([sys.executable, "-c", grow], dict(os.environ), 60, tmp_path / "a.log")
    assert rc == 0 and rss >= 200_000_000
    rc, _, _, tail = dash["run_child"]([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), 1,
                                       tmp_path / "b.log")
    assert rc != 0 and "timed out after 1 s" in tail


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_sigterm_ends_the_running_job_and_what_it_started(tmp_path: Path) -> None:
    """Stopping the dashboard leaves no job behind: its child and the child's own children end."""
    import signal
    import subprocess
    import time

    pidfile = tmp_path / "grandchild.pid"
    job = f"sleep 300 & echo $! > {pidfile}; wait"
    script = (f"from runpy import run_path; d = run_path({str(BENCH / 'dashboard.py')!r}); d['_stop_on_sigterm']()\n"
              f"d['run_child'](['bash', '-c', {job!r}], {{}}, 600, __import__('pathlib').Path({str(tmp_path / 'j.log')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    assert _alive(grandchild)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _rows() -> tuple[dict, list[dict]]:
    header = {"suite": "t", "setup": {"model": "m", "group_size": 64, "ignore": [], "calibration": "c4",
                                      "n_samples": 8, "seq_len": 512, "eval_tokens": 4096, "eval_text": "wikitext2",
                                      "eval_seq_len": 512},
              "cpu": "cpu", "threads": 2, "date": "2026-12-07", "versions": {"qcore-quant": "0.1.0"},
              "float_ppl": 10.0, "float_bytes": 4_000_000, "eval_predicted": 4088, "command": "dashboard.py",
              "wall_s": 60.0, "complete": True}
    rows = [{"key": "a", "tool": "qcore", "method": "gptq", "bits": 4, "packed_bytes": 1_200_000, "ppl": 11.0,
             "quantize_s": 3.0, "peak_rss_bytes": 1e9},
            {"key": "b", "tool": "peer P", "method": "gptq", "bits": 4, "packed_bytes": 1_200_000, "ppl": 12.0,
             "quantize_s": 5.0},
            {"key": "c", "tool": "peer Q", "method": "awq", "bits": 4, "packed_bytes": 1_200_000, "ppl": None,
             "error": "RuntimeError: no kernel"},
            {"key": "d", "tool": "qcore", "method": "gptq", "bits": 3, "packed_bytes": 900_000, "ppl": 15.0,
             "quantize_s": 3.0}]
    return header, rows


def test_table_lists_every_row_best_first_with_the_reason_a_peer_did_not_run(report: dict) -> None:
    header, rows = _rows()
    md = report["quality_markdown"](header, rows).splitlines()
    body = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| bits")]
    assert body[0].startswith("| 16 | float | 10.000")
    assert [ln.split(" | ")[1] for ln in body[1:]] == ["gptq (qcore)", "peer P", "peer Q", "gptq (qcore)"]
    assert "did not run" in body[3] and "RuntimeError: no kernel" in body[3]
    assert "1.10x" in body[1]


def test_pareto_front_keeps_only_undominated_points(report: dict) -> None:
    pts = [(1.0, 20.0), (2.0, 12.0), (2.5, 13.0), (4.0, 10.0)]
    assert report["_pareto"](pts) == [(1.0, 20.0), (2.0, 12.0), (4.0, 10.0)]


def test_update_docs_replaces_only_its_own_section(report: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    header, rows = _rows()
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"header": header, "rows": rows}))
    report["write_report"](run)
    assert (run / "pareto.png").stat().st_size > 1000 and (run / "quantize_time.png").is_file()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nhand-written text\n")
    report["update_docs"](run, docs)
    report["update_docs"](run, docs)  # twice: the section is replaced, not appended again
    text = (docs / "results.md").read_text()
    assert text.count("<!-- dashboard:t ") == 1 and "hand-written text" in text
    assert "![t pareto](dashboard/t-pareto.png)" in text and (docs / "dashboard" / "t-pareto.png").is_file()
    header["complete"] = False
    (run / "results.json").write_text(json.dumps({"header": header, "rows": rows}))
    with pytest.raises(SystemExit, match="incomplete"):
        report["update_docs"](run, docs)


@pytest.mark.skipif(not STORIES_DIR.is_dir(), reason="needs ../shared/models/stories260K")
def test_quick_suite_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    """RTN alone, no peers: a real run writes rows, a rerun keeps them (resume), the table shows them
    and says the run is incomplete."""
    import subprocess

    cmd = [sys.executable, str(BENCH / "dashboard.py"), "--suite", "quick", "--no-peers", "--methods", "rtn",
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (folder,) = tmp_path.glob("*/quick")
    data = json.loads((folder / "results.json").read_text())
    # every job of this run measured, but a run narrowed to one method without peers is not a full run
    assert not data["header"]["complete"] and {r["bits"] for r in data["rows"]} == {3, 4}
    rtn = {r["bits"]: r["ppl"] for r in data["rows"]}
    assert data["header"]["float_ppl"] < rtn[4] < rtn[3]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and second.stderr.count("kept from the earlier run") == 2
    assert "| 4 | rtn (qcore) |" in (folder / "results.md").read_text()
    assert "INCOMPLETE" in (folder / "results.md").read_text()
