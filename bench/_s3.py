"""A throwaway S3 endpoint for the bench: a moto server on 127.0.0.1 that the code under measurement reaches
through the usual AWS environment variables, exactly as it would reach MinIO, Ceph or AWS.

The tests start the same server with a pytest fixture; the bench must not import tests/, so this is its own
small context manager. Nothing here touches the network beyond the loopback interface.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

logger = logging.getLogger(__name__)

NEEDS = ("moto", "s3fs")
"""Packages the endpoint needs (``pip install -e '.[test]'`` brings both)."""


def missing_packages() -> list[str]:
    """Which of ``NEEDS`` are not installed (an empty list when the endpoint can start)."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


@dataclass
class Endpoint:
    """A running moto endpoint. ``latency_s`` is added before every GET the server answers (read while
    serving, so it may be changed between reads): loopback has none, real object stores tens of ms."""

    url: str
    latency_s: float = 0.0


def _delayed(app: Any, endpoint: Endpoint) -> Any:
    """WSGI middleware: sleep ``endpoint.latency_s`` before a GET (a first-byte delay; the sleep releases
    the GIL, so concurrent requests wait in parallel as they would on a network)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        if endpoint.latency_s > 0 and environ.get("REQUEST_METHOD") == "GET":
            time.sleep(endpoint.latency_s)
        return app(environ, start_response)

    return wrapped


def _server(endpoint: Endpoint) -> Any:
    """moto's ThreadedMotoServer with ``_delayed`` around its WSGI app (its serving method is replaced;
    moto has no hook for it)."""
    from moto.moto_server import threaded_moto_server as tms

    class DelayedMotoServer(tms.ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _delayed(tms.DomainDispatcherApplication(tms.create_backend_app), endpoint)
            self._server = tms.make_server(self._ip_address, self._port, app, True,
                                           request_handler=tms.MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return DelayedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)


@contextmanager
def moto_s3(bucket: str = "bench") -> Iterator[Endpoint]:
    """A moto S3 server on a free loopback port with an empty ``bucket``; yields its ``Endpoint``.

    s3fs reads the environment when a filesystem is first made and caches filesystems, so the cache is
    cleared on entry (pick up this endpoint) and on exit (no later caller gets a filesystem pointing at a
    stopped server; their sessions are closed first).
    """
    missing = missing_packages()
    if missing:
        raise ModuleNotFoundError(f"{', '.join(missing)} not installed (pip install -e '.[test]')")
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    endpoint = Endpoint("")
    server = _server(endpoint)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint.url = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_ENDPOINT_URL": endpoint.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        # set for the block only: the studies after this one must see no AWS settings
        with mock.patch.dict(os.environ, env):
            s3fs.S3FileSystem.clear_instance_cache()
            try:
                s3fs.S3FileSystem().mkdir(bucket)
                logger.info("moto S3 at %s, bucket %s", endpoint.url, bucket)
                yield endpoint
            finally:
                close_filesystems()
    finally:
        server.stop()


def close_filesystems() -> None:
    """Close the HTTP sessions of every cached s3fs filesystem, then forget them: Zarr's async filesystems
    otherwise keep sessions to the stopped server open until exit ("Unclosed client session" errors)."""
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if client is None:
            continue
        if fs.asynchronous:  # made by Zarr's FsspecStore: its sessions live on Zarr's event loop
            sync(client.close())
        else:
            s3fs.S3FileSystem.close_session(fs.loop, client)
    s3fs.S3FileSystem.clear_instance_cache()
