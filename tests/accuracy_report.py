"""Prints the largest error of every backend against the float64 reference, per dtype.

    .venv/bin/python -m tests.accuracy_report [--steps 200] [--seed N]

The error of a step is max|actual - expected| / max(max|expected|, smallest normal of the dtype)
over each gradient's finite entries (what the tests bound with tests/conftest.py RTOL), taken over
many steps of fresh random gradients with odd shapes, strided views, spikes, zeros, NaN and Inf.
"""

from __future__ import annotations

import argparse
import random

import torch

from gradstab import functional as F
from tests.conftest import CPU_BACKENDS, DTYPES, RTOL
from tests.helpers import inject_faults, max_rel_error, random_grads
from tests.reference import ReferenceStabilizer


def worst_error(backend: str, dtype: torch.dtype, granularity: str, steps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    state = F.init_state(random_grads(dtype, gen), granularity)
    ref = ReferenceStabilizer(
        len(state.m) if granularity == "param" else 1, granularity=granularity
    )
    worst = 0.0
    for _ in range(steps):
        grads = random_grads(dtype, gen)
        inject_faults(grads, gen)
        expected, _ = ref.step(grads)
        F.stabilize_(grads, state, backend=backend, granularity=granularity)
        worst = max(worst, max_rel_error(grads, expected))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**31))
    args = parser.parse_args()
    print(f"seed {args.seed}, {args.steps} steps per cell, torch {torch.__version__}")
    print("| backend | granularity | " + " | ".join(str(d).split(".")[1] for d in DTYPES) + " |")
    print("|---|---|" + "---|" * len(DTYPES))
    for backend in CPU_BACKENDS:
        for granularity in ("param", "global"):
            cells = [
                f"{worst_error(backend, d, granularity, args.steps, args.seed):.2e}" for d in DTYPES
            ]
            print(f"| {backend} | {granularity} | " + " | ".join(cells) + " |")
    print("| test tolerance (RTOL) | | " + " | ".join(f"{RTOL[d]:.1e}" for d in DTYPES) + " |")


if __name__ == "__main__":
    main()
