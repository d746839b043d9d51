"""The one way this project writes a whole file or directory: temp sibling, fsync, rename, one sweep.

Every temp file or folder is a hidden sibling of its target named ``.NAME.tmp-PID-RANDOM``: the rename
that publishes it is then on one filesystem, and a process killed before the rename leaves a leftover
that the next writer of the same target recognises (its PID is gone) and removes. Data is fsynced before
the rename and the parent folder after it (the zarr ``_atomic_write`` shape, plus durability), so a power
cut shows the old file or the new one, never an empty one. A write that fails removes its temp at once.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden path beside ``target`` (not created), after removing leftovers of dead processes."""
    sweep_leftovers(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def sweep_leftovers(target: Path) -> list[Path]:
    """Remove ``target``'s temp siblings left by processes that no longer run; return what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            pid = leftover.name[len(target.name) + len(kind) + 3:].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                logger.info("removing %s (left by a killed process %s)", leftover, pid)
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def make_temp_dir(target: Path) -> Path:
    """Create and return a temp folder beside ``target`` (readable like a normal folder)."""
    tmp = temp_sibling(target)
    tmp.mkdir(mode=0o755)
    return tmp


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` to ``dst``; an existing ``dst`` is moved aside, then removed.

    A reader sees either the old or the new directory, never a half-written one.
    """
    if not dst.exists():
        os.replace(src, dst)
        return
    old = temp_sibling(dst, "old")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _rename_unless_present(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless a non-empty ``dst`` exists (then ``src`` is left for the caller)."""
    try:
        os.rename(src, dst)  # replaces an empty folder, fails on a non-empty one
    except OSError:
        if not dst.is_dir():
            raise
        logger.info("%s was published by another process first; keeping it", dst)


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems refuse to open folders; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on a clean exit fsync it and rename it onto ``target``.

    The caller writes the temp path however it likes (``Path.write_bytes``, ``save_file``, pyarrow). On an
    exception (a full disk, a bug) the temp is removed and ``target`` is untouched.
    """
    target = Path(target)
    tmp = temp_sibling(target)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see `atomic_file`)."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically (see `atomic_file`)."""
    write_bytes_atomic(target, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: str | os.PathLike[str], keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``target``; on a clean exit fsync its files and swap it in whole
    (`replace_dir`: an existing ``target`` is replaced). On an exception the temp folder is removed.

    ``keep_existing``: when ``target`` already exists at the end (another process published it first), keep
    it and drop this one. For caches whose writers all produce the same contents: replacing would pull the
    folder from under a process that is reading it.
    """
    target = Path(target)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_path(path)
        _fsync_path(tmp)
        if keep_existing:
            _rename_unless_present(tmp, target)
        else:
            replace_dir(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_foreign_output(out: Path, marker: str) -> bool:
    """Whether ``out`` may not be replaced whole by an output folder whose ``marker`` file identifies it:
    it is a file, or a folder holding anything but a previous such output (an empty folder is ours)."""
    return out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file()))
