"""Small filesystem helpers shared by every writer of whole files and directories.

Every temp file or folder is a hidden sibling of its target named ``.NAME.tmp-PID-RANDOM``: the rename
that publishes it is then on one filesystem, and a process killed before the rename leaves a leftover
that the next writer of the same target recognises (its PID is gone) and removes.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import uuid
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
