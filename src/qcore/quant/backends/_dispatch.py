"""Measured choice, per CPU and layer shape, between a CPU int4 kernel and dequantize + dense matmul.

A low-bit kernel wins at a few activation rows (it streams 4-bit weights); from some row count on,
dequantizing the weight into a reused scratch buffer and running the CPU's best dense matmul wins
(oneDNN's bf16 matmul uses AMX where the CPU has it; fp32 where bf16 is emulated). Where that row
count lies depends on the CPU, the thread count and the shape, so it is measured: at the first
call for a shape, both paths are timed at :data:`PROBE_ROWS` rows (within about
:data:`BUDGET_S` seconds), and the smallest row count from which the dense path stays faster is
the crossover. Crossovers are kept in a JSON table (for ``int4_native``, beside its compiled
library, whose name already encodes the source, the compiler and the CPU) and reused by every
later process. :data:`ENV_PATH` forces one path everywhere.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcore.checkpoint.atomic import write_json
from qcore.progress import get_logger

log = get_logger("qcore.quant.backends.dispatch")

KERNEL = "kernel"
"""The low-bit kernel itself."""
DENSE_BF16 = "bf16"
"""Dequantize into a reused bf16 buffer, then a bf16 matmul."""
DENSE_FP32 = "fp32"
"""Dequantize into a reused fp32 buffer, then an fp32 matmul."""
PATHS: tuple[str, ...] = (KERNEL, DENSE_BF16, DENSE_FP32)
ENV_PATH = "QCORE_INT4_PATH"
"""Force one of :data:`PATHS` for every call (tests, comparisons); unset or ``auto``: measured."""
PROBE_ROWS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Row counts timed, in this order, until the dense path has won twice in a row or time is up."""
DENSE_CHOICE_ROWS = 64
"""Rows at which the bf16 and fp32 dense paths are compared to pick the dense one."""
BUDGET_S = 1.0
"""Soft limit on one shape's measurement (a probe that starts in time finishes)."""
REPS = 3
"""Least timed calls per probe after one warm-up call (the fastest counts: other load only adds
time, and a descheduled OpenMP thread adds milliseconds to a call)."""
PROBE_S = 0.02
"""Short calls are repeated until a probe has taken this long (at most :data:`MAX_REPS` calls)."""
MAX_REPS = 50
TABLE_FORMAT = 1

Timer = Callable[[str, int], float]
"""``timer(path, rows)``: seconds of one call of ``path`` on ``rows`` activation rows."""


@dataclass(frozen=True)
class Crossover:
    """Where a layer shape switches from the kernel to dequantize + dense matmul."""

    rows: int | None
    """From this many rows on the dense path runs; None: the kernel at every row count."""
    dense: str
    """:data:`DENSE_BF16` or :data:`DENSE_FP32`."""
    ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Measured milliseconds per path and row count."""

    def path(self, rows: int) -> str:
        """The path a call with ``rows`` activation rows takes."""
        forced = forced_path()
        if forced is not None:
            return forced
        return self.dense if self.rows is not None and rows >= self.rows else KERNEL

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "dense": self.dense,
                "ms": {p: {str(m): round(t, 4) for m, t in v.items()} for p, v in self.ms.items()}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Crossover:
        rows = doc["rows"]
        if (rows is not None and not isinstance(rows, int)) or doc["dense"] not in (DENSE_BF16, DENSE_FP32):
            raise ValueError(f"bad crossover entry {doc!r}")
        ms = {p: {int(m): float(t) for m, t in v.items()} for p, v in doc.get("ms", {}).items()}
        return cls(rows, doc["dense"], ms)


def forced_path() -> str | None:
    """The path :data:`ENV_PATH` forces, or None."""
    value = os.environ.get(ENV_PATH, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV_PATH}={value!r}: use auto or one of {', '.join(PATHS)}")
    return value


def _seconds(timer: Timer, path: str, rows: int) -> float:
    timer(path, rows)
    times = [timer(path, rows) for _ in range(REPS)]
    while sum(times) < PROBE_S and len(times) < MAX_REPS:
        times.append(timer(path, rows))
    return min(times)


def measure(timer: Timer, probes: tuple[int, ...] = PROBE_ROWS, budget_s: float = BUDGET_S) -> Crossover:
    """Time the kernel and the dense paths (see the module docstring) and find the crossover.

    The dense format is the faster of bf16 and fp32 at :data:`DENSE_CHOICE_ROWS` rows. Probes run
    in ascending order until the dense path has won at two probes in a row or the budget is
    spent; if the kernel still wins at the last probe, the crossover is extrapolated from the
    last two probes' slopes (None when the kernel's time grows no faster than the dense one's).
    """
    start = time.perf_counter()
    ms: dict[str, dict[int, float]] = {KERNEL: {}, DENSE_BF16: {}, DENSE_FP32: {}}
    for dense in (DENSE_BF16, DENSE_FP32):
        ms[dense][DENSE_CHOICE_ROWS] = _seconds(timer, dense, DENSE_CHOICE_ROWS) * 1e3
    dense = min((DENSE_BF16, DENSE_FP32), key=lambda p: ms[p][DENSE_CHOICE_ROWS])
    measured: list[int] = []
    wins = 0
    for m in probes:
        if measured and time.perf_counter() - start > budget_s:
            break
        ms[KERNEL][m] = _seconds(timer, KERNEL, m) * 1e3
        if m not in ms[dense]:
            ms[dense][m] = _seconds(timer, dense, m) * 1e3
        measured.append(m)
        wins = wins + 1 if ms[dense][m] < ms[KERNEL][m] else 0
        if wins == 2:
            break
    ms = {p: v for p, v in ms.items() if v}
    return Crossover(_crossover_rows(measured, ms[KERNEL], ms[dense]), dense, ms)


def _crossover_rows(measured: list[int], kernel: dict[int, float], dense: dict[int, float]) -> int | None:
    """The smallest measured row count from which the dense path stays faster, else extrapolated."""
    rows = None
    for m in reversed(measured):
        if dense[m] >= kernel[m]:
            break
        rows = m
    if rows is not None or len(measured) < 2:
        return rows
    m1, m2 = measured[-2:]
    slope_k = (kernel[m2] - kernel[m1]) / (m2 - m1)
    slope_d = (dense[m2] - dense[m1]) / (m2 - m1)
    if slope_k <= slope_d:
        return None
    return m2 + max(1, math.ceil((dense[m2] - kernel[m2]) / (slope_k - slope_d)))


class CrossoverTable:
    """Crossovers by key, measured on first use and kept in a JSON file (one per compiled kernel)."""

    def __init__(self, path_fn: Callable[[], Path]) -> None:
        self._path_fn = path_fn
        self._memo: dict[tuple[str, str], Crossover] = {}
        self._lock = threading.Lock()

    def get(self, key: str, timer: Timer) -> Crossover:
        """The crossover for ``key`` (from memory, the file, or measured now with ``timer``)."""
        path = self._path_fn()
        memo_key = (str(path), key)
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        with self._lock:
            found = self._memo.get(memo_key)
            if found is None:
                found = self._read(path).get(key)
            if found is None:
                found = measure(timer)
                log.info("int4 dispatch for %s measured: dense %s from %s rows on", key, found.dense,
                         found.rows if found.rows is not None else "no row count")
                entries = self._read(path)
                entries[key] = found
                write_json(path, {"format": TABLE_FORMAT,
                                  "entries": {k: v.to_json() for k, v in sorted(entries.items())}})
            self._memo[memo_key] = found
        return found

    def _read(self, path: Path) -> dict[str, Crossover]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("ignoring the unreadable dispatch table %s (%s): measuring again", path, exc)
            return {}
        out: dict[str, Crossover] = {}
        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT or not isinstance(doc.get("entries"), dict):
            return out
        for key, entry in doc["entries"].items():
            try:
                out[key] = Crossover.from_json(entry)
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring a bad entry %r in the dispatch table %s", key, path)
        return out

    def clear(self) -> None:
        """Forget what was read or measured in this process (the file stays)."""
        with self._lock:
            self._memo.clear()
