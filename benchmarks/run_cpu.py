"""CPU benchmark: every CPU preset, results into benchmarks/results/cpu.{csv,json,md}.

    python benchmarks/run_cpu.py [more gradstab.bench options, e.g. --preset gpt2-small]

A thin wrapper over ``python -m gradstab bench``; see docs/benchmarks.md for the figures.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from gradstab import bench

RESULTS = Path(__file__).resolve().parent / "results"


def run(device: str, argv: list[str]) -> int:
    """Runs the engine for ``device``, printing the table and saving it beside the CSV."""
    stem = RESULTS / device
    args = ["--device", device, "--csv", f"{stem}.csv", "--json", f"{stem}.json", *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = bench.main(args)
    print(out.getvalue(), end="")
    if status == 0:
        stem.with_suffix(".md").write_text(out.getvalue())
    return status


if __name__ == "__main__":
    sys.exit(run("cpu", sys.argv[1:]))
