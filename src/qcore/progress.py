"""The one helper for progress bars and logging in library code."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("qcore")


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("qcore") else f"qcore.{name}")


PROGRESS_ENV = "QCORE_PROGRESS"
_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def progress_enabled() -> bool:
    """Bars on stderr: on a terminal or in a notebook, unless ``QCORE_PROGRESS`` is set (``1`` on, ``0`` off)."""
    flag = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if flag in _OFF:
        return False
    stream = sys.stderr
    if stream is None:
        return False
    if flag in _ON or "ipykernel" in sys.modules:  # forced, or a notebook (tqdm.auto draws widgets)
        return True
    try:
        return stream.isatty()
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on stderr when :func:`progress_enabled`."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True)


def bar(total: int, desc: str, unit: str = "it"):  # noqa: ANN201 - tqdm type
    """A manual tqdm bar (``update``, ``set_postfix``); a no-op when progress is off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), dynamic_ncols=True)
