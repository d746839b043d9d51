"""Small filesystem helpers shared by every writer of whole directories."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` to ``dst``; an existing ``dst`` is moved aside, then removed.

    A reader sees either the old or the new directory, never a half-written one.
    """
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
