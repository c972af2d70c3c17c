"""Output of the ``qcore`` command for terminals and scripts: tables that fit, ``--json``, plots.

- :func:`table`: rows as a ``|``-separated table no wider than :data:`TABLE_WIDTH` columns (long
  cells wrap onto continuation lines);
- :func:`emit`: a command's text, or with ``--json`` its data as JSON on stdout (``--json FILE``:
  the text on stdout and the JSON in FILE);
- :func:`quiet_known_warnings`: third-party warnings that say nothing to a ``qcore`` user, filtered
  for the command line only (the library leaves Python's warning filters alone);
- :func:`plot_layers`: ``qcore info DIR --plot out.png``, per-layer bits and relative weight error.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcore.plugin.errors import ConfigError

TABLE_WIDTH = 100
"""Widest table ``qcore`` prints, in columns (frame included)."""
MIN_COLUMN = 8
"""A wrapped column keeps at least this many characters."""
JSON_STDOUT = "-"
"""``--json`` without a file: JSON on stdout instead of the text."""

#: (category, message regex, module regex) of third-party warnings filtered on the command line:
#: raised by dependencies on qcore's own runs (seen with ``-W default`` on the qlora plugin's runs,
#: 2026-12-01), each about the dependencies' internals and asking nothing of a ``qcore`` user.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # peft asks transformers for the old name of the checkpointing flag (QLoRA adapters)
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated.*", r"transformers\.modeling_utils"),
    # torch's TorchScript decorator, applied at import by a dependency of the qlora plugin
    (DeprecationWarning, r".*`torch\.jit\.script_method` is deprecated.*", r"torch\.jit\._script"),
)


def quiet_known_warnings() -> None:
    """Filter :data:`KNOWN_WARNINGS` (``-W``/``PYTHONWARNINGS`` given by the user still win)."""
    if sys.warnoptions:
        return
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _cell_lines(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for part in str(text).splitlines() or [""]:
        lines += textwrap.wrap(part, width, break_long_words=True, break_on_hyphens=False) or [""]
    return lines


def table(rows: Sequence[Sequence[Any]], max_width: int = TABLE_WIDTH) -> str:
    """``| a | b |`` rows with a rule under the header, at most ``max_width`` columns wide.

    When the natural widths do not fit, the widest columns are narrowed (never below
    :data:`MIN_COLUMN`) and their cells wrap onto continuation lines.
    """
    cells = [[str(c) for c in r] for r in rows]
    n = len(cells[0])
    widths = [max(max((len(line) for line in r[i].splitlines()), default=0) for r in cells) for i in range(n)]
    words = [max(max((len(w) for w in r[i].split()), default=0) for r in cells) for i in range(n)]
    frame = 3 * n + 1  # "| " + " | " between cells + " |"
    # first wrap at spaces (widest column first, never below its longest word), then break words
    for floor in ([max(w, MIN_COLUMN) for w in words], [MIN_COLUMN] * n):
        while sum(widths) + frame > max_width:
            over = [j for j in range(n) if widths[j] > floor[j]]
            if not over:
                break
            widths[max(over, key=lambda j: widths[j])] -= 1
    out: list[str] = []
    for k, r in enumerate(cells):
        wrapped = [_cell_lines(c, w) for c, w in zip(r, widths)]
        for line in range(max(len(w) for w in wrapped)):
            out.append("| " + " | ".join((w[line] if line < len(w) else "").ljust(widths[j])
                                         for j, w in enumerate(wrapped)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def emit(target: str | None, data: Any, text: str | None) -> None:
    """Print ``text``; with ``target == "-"`` print ``data`` as JSON instead; with a file name write
    the JSON there too (atomically)."""
    if target == JSON_STDOUT:
        print(json.dumps(data, indent=2, default=str))
        return
    if text is not None:
        print(text)
    if target:
        from qcore.checkpoint import write_json

        write_json(target, data, default=str)


def jsonable(obj: Any) -> Any:
    """Dataclasses and objects with ``__dict__`` as plain dicts (for ``--json``)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (dict, list, str, int, float, bool)) or obj is None:
        return obj
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else str(obj)


def plot_layers(desc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw per-layer bits and relative weight error of a :func:`qcore.checkpoint.describe_checkpoint`
    description into an image file (format from the suffix: png, pdf, svg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed; install it with: "
                          "pip install matplotlib") from None
    rows = [r for r in desc["layers"] if r["kind"] == "quantized"]
    if not rows:
        raise ConfigError(f"{desc['source']} has no quantized layers to plot")
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {out.parent} does not exist")
    x = range(len(rows))
    errors = [r.get("weight_error") for r in rows]
    has_error = any(e is not None for e in errors)
    fig, axes = plt.subplots(2 if has_error else 1, 1, sharex=True, squeeze=False,
                             figsize=(max(6.0, min(0.12 * len(rows), 40.0)), 6 if has_error else 3.5))
    ax = axes[0][0]
    ax.bar(x, [r["bits"] for r in rows], color="tab:blue", width=0.8)
    ax.set_ylabel("bits")
    ax.set_title(f"{desc['source']}: {len(rows)} quantized layers")
    if has_error:
        ax2 = axes[1][0]
        ax2.bar(x, [e if e is not None else 0.0 for e in errors], color="tab:red", width=0.8)
        ax2.set_ylabel("relative weight error\n||W - Q||F / ||W||F")
    last = axes[-1][0]
    step = max(1, len(rows) // 40)
    last.set_xticks(list(x)[::step])
    last.set_xticklabels([r["name"] for r in rows][::step], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
