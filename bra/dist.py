"""Multi-process runs on PyTorch's own engine: ranks from the environment ``torchrun`` sets, a process group
(gloo for coordination on any machine, nccl for CUDA training), and the few collectives the pipeline needs.

Nothing here reads the environment at import; ``process_group()`` does, when a command starts. A single
process (no ``WORLD_SIZE``, or 1) gets ``SINGLE``, whose collectives are no-ops, so library code calls them
unconditionally.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from bra.errors import BraError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Ranks wait at barriers while the others finish their share (hours on a big build). A dead peer is
# noticed at once (its socket closes, and torchrun stops the group), so a long timeout costs nothing.
DEFAULT_TIMEOUT = timedelta(hours=24)


class RankError(BraError):
    """Another rank failed; this one stops too (one-line message naming the rank)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a group of processes (``SINGLE`` when alone)."""

    rank: int = 0
    """Global rank."""
    world: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (its GPU index)."""
    local_world: int = 1
    """Processes on this machine (they share its CPU cores)."""

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: creates and finalizes stores, writes checkpoints and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; an error it raises is raised on
        every rank (so no rank waits forever at the next collective)."""
        result: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                result = (True, fn())
            except Exception as exc:  # re-raised below, on every rank
                if not self.active:
                    raise
                result = (False, _picklable(exc))
        ok, value = self.broadcast(result)
        if not ok:
            raise value
        return value

    def check(self, error: BaseException | None) -> None:
        """Collective: raise on every rank when any rank passes an error (the failing rank raises its own)."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.gather(None if error is None else f"{type(error).__name__}: {error}".splitlines()[0])
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise RankError(f"rank {failed[0][0]} failed ({failed[0][1]})")


SINGLE = Dist()


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself when it survives pickling, else a BraError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # exceptions with extra required __init__ arguments
        return BraError(f"{type(exc).__name__}: {exc}")


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_world: int) -> int:
    """Torch CPU threads per process when ``local_world`` processes share this machine's cores."""
    return max(1, cpu_cores() // max(1, local_world))


@contextmanager
def process_group(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[Dist]:
    """Join the group ``torchrun`` described in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ...) for the duration of a command; ``SINGLE`` without one. ``backend`` defaults to gloo.

    Each rank then runs ``threads_per_rank`` torch CPU threads, so N ranks on one machine share its cores
    instead of oversubscribing them.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield SINGLE
        return
    import torch.distributed as tdist

    d = Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
             local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    torch.set_num_threads(threads_per_rank(d.local_world))
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    tdist.init_process_group(backend or "gloo", timeout=timeout)
    logger.info("rank %d of %d (local %d of %d, %d CPU threads, backend %s)", d.rank, d.world, d.local_rank,
                d.local_world, torch.get_num_threads(), tdist.get_backend())
    try:
        yield d
    finally:
        tdist.destroy_process_group()


def launch(module: str, argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m module argv`` in ``nproc`` processes on this machine under torchrun (standalone
    rendezvous on a free local port); return torchrun's exit code. torchrun stops every process when one
    fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)
