"""The one atomic writer: every file and folder qcore writes goes through here.

A folder (:func:`atomic_dir`) is written into a temporary folder beside its target, marked as
qcore's, synced and renamed into place; a single file (:func:`atomic_file`, :func:`write_json`)
is written to a temporary file beside it, synced and renamed. A failure leaves the target as it
was; permissions follow the umask. Only a folder qcore wrote may be replaced, only when asked to,
and never a model being read (:func:`check_target`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcore.plugin.errors import CheckpointError
from qcore.progress import get_logger

if TYPE_CHECKING:
    from torch import nn

log = get_logger("io")

MARKER_FILE = ".qcore-written.json"
"""Written last into every folder qcore creates: what wrote it and the files it holds. Only a
folder carrying it (and holding nothing else) may be replaced, and only when asked to."""
TMP_INFIX = ".qcore-tmp-"
OLD_INFIX = ".qcore-old-"
PARTIAL_INFIX = ".qcore-partial"
"""``.<name>.qcore-partial`` beside an output: the resumable state of a streamed run
(:mod:`qcore.pipeline.stream`). Never deleted here: rerunning the same command resumes from it."""
LOCK_FILE = "lock"


# -- single files ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is given ``mode`` less the
    umask, synced and renamed to ``path`` (replacing a file there), on failure deleted. The parent
    folder is created when missing."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP_INFIX}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns the path. ``default``
    converts values JSON lacks (``str`` for reports); without it they are an error."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=default) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# -- folders --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False, kind: str = "checkpoint",
               inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success qcore's marker is added, the files
    are synced and the folder is renamed to ``path``, on failure it is deleted, leaving ``path``
    as it was. Only a folder qcore wrote may be replaced, and only with ``overwrite``
    (:func:`check_target`). Permissions follow the umask."""
    target = check_target(path, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_INFIX}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        mask = _umask()
        files = sorted(f.name for f in tmp.iterdir())
        write_json(tmp / MARKER_FILE, {"writer": "qcore", "kind": kind, "files": files}, sort_keys=True)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
                _fsync_file(f)
        os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        check_target(target, overwrite, inputs)  # again: the folder may have changed meanwhile
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a folder qcore wrote, or None (no marker, or not one of qcore's)."""
    try:
        data = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == "qcore" else None


def _foreign_entries(path: Path, marker: dict[str, Any]) -> list[str]:
    """Entries of a qcore-written folder that qcore did not write there (the user's)."""
    ours = set(marker.get("files", [])) | {MARKER_FILE}
    return sorted(e.name for e in path.iterdir() if e.name not in ours)


def check_target(path: str | os.PathLike[str], overwrite: bool = False,
                 inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse an output folder whose writing could delete anything of the user's.

    Allowed: a path that does not exist, an empty folder, or (only with ``overwrite``) a folder
    that qcore wrote (its marker lists every entry in it). Never a model being read (``inputs``),
    a folder containing one, the current directory or one of its parents. Returns the absolute
    target; raises :class:`CheckpointError` with the reason and the fix otherwise.
    """
    target = Path(path).expanduser().absolute()
    resolved = target.resolve()
    for src in inputs:
        s = Path(src).expanduser().resolve()
        if resolved == s or resolved in s.parents:
            raise CheckpointError(f"{target} is (or contains) the input model {src}; writing there would "
                                  "delete it: pass another output folder")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(f"{target} is the current directory or one of its parents; qcore writes a "
                              "whole folder: pass a new folder, e.g. --out out/model-q4")
    if not target.exists():
        return target
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is a file; qcore writes a folder: pass a new folder")
    entries = sorted(e.name for e in target.iterdir())
    if not entries:
        return target
    marker = read_marker(target)
    if marker is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(f"{target} exists and was not written by qcore (it holds {shown}); refusing to "
                              "replace it: pass a new or empty folder")
    foreign = _foreign_entries(target, marker)
    if foreign:
        raise CheckpointError(f"{target} was written by qcore but now also holds {', '.join(foreign[:5])}, "
                              "which qcore did not write; refusing to replace it: move those files out or "
                              "pass another folder")
    if not overwrite:
        raise CheckpointError(f"{target} already holds a qcore {marker.get('kind', 'output')}; pass "
                              "overwrite=True (--overwrite on the command line) to replace it, or pick "
                              "another folder")
    return target


def model_sources(model: nn.Module) -> tuple[str, ...]:
    """Local folders ``model`` was read from (its ``name_or_path``), which no write may replace."""
    src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return (str(src),) if src and Path(str(src)).expanduser().is_dir() else ()


def clean_leftovers(target: Path) -> list[Path]:
    """Delete what interrupted writes of ``target`` left beside it: temporary folders of
    processes that are gone, and a moved-aside earlier version once ``target`` exists again.
    A moved-aside version is the only copy while ``target`` is missing: it is kept and reported
    (by :func:`qcore.checkpoint.load` too). Returns what was removed."""
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(f".{target.name}{TMP_INFIX}*"):
        pid = tmp.name.removeprefix(f".{target.name}{TMP_INFIX}").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and read_marker(tmp) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    old = sorted(parent.glob(f".{target.name}{OLD_INFIX}*"))
    if old and target.is_dir():
        for o in old:
            shutil.rmtree(o, ignore_errors=True)
            removed.append(o)
    elif old:
        log.warning("%s is missing but an interrupted write left its earlier version at %s: rename it back",
                    target, old[-1])
    partial = parent / f".{target.name}{PARTIAL_INFIX}"
    if partial.is_dir() and not partial_in_use(partial):
        log.warning("%s holds the resumable state of an interrupted streamed quantization of %s: rerun the same "
                    "command to resume it, or delete that folder", partial, target)
    for r in removed:
        log.info("removed %s, left by an interrupted write", r)
    return removed


def partial_in_use(partial: Path) -> bool:
    """Whether a live process holds the lock of the streamed-run state folder ``partial``."""
    import fcntl

    try:
        fd = os.open(partial / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(parent)
        return
    old = parent / f".{target.name}{OLD_INFIX}{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


# -- small system helpers -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)
