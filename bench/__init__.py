"""Benchmarks (issue 7): build ÷ bare forward, bytes per token by dtype/codec, opt-in fp8, training from the
store ÷ from RAM, re-score ÷ rebuild, the side-by-side with SAELens, and scale-out (1 vs N build processes;
object-store read throughput by shard size). Run ``python -m bench``."""

from bench.config import SIZES, STUDIES, BenchConfig, get_config

__all__ = ["SIZES", "STUDIES", "BenchConfig", "get_config", "run_bench"]


def run_bench(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin lazy re-export
    """See `bench.runner.run_bench` (imported lazily: it pulls in torch)."""
    from bench.runner import run_bench as _run

    return _run(*args, **kwargs)
