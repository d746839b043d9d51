"""Subprocess entry point: ``python -m bench._worker TASK SPEC_JSON``; prints one ``BENCH_RESULT {json}``
line.

Each side of a memory comparison runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from bench._common import RESULT_PREFIX, run_worker


def _tasks() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    from bench.saelens_tasks import TASKS
    from bench.train_ratio import rss_read_task

    return {**TASKS, "rss-read": rss_read_task}


def run_task(task: str, spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run a task in a fresh subprocess (``isolate``: its own heap, so its peak RSS is its own) or in this
    process (the tiny smoke run: memory figures are then not meaningful, but every code path runs)."""
    if isolate:
        return run_worker(task, spec)
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
        return _tasks()[task](spec)
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


def main(argv: list[str]) -> int:
    """Run one task and print its result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    task, spec = argv[0], json.loads(argv[1])
    result = _tasks()[task](spec)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
