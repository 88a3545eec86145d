"""GPU benchmark: every CUDA preset, results into benchmarks/results/cuda.{csv,json,md}.

    python benchmarks/run_gpu.py [more gradstab.bench options]

On the device machine, benchmarks/gpu_check.sh runs ``python -m gradstab bench --device cuda``
with its results under $OUT instead.
"""

from __future__ import annotations

import sys

from run_cpu import run

if __name__ == "__main__":
    sys.exit(run("cuda", sys.argv[1:]))
