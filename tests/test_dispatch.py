"""Measured dispatch between qcore's int4 kernel and dequantize + dense matmul
(:mod:`qcore.quant.backends._dispatch`)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qcore.quant import native
from qcore.quant.backends import _dispatch, int4_native
from qcore.quant.backends._dispatch import AMX, DENSE_BF16, DENSE_FP32, KERNEL, Crossover, CrossoverTable, measure
from qcore.quant.backends.int4_cpu import has_int4_cpu
from qcore.quant.linear import BACKEND_RTOL, QuantLinear
from qcore.quant.primitives import quantize_rtn

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def linear_timer(costs: dict[str, tuple[float, float]]) -> Callable[[str, int], float]:
    """A fake timer: ``path`` on ``rows`` rows takes ``a + b * rows`` ms."""
    return lambda path, rows: (costs[path][0] + costs[path][1] * rows) * 1e-3


def test_measure_finds_the_crossover_and_the_faster_dense_format() -> None:
    timer = linear_timer({KERNEL: (1.0, 1.0), DENSE_BF16: (10.0, 0.1), DENSE_FP32: (10.0, 0.5)})
    found = measure(timer)
    assert found.dense == DENSE_BF16 and found.rows == 16  # 11.6 < 17 at 16 rows, 10.8 > 9 at 8
    assert [found.path(m) for m in (1, 8, 15, 16, 2048)] == [KERNEL, KERNEL, KERNEL, DENSE_BF16, DENSE_BF16]
    assert max(found.ms[KERNEL]) == 32  # stopped after the dense path won twice
    timer = linear_timer({KERNEL: (1.0, 1.0), DENSE_BF16: (10.0, 0.8), DENSE_FP32: (10.0, 0.1)})
    assert measure(timer).dense == DENSE_FP32


def test_measure_extrapolates_past_the_last_probe_or_never_switches() -> None:
    timer = linear_timer({KERNEL: (0.0, 1.0), DENSE_BF16: (10.0, 0.1), DENSE_FP32: (20.0, 0.1)})
    found = measure(timer, probes=(1, 2, 4))
    assert found.rows == 12  # 4 + ceil(6.4 / 0.9): 12 > 11.2
    timer = linear_timer({KERNEL: (0.0, 0.1), DENSE_BF16: (10.0, 0.2), DENSE_FP32: (20.0, 0.2)})
    found = measure(timer)
    assert found.rows is None and found.path(10**6) == KERNEL


def test_measure_races_two_kernels_and_drops_the_one_far_behind() -> None:
    calls: list[tuple[str, int]] = []
    cost = linear_timer({KERNEL: (0.5, 1.0), AMX: (5.0, 0.1), DENSE_BF16: (30.0, 0.05), DENSE_FP32: (30.0, 0.5)})

    def timer(path: str, rows: int) -> float:
        calls.append((path, rows))
        return cost(path, rows)

    found = measure(timer, kernels=(KERNEL, AMX))
    assert found.steps == ((1, KERNEL), (8, AMX), (512, DENSE_BF16)) and found.rows == 512
    assert [found.path(m) for m in (1, 7, 8, 511, 512, 10**6)] == [KERNEL, KERNEL, AMX, AMX, DENSE_BF16, DENSE_BF16]
    assert max(m for p, m in calls if p == KERNEL) == 32  # 32.5 ms > 3 x 8.2 ms: not timed again
    assert max(m for p, m in calls if p == AMX) == 1024  # stopped once the dense path won twice
    again = Crossover.from_json(json.loads(json.dumps(found.to_json())))
    assert again.steps == found.steps and again.dense == found.dense


@pytest.mark.parametrize("steps", [[], [[2, "kernel"]], [[1, "kernel"], [1, "bf16"]], [[1, "tiles"]]])
def test_bad_table_entries_are_refused(steps: list) -> None:
    with pytest.raises(ValueError, match="bad crossover entry"):
        Crossover.from_json({"steps": steps, "dense": DENSE_BF16})


def test_dense_from_one_row_when_it_always_wins() -> None:
    found = measure(linear_timer({KERNEL: (5.0, 1.0), DENSE_BF16: (1.0, 0.1), DENSE_FP32: (2.0, 0.1)}))
    assert found.rows == 1 and found.path(1) == DENSE_BF16


def test_table_is_written_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    calls: list[tuple[str, int]] = []
    cost = linear_timer({KERNEL: (1.0, 1.0), DENSE_BF16: (10.0, 0.1), DENSE_FP32: (10.0, 0.5)})

    def timer(p: str, rows: int) -> float:
        calls.append((p, rows))
        return cost(p, rows)

    table = CrossoverTable(lambda: path)
    first = table.get("a", timer)
    assert calls and first.rows == 16
    stamp = path.stat().st_mtime_ns
    n_calls = len(calls)
    assert table.get("a", timer) == first and len(calls) == n_calls  # memoized

    def no_timer(p: str, rows: int) -> float:
        raise AssertionError("measured again")

    again = CrossoverTable(lambda: path).get("a", no_timer)  # a new process reads the file
    assert again.rows == first.rows and again.dense == first.dense and path.stat().st_mtime_ns == stamp
    CrossoverTable(lambda: path).get("b", timer)  # another shape is added beside the first
    assert set(json.loads(path.read_text())["entries"]) == {"a", "b"}


def test_unreadable_table_is_measured_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "table.json"
    path.write_text("{not json")
    timer = linear_timer({KERNEL: (1.0, 1.0), DENSE_BF16: (10.0, 0.1), DENSE_FP32: (10.0, 0.5)})
    with caplog.at_level(logging.WARNING, logger="qcore"):
        assert CrossoverTable(lambda: path).get("a", timer).rows == 16
    assert "unreadable" in caplog.text
    assert "a" in json.loads(path.read_text())["entries"]


def test_forced_path(monkeypatch: pytest.MonkeyPatch) -> None:
    found = measure(linear_timer({KERNEL: (1.0, 1.0), DENSE_BF16: (10.0, 0.1), DENSE_FP32: (10.0, 0.5)}))
    monkeypatch.setenv(_dispatch.ENV_PATH, "fp32")
    assert found.path(1) == DENSE_FP32
    monkeypatch.setenv(_dispatch.ENV_PATH, "auto")
    assert found.path(1) == KERNEL
    monkeypatch.setenv(_dispatch.ENV_PATH, "tiles")
    with pytest.raises(ValueError, match="QCORE_INT4_PATH"):
        found.path(1)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty build cache, no memoized library and no memoized crossovers, restored afterwards."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(_dispatch.ENV_PATH, raising=False)
    native._load.cache_clear()
    int4_native.CROSSOVERS.clear()
    yield tmp_path
    native._load.cache_clear()
    int4_native.CROSSOVERS.clear()


@needs_kernel
@pytest.mark.parametrize("n,k,gs", [(64, 256, 32), (100, 576, 64), (192, 512, -1)])
def test_every_path_agrees_with_reference(n: int, k: int, gs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(n + k)
    mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(n, k, generator=g), 4, gs, False), torch.randn(n))
    for rows in (1, 5, 40):
        x = torch.randn(rows, k, generator=g)
        mod.backend = "reference"
        ref = mod(x)
        mod.backend = "int4_native"
        for path in _dispatch.PATHS:
            monkeypatch.setenv(_dispatch.ENV_PATH, path)
            assert mod.kernel_path(rows) == f"int4_native:{path}"
            assert rel(mod(x), ref) < BACKEND_RTOL, (path, rows)
            assert rel(mod(x.bfloat16()).float(), ref) < BACKEND_RTOL, (path, rows)


@needs_kernel
@pytest.mark.parametrize("path", [DENSE_BF16, DENSE_FP32])
def test_dense_paths_work_after_a_first_call_in_inference_mode(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reused dequantization buffer, first made under torch.inference_mode (evaluation), is
    still writable by a later call outside it (calibration, training)."""
    monkeypatch.setenv(_dispatch.ENV_PATH, path)
    monkeypatch.setattr(int4_native, "_scratch", type(int4_native._scratch)())  # no buffer yet
    g = torch.Generator().manual_seed(3)
    mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(96, 256, generator=g), 4, 32, False), None)
    mod.backend = "int4_native"
    x = torch.randn(64, 256, generator=g)
    with torch.inference_mode():
        first = mod(x).clone()
    with torch.no_grad():
        assert torch.equal(mod(x), first)


@needs_kernel
def test_measured_at_first_use_beside_the_library_and_reused(fresh_cache: Path) -> None:
    n, k = 128, 512
    mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(n, k), 4, 128, False), None)
    paths = {rows: mod.kernel_path(rows) for rows in (1, 2, 8, 64, 512)}
    assert all(p.startswith("int4_native:") for p in paths.values())
    table = native.dispatch_table_path()
    assert table.parent == fresh_cache / "native" and table.name.endswith("-dispatch.json")
    entries = json.loads(table.read_text())["entries"]
    key = int4_native.crossover_key(n, k, 128)
    assert list(entries) == [key]
    steps = entries[key]["steps"]
    assert steps[0][0] == 1
    for m, p in paths.items():  # the path switches at the recorded steps
        assert p.split(":")[1] == [path for start, path in steps if start <= m][-1]
    x = torch.randn(70, k)
    assert rel(mod(x), x @ mod.dequantize_weight().t()) < BACKEND_RTOL
    stamp = table.stat().st_mtime_ns
    int4_native.CROSSOVERS.clear()  # as a new process: read from the table, not measured
    other = QuantLinear.from_quantized(quantize_rtn(torch.randn(n, k), 4, 128, False), None)
    assert other.kernel_path(512) == paths[512] and table.stat().st_mtime_ns == stamp


def test_without_the_native_kernel_nothing_dispatches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    native._load.cache_clear()
    try:
        mod = QuantLinear.from_quantized(quantize_rtn(torch.randn(64, 256), 4, 128, False), None)
        if has_int4_cpu():
            assert mod.kernel_path(64) == "int4_cpu"
        x = torch.randn(33, 256)
        assert rel(mod(x), x @ mod.dequantize_weight().t()) < BACKEND_RTOL
        assert not (tmp_path / "native").exists() or not list((tmp_path / "native").glob("*-dispatch.json"))
    finally:
        native._load.cache_clear()


def test_crossover_follows_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """(No compiled library needed.) One crossover per thread count, looked up again when it changes."""
    keys: list[str] = []

    def fake_get(key: str, timer: Callable[[str, int], float], kernels: tuple[str, ...]) -> _dispatch.Crossover:
        keys.append(key)
        return _dispatch.Crossover(((1, KERNEL), (len(keys) + 1, DENSE_BF16)), DENSE_BF16)

    monkeypatch.setattr(int4_native.CROSSOVERS, "get", fake_get)
    qw = quantize_rtn(torch.randn(64, 256), 4, 64, False)
    pack = int4_native.build_int4_native(qw.codes, qw.scales.bfloat16(), qw.zeros.bfloat16(), 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert int4_native.native_crossover(pack, 256).rows == 2
        assert int4_native.native_crossover(pack, 256).rows == 2 and keys == ["64x256:g64:t1"]
        torch.set_num_threads(2)
        assert int4_native.native_crossover(pack, 256).rows == 3 and keys[-1] == "64x256:g64:t2"
    finally:
        torch.set_num_threads(threads)
