"""Measured choice, per CPU and layer shape, between CPU int4 kernels and dequantize + dense matmul.

A low-bit kernel wins at a few activation rows (it streams 4-bit weights); a tiled kernel (AMX,
where the CPU has it) wins at tens to hundreds of rows; from some row count on, dequantizing the
weight into a reused scratch buffer and running the CPU's best dense matmul wins (oneDNN's bf16
matmul uses AMX where the CPU has it; fp32 where bf16 is emulated). Where those row counts lie
depends on the CPU, the thread count and the shape, so they are measured: at the first call for a
shape, the paths are timed at :data:`PROBE_ROWS` rows (within about :data:`BUDGET_S` seconds),
and the fastest path at each probe holds from that probe up to the next one that another path
wins. The resulting steps are kept in a JSON table (for ``int4_native``, beside its compiled
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
AMX = "amx"
"""The tiled kernel: weights dequantized panel by panel into AMX tiles (CPUs with AMX-BF16)."""
DENSE_BF16 = "bf16"
"""Dequantize into a reused bf16 buffer, then a bf16 matmul."""
DENSE_FP32 = "fp32"
"""Dequantize into a reused fp32 buffer, then an fp32 matmul."""
PATHS: tuple[str, ...] = (KERNEL, AMX, DENSE_BF16, DENSE_FP32)
DENSE: tuple[str, ...] = (DENSE_BF16, DENSE_FP32)
ENV_PATH = "QCORE_INT4_PATH"
"""Force one of :data:`PATHS` for every call (tests, comparisons); unset or ``auto``: measured."""
PROBE_ROWS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""Row counts timed, in this order, until the dense path has won twice in a row or time is up."""
DROP_FACTOR = 3.0
"""A kernel path slower than this many times a probe's fastest, and not catching up with it (its
time grew at least as fast since the previous probe), is not timed at larger probes."""
DENSE_CHOICE_ROWS = 64
"""Rows at which the bf16 and fp32 dense paths are compared to pick the dense one."""
BUDGET_S = 2.0
"""Soft limit on one shape's measurement (a probe that starts in time finishes)."""
REPS = 3
"""Least timed calls per probe after one warm-up call (the fastest counts: other load only adds
time, and a descheduled OpenMP thread adds milliseconds to a call)."""
PROBE_S = 0.02
"""Short calls are repeated until a probe has taken this long (at most :data:`MAX_REPS` calls)."""
MAX_REPS = 50
TABLE_FORMAT = 2

Timer = Callable[[str, int], float]
"""``timer(path, rows)``: seconds of one call of ``path`` on ``rows`` activation rows."""


@dataclass(frozen=True)
class Crossover:
    """Which path a layer shape takes at each activation row count: a step function."""

    steps: tuple[tuple[int, str], ...]
    """``(from_rows, path)`` in ascending order, the first from 1 row."""
    dense: str
    """:data:`DENSE_BF16` or :data:`DENSE_FP32`: the dense format that was raced."""
    ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Measured milliseconds per path and row count."""

    @property
    def rows(self) -> int | None:
        """From this many rows on the dense path runs; None: a kernel at every row count."""
        return self.steps[-1][0] if self.steps[-1][1] in DENSE else None

    def path(self, rows: int) -> str:
        """The path a call with ``rows`` activation rows takes (:data:`ENV_PATH` first)."""
        forced = forced_path()
        return forced if forced is not None else self.measured_path(rows)

    def measured_path(self, rows: int) -> str:
        """The measured path for ``rows`` activation rows."""
        chosen = self.steps[0][1]
        for start, path in self.steps:
            if rows < start:
                break
            chosen = path
        return chosen

    def to_json(self) -> dict[str, Any]:
        return {"steps": [[m, p] for m, p in self.steps], "dense": self.dense,
                "ms": {p: {str(m): round(t, 4) for m, t in v.items()} for p, v in self.ms.items()}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Crossover:
        steps = tuple((int(m), str(p)) for m, p in doc["steps"])
        if (not steps or steps[0][0] != 1 or any(p not in PATHS for _, p in steps)
                or any(a[0] >= b[0] for a, b in zip(steps, steps[1:])) or doc["dense"] not in DENSE):
            raise ValueError(f"bad crossover entry {doc!r}")
        ms = {p: {int(m): float(t) for m, t in v.items()} for p, v in doc.get("ms", {}).items()}
        return cls(steps, doc["dense"], ms)


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


def measure(timer: Timer, probes: tuple[int, ...] = PROBE_ROWS, budget_s: float = BUDGET_S,
            kernels: tuple[str, ...] = (KERNEL,)) -> Crossover:
    """Time the ``kernels`` and the dense paths (see the module docstring) and find the steps.

    The dense format is the faster of bf16 and fp32 at :data:`DENSE_CHOICE_ROWS` rows. Probes run
    in ascending order until the dense path has won at two probes in a row or the budget is spent;
    a kernel far behind a probe's winner and not catching up (:data:`DROP_FACTOR`) is not timed again.
    If a kernel still wins at the last probe, the next step is extrapolated from the last two
    probes' slopes (none when no other path's time grows more slowly).
    """
    start = time.perf_counter()
    ms: dict[str, dict[int, float]] = {p: {} for p in (*kernels, *DENSE)}
    for dense in DENSE:
        ms[dense][DENSE_CHOICE_ROWS] = _seconds(timer, dense, DENSE_CHOICE_ROWS) * 1e3
    dense = min(DENSE, key=lambda p: ms[p][DENSE_CHOICE_ROWS])
    racing = [*kernels, dense]
    winners: list[tuple[int, str]] = []
    for m in probes:
        if winners and time.perf_counter() - start > budget_s:
            break
        for p in racing:
            if m not in ms[p]:
                ms[p][m] = _seconds(timer, p, m) * 1e3
        best = min(racing, key=lambda p: ms[p][m])
        racing = [p for p in racing if p == dense or not _left_behind(ms[p], ms[best], m, winners)]
        winners.append((m, best))
        if len(winners) >= 2 and winners[-1][1] == winners[-2][1] == dense:
            break
    steps = _steps(winners)
    if steps[-1][1] != dense:
        steps += _extrapolated(winners, ms)
    return Crossover(tuple(steps), dense, {p: v for p, v in ms.items() if v})


def _left_behind(times: dict[int, float], best: dict[int, float], m: int, winners: list[tuple[int, str]]) -> bool:
    """More than :data:`DROP_FACTOR` times the winner's time at ``m`` rows, and grown at least as
    fast as the winner's since the previous probe."""
    if not winners or times[m] <= DROP_FACTOR * best[m]:
        return False
    prev = winners[-1][0]
    return prev in times and prev in best and times[m] - times[prev] >= best[m] - best[prev]


def _steps(winners: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Each probe's winner from that probe on (the first from 1 row), repeats merged."""
    steps: list[tuple[int, str]] = []
    for m, p in winners:
        if not steps:
            steps.append((1, p))
        elif steps[-1][1] != p:
            steps.append((m, p))
    return steps


def _extrapolated(winners: list[tuple[int, str]], ms: dict[str, dict[int, float]]) -> list[tuple[int, str]]:
    """The step past the last probe where the path whose time grows most slowly overtakes the
    last winner, from the last two probes' slopes (empty when none does)."""
    if len(winners) < 2:
        return []
    (m1, _), (m2, last) = winners[-2:]
    slope_w = (ms[last][m2] - ms[last][m1]) / (m2 - m1)
    best: tuple[int, str] | None = None
    for p, times in ms.items():
        if p == last or m1 not in times or m2 not in times:
            continue
        slope_p = (times[m2] - times[m1]) / (m2 - m1)
        if slope_p >= slope_w:
            continue
        cross = m2 + max(1, math.ceil((times[m2] - ms[last][m2]) / (slope_w - slope_p)))
        if best is None or cross < best[0]:
            best = (cross, p)
    return [] if best is None else [best]


class CrossoverTable:
    """Crossovers by key, measured on first use and kept in a JSON file (one per compiled kernel)."""

    def __init__(self, path_fn: Callable[[], Path]) -> None:
        self._path_fn = path_fn
        self._memo: dict[tuple[str, str], Crossover] = {}
        self._lock = threading.Lock()

    def get(self, key: str, timer: Timer, kernels: tuple[str, ...] = (KERNEL,)) -> Crossover:
        """The crossover for ``key`` (from memory, the file, or measured now with ``timer``,
        racing ``kernels`` against the dense paths)."""
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
                found = measure(timer, kernels=kernels)
                log.info("int4 dispatch for %s measured: %s", key,
                         ", ".join(f"{p} from {m} rows" for m, p in found.steps))
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
