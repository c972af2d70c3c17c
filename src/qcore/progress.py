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


def progress_enabled() -> bool:
    return os.environ.get("QCORE_PROGRESS", "1") != "0" and sys.stderr is not None


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on stderr (disabled with QCORE_PROGRESS=0)."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True)


def bar(total: int, desc: str, unit: str = "it"):  # noqa: ANN201 - tqdm type
    """A manual tqdm bar (``update``, ``set_postfix``); a no-op when progress is off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), dynamic_ncols=True)
