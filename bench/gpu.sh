#!/usr/bin/env bash
# The GPU numbers of issue 18 in one command, on one CUDA device, in at most 8 minutes (BRA_GPU_TIMEOUT s):
# build tok/s, build ÷ bare forward, writer GB/s, SAE steps/s from the store and from RAM, SAELens side by
# side, at gemma-2-2b's widths with random weights (no download). Writes bench/results-gpu.md (+ .json) after
# every phase. Options: bench/gpu.sh --help. Without a CUDA device: one line on stderr, exit 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout --foreground "${BRA_GPU_TIMEOUT:-480}" "$PY" -m bench.gpu "$@"
