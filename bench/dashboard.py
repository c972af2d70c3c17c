#!/usr/bin/env python
"""Benchmark dashboard: every installed qcore method and every peer on one model, in one run.

``make bench SUITE=quick|smollm2|speed`` (or ``.venv/bin/python bench/dashboard.py --suite NAME``)
creates the peers' virtual environments the suite needs (bench/peer_envs.py, cached), then:

1. loads the suite's model once, draws the calibration token ids and cuts the evaluation windows,
   evaluates the float model, and saves the float model as a Hugging Face folder and the token
   ids as safetensors in the run's ``work/`` folder;
2. runs one child process per job, each with its own peak RSS (``wait4``): every installed qcore
   method at every bit width of the suite (calibration-free methods ignore the calibration ids),
   and every peer (its own environment, its own quantization call, its whole quantized model
   evaluated in its own process on the same windows: bench/peer_eval.py) through the peer mode of
   the per-method bench scripts;
3. writes ``bench/out/<date>-<cpu>/<suite>/results.json`` after every job (a rerun resumes: rows
   that already hold a result are kept), then ``results.md`` and the plots
   (bench/dashboard_report.py); ``--update-docs`` puts them into docs/results.md.

A job that cannot run has a row that says why (the error's first line). A peer whose float
perplexity does not reproduce qcore's (bench/peer_eval.py FLOAT_MATCH_RTOL; 2% for a peer that
runs in bfloat16) has its quantized perplexity voided, with the reason.

The ``speed`` suite runs bench/kernels.py and bench/decode.py (and llama.cpp's decoding of the
same model when a ``llamacpp`` peer environment exists) and writes their rows in the same format.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from runpy import run_path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds scripts named like packages (hqq.py): keep it off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

log = logging.getLogger("bench.dashboard")

HALF_FLOAT_RTOL = 0.02
"""A peer running in bfloat16 must reproduce qcore's float32 perplexity to this tolerance."""


@dataclass(frozen=True)
class Suite:
    """What one dashboard suite measures."""

    name: str
    model: str
    """A qcore model name, or ``stories260k`` (../shared/models/stories260K)."""
    bits: tuple[int, ...]
    group_size: int
    ignore: tuple[str, ...]
    """Module-name globs every method and peer keeps float."""
    calibration: str
    """``c4`` or ``tinystories`` (the second half of the TinyStories head: disjoint from the evaluation)."""
    n_samples: int
    seq_len: int
    eval_text: str
    eval_tokens: int
    eval_seq_len: int
    job_timeout: int
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per qcore method, options beyond bits/group/ignore."""
    peer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per peer, options beyond its defaults."""


SUITES: dict[str, Suite] = {
    "quick": Suite("quick", "stories260k", (4, 3), 32, ("*.mlp.down_proj",), "tinystories", 32, 128,
                   "tinystories", 8192, 512, 900, peer_options={"AutoRound": {"iters": 25}}),
    "smollm2": Suite("smollm2", "smollm2-135m", (2, 3, 4), 64, (), "c4", 8, 512, "wikitext2", 4096, 512, 3600),
}
"""Quality suites. ``quick``: stories260K (hidden 64; its down projections read 172 features, which
no group of 32 divides, so they stay float for every method and peer)."""

SPEED_SUITE = "speed"


# -- jobs ------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One row to measure: a qcore method or a peer at one bit width."""

    key: str
    tool: str
    method: str
    bits: int
    options: dict[str, Any]
    storage: tuple[int, int]
    """(bits, group size) of the packed-bytes formula."""
    peer: str | None = None


@dataclass(frozen=True)
class Peer:
    """A peer: its environment, the bench script whose peer mode runs it, its config and result."""

    name: str
    env: str
    script: str
    argv: tuple[str, ...]
    method: str
    bits: tuple[int, ...] | None
    """Bit widths it runs at (None: the suite's)."""
    config: Callable[[Suite, int, dict[str, str]], dict[str, Any]]
    result: str
    """Where its result lands: ``dir`` (out/result.json), ``file`` (out) or ``stdout`` (last line)."""


def _gptq_cfg(s: Suite, bits: int, p: dict[str, str]) -> dict[str, Any]:
    return {"bits": bits, "group_size": s.group_size, "sym": False, "desc_act": True, "static_groups": True,
            "damp_percent": 0.01, "float_dir": p["float_dir"], "tensors": p["tensors"], "out": p["out"],
            "batch_size": 1, "gptqmodel_dtype": "bfloat16", "ignore": list(s.ignore)}


def _awq_cfg(s: Suite, bits: int, p: dict[str, str]) -> dict[str, Any]:
    return {"bits": bits, "group_size": s.group_size, "sym": False, "float_dir": p["float_dir"],
            "tensors": p["tensors"], "out": p["out"], "gptqmodel_dtype": "bfloat16", "ignore": list(s.ignore)}


def _hqq_cfg(s: Suite, bits: int, p: dict[str, str]) -> dict[str, Any]:
    return {"float_dir": p["float_dir"], "bits": bits, "group_size": s.group_size, "out": p["out"],
            "windows": p["tensors"], "threads": p["threads"], "ignore": list(s.ignore)}


def _autoround_cfg(s: Suite, bits: int, p: dict[str, str]) -> dict[str, Any]:
    opts = s.peer_options.get("AutoRound", {})
    return {"model_dir": p["float_dir"], "tensors": p["tensors"], "bits": bits, "group_size": s.group_size,
            "iters": opts.get("iters", 200), "batch_size": 8, "threads": int(p["threads"]),
            "float_layers": json.loads(p["float_layers"])}


def _smoothquant_cfg(s: Suite, bits: int, p: dict[str, str]) -> dict[str, Any]:
    return {"float_dir": p["float_dir"], "calib": p["tensors"], "eval": p["tensors"], "out": p["out"],
            "a_bits": 8, "alpha": 0.5, "smooth": True, "batch_size": 8, "eval_batch": 4,
            "ignore": list(s.ignore)}


PEERS: tuple[Peer, ...] = (
    Peer("GPTQModel GPTQ", "gptqmodel", "gptq.py", ("--peer", "gptqmodel", "--peer-config"), "gptq", None,
         _gptq_cfg, "dir"),
    Peer("llm-compressor GPTQ", "llmc", "gptq.py", ("--peer", "llm-compressor", "--peer-config"), "gptq", None,
         _gptq_cfg, "dir"),
    Peer("llm-compressor AWQ", "llmc", "awq.py", ("--peer", "llm-compressor", "--peer-config"), "awq", None,
         _awq_cfg, "dir"),
    Peer("GPTQModel AWQ", "gptqmodel", "awq.py", ("--peer", "gptqmodel", "--peer-config"), "awq", None,
         _awq_cfg, "dir"),
    Peer("hqq", "hqq", "hqq.py", ("--peer-config",), "hqq", None, _hqq_cfg, "file"),
    Peer("AutoRound", "autoround", "adaround.py", ("--peer", "autoround", "--peer-config"), "adaround", None,
         _autoround_cfg, "stdout"),
    Peer("llm-compressor SmoothQuant W8A8", "llmc", "smoothquant.py", ("--peer",), "smoothquant", (8,),
         _smoothquant_cfg, "file"),
)
"""Every peer of the quality suites, each run through the peer mode of its method's bench script."""

QCORE_SPECIAL: dict[str, tuple[tuple[int, ...] | None, Callable[[Suite, int], dict[str, Any]], tuple[int, int] | None]] = {
    "quarot": (None, lambda s, b: {"w_bits": b, "group_size": s.group_size}, None),
    "smoothquant": ((8,), lambda s, b: {"w_bits": 8, "a_bits": 8}, (8, -1)),
    "qlora": ((4,), lambda s, b: {}, (4, 64)),
}
"""qcore methods whose options are not ``bits``/``group_size``: (bit widths or None for the suite's,
options, packed-bytes storage or None for (bits, group))."""


def qcore_jobs(suite: Suite, methods: list[str]) -> list[Job]:
    """Every installed qcore method at every bit width it takes in ``suite``."""
    jobs = []
    for method in methods:
        widths, opts, storage = QCORE_SPECIAL.get(method, (None, lambda s, b: {"bits": b, "group_size": s.group_size},
                                                          None))
        for bits in widths or suite.bits:
            options = {**opts(suite, bits), "ignore": list(suite.ignore), **suite.options.get(method, {})}
            jobs.append(Job(f"qcore {method} w{bits}", "qcore", method, bits, options,
                            storage or (bits, suite.group_size)))
    return jobs


def peer_jobs(suite: Suite, names: list[str] | None) -> list[Job]:
    """Every peer (or those named) at every bit width it takes in ``suite``."""
    return [Job(f"{p.name} w{bits}", p.name, p.method, bits, {}, (bits, -1 if p.method == "smoothquant"
                                                                  else suite.group_size), peer=p.name)
            for p in PEERS if names is None or p.name in names or p.env in names
            for bits in (p.bits or suite.bits)]


# -- the child processes ---------------------------------------------------------------------------
def run_child(argv: list[str], env: dict[str, str], timeout: int, log_path: Path) -> tuple[int, int, float, str]:
    """Run ``argv``; (return code, its peak RSS in bytes, wall seconds, its output's tail)."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        # its own process group: a timeout, Ctrl-C or SIGTERM of the dashboard ends the job and
        # everything it started (a peer's workers included)
        _STARTING["active"] = True  # a SIGTERM now waits until the job can be stopped with it
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        except BaseException:
            _STARTING["active"] = False
            raise
        timer = threading.Timer(timeout, _kill_group, (proc.pid, signal.SIGKILL))
        try:
            _STARTING["active"] = False
            if _STARTING["pending"]:
                raise KeyboardInterrupt(f"signal {_STARTING['pending']}")
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace")[-6000:]
    if proc.returncode == -9 and time.perf_counter() - start >= timeout:
        tail += f"\ntimed out after {timeout} s"
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start, tail


def _kill_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (gone already: nothing to do)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


_STARTING: dict[str, Any] = {"active": False, "pending": 0}
"""While a job's process is being created a SIGTERM is only noted (``pending``): raised there, it
would leave the new job running."""


def _stop_on_sigterm() -> None:
    """SIGTERM ends the dashboard as Ctrl-C does (the running job is stopped, results.json keeps
    every finished row; the same command resumes)."""
    def handler(signum: int, frame: Any) -> None:
        if _STARTING["active"]:
            _STARTING["pending"] = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def error_line(tail: str) -> str:
    """The error's first line (the last exception line of a traceback, else the last line), with
    the place it was raised (the traceback's last ``File`` line, shortened to its package path)."""
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    frames = [m for m in (re.match(r'^File "(?:.*/site-packages/)?([^"]+)", line (\d+), in (\S+)', ln) for ln in lines)
              if m]
    where = f" (at {frames[-1].group(1)}:{frames[-1].group(2)} {frames[-1].group(3)})" if frames else ""
    for ln in reversed(lines):
        if ln.startswith("timed out"):
            return ln
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln):
            return (ln[:240] + where)[:400]
    return (lines[-1] if lines else "failed without output")[:300]


def qcore_job_main(cfg: dict[str, Any]) -> None:
    """Child mode: quantize with one qcore method, evaluate the whole model, write its result."""
    import torch
    from safetensors.torch import load_file

    import qcore
    from qcore.data import CalibrationData
    from qcore.eval import perplexity
    from qcore.models import load_model
    from qcore.registry import get_method

    torch.manual_seed(0)
    data = load_file(cfg["tensors"])
    model, _ = load_model(cfg["model"])
    method = cfg["method"]
    extra = {}
    if get_method(method).capabilities.needs_calibration:
        extra["calibration"] = CalibrationData(data["calibration"], dict(cfg["calibration_record"]))
    start = time.perf_counter()
    qcore.quantize(model, method, **cfg["options"], **extra)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, data["eval"], seq_len=cfg["eval_seq_len"]).ppl
    Path(cfg["out"]).write_text(json.dumps({"ppl": ppl, "seconds": seconds}))


# -- the run ---------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name and its widest matrix instructions, e.g. ``Intel(R) Xeon(R) Processor (AMX)``."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    isa = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}, {os.cpu_count()} cores)"


def cpu_slug(cpu: str) -> str:
    """A folder-name form of :func:`cpu_name`."""
    vendor = "intel" if "intel" in cpu.lower() else "amd" if "amd" in cpu.lower() else "cpu"
    isa = re.search(r"\((AMX|AVX512-BF16|AVX2|no AVX2)", cpu)
    return f"{vendor}-{(isa.group(1) if isa else 'x').lower().replace(' ', '')}"


def tool_versions() -> tuple[dict[str, str], dict[str, str]]:
    """(distribution -> version for qcore, its plugins and torch/transformers; method -> its
    plugin's ``distribution version``)."""
    from importlib.metadata import PackageNotFoundError, version

    from qcore.registry import list_plugins

    out = {}
    for dist in ("qcore-quant", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    methods = {}
    for info in list_plugins():
        out[info.distribution] = info.version
        methods.update({m: f"{info.distribution} {info.version}" for m in info.methods})
    return out, methods


class Run:
    """One suite's run folder: its results.json, rewritten after every job."""

    def __init__(self, folder: Path, header: dict[str, Any], fresh: bool, retry_failed: bool) -> None:
        self.folder = folder
        self.path = folder / "results.json"
        folder.mkdir(parents=True, exist_ok=True)
        old = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())
        self.rows: list[dict[str, Any]] = [r for r in old.get("rows", []) if not (retry_failed and r.get("error"))]
        self.header = {**header, "wall_s": old.get("header", {}).get("wall_s", 0.0)}
        if old and old.get("header", {}).get("setup") != header.get("setup"):
            log.warning("the earlier results in %s used another setup: starting afresh", folder)
            self.rows, self.header["wall_s"] = [], 0.0

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        """Record ``row`` (replacing an earlier one of the same job) and save."""
        self.rows = [r for r in self.rows if r["key"] != row["key"]] + [row]
        self.save()

    def save(self) -> None:
        """Write results.json (a temporary file renamed into place)."""
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"header": self.header, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.path)


def packed_bytes(shapes: list[tuple[int, int, bool]], storage: tuple[int, int] | None) -> int:
    """Bytes of the block linears: quantized ones at ``storage`` (codes, fp16 scale and zero per
    group: qcore.pipeline.budget.packed_bytes), float ones (and all, for ``None``) at 2 bytes."""
    from qcore.pipeline.budget import packed_bytes as qlinear_bytes

    total = 0
    for out_f, in_f, quantized in shapes:
        if storage is None or not quantized:
            total += 2 * out_f * in_f
        else:
            total += qlinear_bytes(out_f, in_f, storage[0], storage[1])
    return total


def prepare(suite: Suite, work: Path) -> dict[str, Any]:
    """Load the model, draw calibration ids and evaluation windows, evaluate the float model, save
    the float folder and the token ids; returns what the jobs share."""
    import torch
    from safetensors.torch import save_file

    from qcore.data import get_calibration, read_texts
    from qcore.eval import perplexity, token_stream, windows
    from qcore.models import load_model, save_float
    from qcore.testing import STORIES_DIR, TINYSTORIES_TXT

    source = str(STORIES_DIR) if suite.model == "stories260k" else suite.model
    model, tok = load_model(source)
    if suite.calibration == "tinystories":
        text = TINYSTORIES_TXT.read_text(encoding="utf-8")
        calib_src: Any = [text[len(text) // 2:]]
    else:
        calib_src = read_texts(suite.calibration)
    calib = get_calibration(calib_src, tok, n_samples=suite.n_samples, seq_len=suite.seq_len, seed=0)
    eval_src = TINYSTORIES_TXT if suite.eval_text == "tinystories" else suite.eval_text
    win = windows(token_stream(eval_src, tok)[0], suite.eval_seq_len, suite.eval_tokens)
    float_ppl = perplexity(model, win, seq_len=suite.eval_seq_len).ppl
    float_dir = save_float(model, work / "float", tok, overwrite=True)
    tensors = work / "tensors.safetensors"
    # the key names each bench script's peer mode reads (calibration/input_ids, eval/windows)
    save_file({"calibration": calib.input_ids.contiguous(), "eval": win.contiguous(),
               "input_ids": calib.input_ids.clone(), "windows": win.clone()}, str(tensors))
    shapes, float_layers = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            kept = any(fnmatch.fnmatch(name, g) for g in suite.ignore)
            shapes.append((mod.out_features, mod.in_features, not kept))
            if kept:
                float_layers.append(name)
    return {"source": source, "float_dir": str(float_dir), "tensors": str(tensors), "float_ppl": float_ppl,
            "shapes": shapes, "float_layers": float_layers, "calibration_record": calib.record,
            "eval_predicted": int(win[:, 1:].numel())}


def _peer_result(peer: Peer, out: Path, tail: str) -> dict[str, Any]:
    if peer.result == "dir":
        return json.loads((out / "result.json").read_text())
    if peer.result == "file":
        return json.loads(out.read_text())
    last = [ln for ln in tail.strip().splitlines() if ln.startswith("{")]
    return json.loads(last[-1])


@functools.cache
def _peer_eval() -> dict[str, Any]:
    """bench/peer_eval.py's names (loaded once per run)."""
    return run_path(str(HERE / "peer_eval.py"))


def run_job(job: Job, suite: Suite, shared: dict[str, Any], work: Path, peers_dir: Path,
            envs: dict[str, Path | str]) -> dict[str, Any]:
    """Run one job in a child process; its row."""
    row: dict[str, Any] = {"key": job.key, "tool": job.tool, "method": job.method, "bits": job.bits,
                           "options": job.options, "storage": list(job.storage),
                           "packed_bytes": packed_bytes(shared["shapes"], job.storage)}
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job.key).strip("_")
    out, log_path = work / f"{slug}.out", work / f"{slug}.log"
    env = {**os.environ, "PYTHONPATH": "", "QCORE_PROGRESS": "0"}
    env.pop("QCORE_QLINEAR_BACKEND", None)
    if job.peer is None:
        cfg = {"model": shared["source"], "method": job.method, "options": job.options, "tensors": shared["tensors"],
               "calibration_record": shared["calibration_record"], "eval_seq_len": suite.eval_seq_len,
               "out": str(out)}
        argv = [sys.executable, __file__, "--job", json.dumps(cfg)]
        row["tool_version"] = shared["method_versions"].get(job.method, "?")
    else:
        peer = next(p for p in PEERS if p.name == job.peer)
        py = envs.get(peer.env)
        if not isinstance(py, Path):
            row.update(ppl=None, error=f"peer environment {peer.env} unavailable: {py}", final=True)
            return row
        paths = {"float_dir": shared["float_dir"], "tensors": shared["tensors"], "out": str(out),
                 "threads": str(torch_threads()), "float_layers": json.dumps(shared["float_layers"])}
        cfg = peer.config(suite, job.bits, paths)
        row["options"] = {k: v for k, v in cfg.items() if k not in ("float_dir", "tensors", "out", "calib", "eval",
                                                                   "windows", "model_dir")}
        argv = [str(py), str(HERE / peer.script), *peer.argv, json.dumps(cfg)]
    rc, rss, wall, tail = run_child(argv, env, suite.job_timeout, log_path)
    row.update(peak_rss_bytes=rss, job_wall_s=wall)
    if rc != 0:
        row.update(ppl=None, error=error_line(tail), final=True, log=str(log_path))
        return row
    if job.peer is None:
        res = json.loads(out.read_text())
        row.update(ppl=res["ppl"], quantize_s=res["seconds"], float_ppl=shared["float_ppl"])
        return row
    res = _peer_result(peer, out, tail)
    pe = _peer_eval()
    dtype = res.get("dtype", "float32")
    ok, note = pe["float_check"](res["float_ppl"], shared["float_ppl"],
                                 pe["FLOAT_MATCH_RTOL"] if dtype == "float32" else HALF_FLOAT_RTOL)
    notes = [note + f" ({dtype})"]
    extra = sorted(set(n for n in res.get("unchanged", []) if ".layers." in n) - set(shared["float_layers"]))
    if extra:
        ok = False
        notes.append(f"void: it kept {len(extra)} more linears float, e.g. {extra[0]}")
    row.update(ppl=res["ppl"] if ok else None, peer_ppl=res["ppl"], float_ppl=res["float_ppl"],
               quantize_s=res.get("seconds"), tool_version=str(res.get("version", "?")), note="; ".join(notes),
               final=True)
    if not ok:
        row["error"] = notes[-1]
    return row


def torch_threads() -> int:
    """Threads each child uses: OMP_NUM_THREADS, else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def peer_environments(peers: list[Peer], root: Path, build: bool) -> dict[str, Path | str]:
    """Each needed environment's interpreter, or why it is unavailable."""
    pe = run_path(str(HERE / "peer_envs.py"))
    envs: dict[str, Path | str] = {}
    for env in sorted({p.env for p in peers}):
        try:
            envs[env] = pe["ensure"](env, root) if build else pe["python_of"](root, env)
            if not Path(envs[env]).is_file():
                envs[env] = f"not installed at {root / env} (make bench creates it)"
        except Exception as exc:  # noqa: BLE001 - reported in the peer's rows
            envs[env] = str(exc).splitlines()[0][:300]
    return envs


def quality_suite(suite: Suite, args: argparse.Namespace) -> Path:
    """Run a quality suite; returns its folder."""
    import qcore

    cpu = cpu_name()
    date = _dt.date.today().isoformat()
    folder = Path(args.resume) if args.resume else Path(args.out) / f"{date}-{cpu_slug(cpu)}" / suite.name
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    methods = sorted(m for m in qcore.list_methods() if args.methods is None or m in args.methods)
    jobs = qcore_jobs(suite, methods)
    peers = [] if args.no_peers else peer_jobs(suite, args.peers)
    jobs += peers
    envs = peer_environments([p for p in PEERS if any(j.peer == p.name for j in peers)], Path(args.peers_dir),
                             not args.no_build)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    log.info("suite %s: preparing %s", suite.name, suite.model)
    shared = prepare(suite, work)
    shared["versions"], shared["method_versions"] = tool_versions()
    header = {"suite": suite.name, "setup": json.loads(json.dumps(asdict(suite))), "cpu": cpu, "date": date, "threads": torch_threads(),
              "versions": shared["versions"], "float_ppl": shared["float_ppl"],
              "float_bytes": packed_bytes(shared["shapes"], None), "eval_predicted": shared["eval_predicted"],
              "calibration": shared["calibration_record"], "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    run = Run(folder, header, args.fresh, args.retry_failed)
    for i, job in enumerate(jobs, 1):
        if run.done(job.key):
            log.info("[%d/%d] %s: kept from the earlier run", i, len(jobs), job.key)
            continue
        log.info("[%d/%d] %s ...", i, len(jobs), job.key)
        load = os.getloadavg()[0]
        row = run_job(job, suite, shared, work, Path(args.peers_dir), envs)
        row.update(cpu=cpu, date=date, load_average=[round(load, 2), round(os.getloadavg()[0], 2)])
        run.header["wall_s"] += time.perf_counter() - start
        start = time.perf_counter()
        run.add(row)
        log.info("[%d/%d] %s: %s", i, len(jobs), job.key,
                 f"ppl {row['ppl']:.4f}" if row.get("ppl") is not None else row.get("error"))
    # complete: every installed method and every peer measured (a run narrowed by --methods,
    # --peers or --no-peers is not a full run, whatever it holds)
    narrowed = args.methods is not None or args.peers is not None or args.no_peers
    run.header["complete"] = not narrowed and all(run.done(j.key) for j in jobs)
    run.header["load_average"] = [load_start, os.getloadavg()[0]]
    run.save()
    return folder


def speed_suite(args: argparse.Namespace) -> Path:
    """Run bench/kernels.py and bench/decode.py (and llama.cpp when installed); returns the folder."""
    cpu = cpu_name()
    date = _dt.date.today().isoformat()
    folder = Path(args.out) / f"{date}-{cpu_slug(cpu)}" / SPEED_SUITE
    folder.mkdir(parents=True, exist_ok=True)
    speed = run_path(str(HERE / "dashboard_speed.py"))
    rows = speed["run_speed"](folder, Path(args.peers_dir), cpu, date, args.quick_speed)
    header = {"suite": SPEED_SUITE, "cpu": cpu, "date": date, "threads": torch_threads(),
              "versions": tool_versions()[0], "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "complete": True}
    (folder / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=[*SUITES, SPEED_SUITE], default="quick")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--peers-dir", default=os.environ.get("PEERS", str(ROOT / ".peers")),
                    help="where the peers' environments live (created there when missing)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-build", action="store_true", help="use existing peer environments only")
    ap.add_argument("--peers", nargs="*", default=None, help="only these peers (names or environments)")
    ap.add_argument("--methods", nargs="*", default=None, help="only these qcore methods")
    ap.add_argument("--fresh", action="store_true", help="ignore an earlier run's rows in the same folder")
    ap.add_argument("--resume", default=None, metavar="FOLDER",
                    help="continue the run in FOLDER (bench/out/<date>-<cpu>/<suite>; default: today's on this CPU)")
    ap.add_argument("--retry-failed", action="store_true", help="rerun the jobs an earlier run left with an error")
    ap.add_argument("--quick-speed", action="store_true", help="speed suite: fewer rounds and shapes")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the tables and plots into docs/results.md (a complete run only)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        qcore_job_main(json.loads(args.job))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _stop_on_sigterm()
    # the run logs one line per job; the libraries' bars (GGUF conversion, shard writing) stay quiet
    os.environ.setdefault("QCORE_PROGRESS", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        folder = speed_suite(args) if args.suite == SPEED_SUITE else quality_suite(SUITES[args.suite], args)
    except KeyboardInterrupt:
        log.error("stopped: the running job was ended; finished rows are kept in results.json, and the "
                  "same command resumes after them")
        raise SystemExit(130) from None
    report = run_path(str(HERE / "dashboard_report.py"))
    report["write_report"](folder)
    print((folder / "results.md").read_text())
    if args.update_docs:
        report["update_docs"](folder, ROOT / "docs")


if __name__ == "__main__":
    main()
