"""Where a store lives: a local folder (plain pathlib, as always) or a URL served by fsspec.

``cache/demo.zarr`` and ``file:///abs/demo.zarr`` are local folders. Any other ``scheme://`` (``memory://``,
``s3://``, ``gs://``, ...) goes through fsspec: Zarr reads and writes the arrays via
``zarr.storage.FsspecStore``, and the few non-Zarr files (``docs.parquet``, ``prompts.parquet``) through the
same filesystem. Credentials and endpoints come from the usual environment of each filesystem
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ... for s3fs) or from fsspec's own
``FSSPEC_<PROTOCOL>_<OPTION>`` variables, read when the filesystem is first made.

Object stores have no rename, so where a local write goes through a temp sibling and a rename
(``bra.fsutil.atomic_file``), a remote one relies on single-object PUTs being atomic and on completion
markers written last (see ``bra.cache.writer``).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from bra.fsutil import atomic_file, write_bytes_atomic

logger = logging.getLogger(__name__)

GROUP_METADATA = "zarr.json"


def is_url(spec: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (a Path never is: pathlib collapses the double slash)."""
    return isinstance(spec, str) and "://" in spec


class StoreLocation:
    """A store's root, local or remote, with the handful of file operations the pipeline needs."""

    def __init__(self, spec: str | os.PathLike[str]):
        self.spec = str(spec)
        self.local: Path | None = None
        self.url: str | None = None
        if is_url(spec):
            parsed = urlparse(str(spec))
            if parsed.scheme == "file":
                self.local = Path(unquote(parsed.netloc + parsed.path))
            else:
                self.url = str(spec).rstrip("/")
        else:
            self.local = Path(spec)

    @classmethod
    def parse(cls, spec: str | os.PathLike[str] | StoreLocation) -> StoreLocation:
        """A location from a path, a URL or a location."""
        return spec if isinstance(spec, StoreLocation) else cls(spec)

    def __str__(self) -> str:
        return str(self.local) if self.local is not None and not is_url(self.spec) else self.spec

    def __repr__(self) -> str:
        return f"StoreLocation({self.spec!r})"

    @property
    def is_local(self) -> bool:
        """A folder on this machine's file system."""
        return self.local is not None

    @property
    def handle(self) -> Path | str:
        """What callers see as the store's path: a ``Path`` for local stores, the URL otherwise."""
        return self.local if self.local is not None else str(self.url)

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        """(synchronous fsspec filesystem, root path inside it); remote locations only."""
        from fsspec.core import url_to_fs

        assert self.url is not None
        fs, root = url_to_fs(self.url)
        return fs, root.rstrip("/")

    def _remote(self, name: str = "") -> str:
        root = self._fs[1]
        return f"{root}/{name}" if name else root

    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` takes: the folder as a string, or an FsspecStore."""
        if self.local is not None:
            return str(self.local)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(self.url), read_only=read_only)

    def open_group(self, mode: str) -> Any:
        """The root Zarr group (``mode`` as in ``zarr.open_group``)."""
        import zarr

        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]

    def child(self, name: str) -> str:
        """Path or URL of a file inside the store, for messages."""
        return str(self.local / name) if self.local is not None else f"{self.url}/{name}"

    def is_store(self) -> bool:
        """True when the location holds a Zarr group."""
        return self.has_file(GROUP_METADATA)

    def has_file(self, name: str) -> bool:
        """True when ``name`` (relative to the root) is a file."""
        if self.local is not None:
            return (self.local / name).is_file()
        fs = self._fs[0]
        fs.invalidate_cache()
        return bool(fs.isfile(self._remote(name)))

    def is_empty(self) -> bool:
        """True when nothing is at the location (or an empty folder is)."""
        if self.local is not None:
            return not self.local.exists() or (self.local.is_dir() and not any(self.local.iterdir()))
        fs = self._fs[0]
        fs.invalidate_cache()
        return not fs.find(self._remote())

    def read_bytes(self, name: str) -> bytes:
        """Contents of a file inside the store."""
        if self.local is not None:
            return (self.local / name).read_bytes()
        return bytes(self._fs[0].cat_file(self._remote(name)))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file so that a reader sees the old or the new contents, never half of them.

        Local: a temp sibling renamed into place (``bra.fsutil``). Remote: one PUT (object stores publish an
        object whole).
        """
        if self.local is None:
            self._fs[0].pipe_file(self._remote(name), data)
            return
        write_bytes_atomic(self.local / name, data)

    def read_table(self, name: str) -> pd.DataFrame:
        """A parquet table inside the store."""
        if self.local is not None:
            return pd.read_parquet(self.local / name)
        return pd.read_parquet(io.BytesIO(self.read_bytes(name)))

    def write_table(self, name: str, table: pd.DataFrame) -> None:
        """Write a parquet table atomically (see ``write_bytes``)."""
        if self.local is None:
            buf = io.BytesIO()
            table.to_parquet(buf, index=False)
            self.write_bytes(name, buf.getvalue())
            return
        with atomic_file(self.local / name) as tmp:
            table.to_parquet(tmp, index=False)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of all files under ``prefix`` (the whole store by default)."""
        if self.local is not None:
            p = self.local / prefix if prefix else self.local
            if p.is_file():
                return p.stat().st_size
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        fs = self._fs[0]
        fs.invalidate_cache()
        return int(fs.du(self._remote(prefix), total=True))

    def remove(self) -> None:
        """Delete everything at the location."""
        if self.local is not None:
            shutil.rmtree(self.local)
            return
        fs = self._fs[0]
        fs.invalidate_cache()
        if fs.exists(self._remote()):
            fs.rm(self._remote(), recursive=True)
        fs.invalidate_cache()
