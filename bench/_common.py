"""Shared by every study: result rows, the machine record, timing and memory helpers, subprocess workers."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULT_PREFIX = "BENCH_RESULT "
"""A worker subprocess prints its JSON result on one stdout line starting with this."""


@dataclass
class Row:
    """One line of the results table."""

    study: str
    """Study key (``build``, ``codecs``, ``fp8``, ``train``, ``rescore``, ``saelens``, ``scaleout``,
    ``resume``, ``labels``, ``writer``)."""
    name: str
    """What was measured."""
    value: float | str | None
    """The number (None when it could not be measured; then ``note`` says why)."""
    unit: str = ""
    """Unit or ``×`` for a ratio."""
    target: str = ""
    """Acceptance target from the issues, e.g. ``≤ 1.05``; empty when the row is informational."""
    note: str = ""
    """Context a reader needs to interpret the number."""

    @property
    def met(self) -> bool | None:
        """Whether ``value`` meets ``target`` (None without a numeric target or value)."""
        if not self.target or not isinstance(self.value, (int, float)):
            return None
        op, _, num = self.target.partition(" ")
        bound = float(num)
        return self.value <= bound if op == "≤" else self.value >= bound if op == "≥" else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``met`` included)."""
        return {**asdict(self), "met": self.met}


@dataclass
class StudyResult:
    """What one study hands to the report."""

    key: str
    """Short key, also the study of its rows."""
    title: str
    """Heading in results.md."""
    rows: list[Row] = field(default_factory=list)
    """Table rows."""
    details: dict[str, Any] = field(default_factory=dict)
    """Everything measured (JSON-ready), including per-repetition numbers."""
    text: str = ""
    """Markdown paragraphs: set-up, explanation of differences, what was not measured."""
    load_at_start: tuple[float, float, float] | None = None
    """1/5/15-minute load averages when the study started."""
    seconds: float = 0.0
    """Wall time of the study."""
    error: str | None = None
    """Set when the study failed; its rows then say so."""


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """CPU feature flags (empty when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_commit(repo: Path) -> str | None:
    """HEAD commit of the repository (with ``-dirty`` when the work tree differs), or None."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_record(threads: int, repo: Path) -> dict[str, Any]:
    """Where and with what the bench ran."""
    import torch

    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "simd": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
        "memory_gib": round(mem_gb, 1),
        "gpu": gpu,
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "transformers",
                "zarr",
                "numcodecs",
                "ml_dtypes",
                "datasets",
                "pyarrow",
                "sae-lens",
                "biorefusalaudit",
            )
        },
        "git_commit": git_commit(repo),
    }


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(xs))


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)


def interleaved(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each timed function ``reps`` times, alternating the order each round (ABBA...), so slow drift of
    the machine's load hits both sides alike. Each function returns its own measured seconds."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(fns[n]())
    return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage; kilobytes on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakSampler:
    """Samples this process's RSS in a background thread; ``peak`` is the largest value seen.

    getrusage's ru_maxrss is a lifetime peak and cannot be reset, so a phase's own peak is sampled instead
    (every ``interval`` seconds: brief spikes shorter than that can be missed).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment for a bench subprocess: offline, no progress bars, quiet tokenizers (a
    subprocess must never reach the network or flood the log), plus ``extra``."""
    return {
        **os.environ,
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_worker(task: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m bench._worker TASK SPEC_JSON`` and return the JSON it reports.

    Workers are separate processes so that each side of a memory comparison starts from a clean heap and
    its peak RSS is its own. Raises RuntimeError with the worker's last stderr lines when it fails.
    """
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench._worker", task, json.dumps(spec)],
        cwd=repo,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    raise RuntimeError(f"worker {task} exited {proc.returncode} without a result:\n{tail}")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for a results note."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number for tables."""
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"
