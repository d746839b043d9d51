"""Whole shards written on several threads at once, so that compression keeps up with a GPU's forward pass.

Zarr's synchronous API runs every codec from one event loop for the whole process. Its blosc calls go to
worker threads, but the CRC32C codec, the sharding codec's assembly of a shard and the buffer copies run on
that loop's single thread, so threads that write through it add little: writing 75 MB bf16 shards (d_model
2304, the default codec) on this project's 2-vCPU machine at load 0.3, 2 threads through the synchronous API
wrote 0.267 GB/s against 0.235 for 1 (1.14x), and 2 threads with their own loops 0.271 against 0.150 for 1
own-loop thread (1.81x; one side measurement, best of 3, before bench study 10 existed). Here each writer
thread runs its own event loop with one compressor thread, and writes
whole shards (two writers in one shard would lose data, so a shard is never split between threads): N
threads compress N shards at once. Only local stores use these loops. An fsspec filesystem (s3, memory) is
bound to zarr's loop, so threads writing a remote store use the synchronous API (requests in flight at once,
one loop).

The rows a store holds do not depend on the thread count: every shard is written whole with the same codec,
and statistics partials are kept per shard (merged in shard order at the end).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

MAX_DEFAULT_THREADS = 4
"""When the forward pass runs on the CPU, the default writer thread count is this rank's cores, at most this
many: the forward needs the cores, and a CPU forward produces rows far slower than one thread writes them
(study 1: ~1,200 tok/s on 2 cores; study 10: ~14,000 tokens per CPU-second of one writer thread)."""

_LOCAL = threading.local()
_STOP = object()


def thread_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the `ShardWriterPool` thread calling this, or None on any other thread."""
    return getattr(_LOCAL, "loop", None)


def default_writer_threads(local_world: int = 1, accelerator: bool = False) -> int:
    """Writer threads of one build process when ``local_world`` processes share this machine's cores: on an
    ``accelerator`` (the forward runs on a GPU) every core of this rank but one (which feeds the GPU and
    encodes rows), since a GPU produces rows faster than several cores compress them (study 10); on a CPU
    at most ``MAX_DEFAULT_THREADS``."""
    from bra.dist import threads_per_rank  # bra.dist imports torch; `bra-cache info` never needs it

    cores = threads_per_rank(local_world)
    return max(1, cores - 1) if accelerator else max(1, min(MAX_DEFAULT_THREADS, cores))


class ShardWriterPool:
    """Runs shard writes (``submit(writer.write_shard, shard, ...)``) on ``threads`` threads, each with its
    own event loop; at most ``queued`` writes wait for a thread (``submit`` blocks then: the forward loop
    waits instead of buffering without bound). Use as a context manager: leaving it normally waits for every
    write and raises the first error any write raised; leaving it with an exception drops the writes not
    started.

    A write that fails is re-raised in the submitting thread at its next ``submit`` or at the end (its type
    kept, KeyboardInterrupt included); writes after it are not started.
    """

    def __init__(self, threads: int, queued: int | None = None, name: str = "bra-writer"):
        if threads < 1:
            raise ValueError(f"writer threads must be at least 1, got {threads}")
        self.threads = threads
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queued if queued is not None else threads)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    def submit(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Queue one write (blocks while ``queued`` writes are waiting); raise a failed write's error."""
        self._raise_error()
        self._queue.put((fn, args, kwargs))

    def close(self, abort: bool = False) -> None:
        """Wait for the queued writes (or, with ``abort``, for the running ones only) and stop the threads;
        raise the first error of a write unless aborting."""
        if abort:
            self._abort.set()
        for _ in self._workers:
            self._queue.put(_STOP)
        for w in self._workers:
            w.join()
        if not abort:
            self._raise_error()

    def __enter__(self) -> ShardWriterPool:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(abort=exc_type is not None)

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _work(self) -> None:
        loop, codec = _open_thread_loop()
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._abort.is_set() or self._error is not None:
                    continue  # drain: nothing after a failure or an abort is started
                fn, args, kwargs = item
                try:
                    fn(*args, **kwargs)
                except BaseException as exc:  # re-raised in the submitting thread, whatever it is
                    with self._lock:
                        if self._error is None:
                            self._error = exc
        finally:
            _LOCAL.loop = None
            _close_thread_loop(loop, codec)


def _open_thread_loop() -> tuple[asyncio.AbstractEventLoop, ThreadPoolExecutor]:
    """A new event loop for the calling thread (`thread_loop` returns it) and its one codec thread: blosc
    runs in the loop's default executor (asyncio.to_thread)."""
    loop = asyncio.new_event_loop()
    codec = ThreadPoolExecutor(1, thread_name_prefix=f"{threading.current_thread().name}-codec")
    loop.set_default_executor(codec)
    _LOCAL.loop = loop
    return loop, codec


def _close_thread_loop(loop: asyncio.AbstractEventLoop, codec: ThreadPoolExecutor) -> None:
    """Stop the codec thread, then close the loop. Not ``loop.shutdown_default_executor``: it starts a
    thread, which hangs when this runs while the interpreter exits (a stream's generator finalised then)."""
    codec.shutdown(wait=True)
    loop.close()


def _start_thread_loop(loops: list[tuple[asyncio.AbstractEventLoop, ThreadPoolExecutor]],
                       lock: threading.Lock) -> None:
    opened = _open_thread_loop()
    with lock:
        loops.append(opened)


class LoopThreadPool(ThreadPoolExecutor):
    """A thread pool whose threads each run their own event loop (`thread_loop`), so that reads of a local
    store through `bra.cache.store.Store.read_rows` decode on several threads at once instead of queueing
    on zarr's one loop: the reading counterpart of `ShardWriterPool`. The loops close at ``shutdown``."""

    def __init__(self, threads: int, thread_name_prefix: str = "bra-reader"):
        self._loops: list[tuple[asyncio.AbstractEventLoop, ThreadPoolExecutor]] = []
        super().__init__(threads, thread_name_prefix=thread_name_prefix, initializer=_start_thread_loop,
                         initargs=(self._loops, threading.Lock()))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads, then their loops (`_close_thread_loop`)."""
        super().shutdown(wait=True, cancel_futures=cancel_futures)
        for loop, codec in self._loops:
            _close_thread_loop(loop, codec)
        self._loops.clear()
