"""Random gradient lists with odd shapes, layouts and faults, comparison helpers, and the
launcher of multi-rank workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests.conftest import RTOL

SHAPES = [(0,), (1,), (1023,), (7, 13), (3, 5, 11), (97,), (2, 3, 4, 5), (257, 3), (0, 4)]


def random_grads(
    dtype: torch.dtype, gen: torch.Generator, shapes=SHAPES, noncontiguous: bool = True
) -> list[Tensor]:
    """Gradients of ``shapes`` with log-uniform scales; every third one is a strided view."""
    grads = []
    for i, shape in enumerate(shapes):
        scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)
        if noncontiguous and i % 3 == 1 and len(shape) >= 1:
            base = torch.randn(*shape, 2, generator=gen, dtype=torch.float64) * scale
            g = base.to(dtype)[..., 1]
        elif noncontiguous and i % 3 == 2 and len(shape) >= 2:
            g = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64) * scale
            g = g.to(dtype).permute(*reversed(range(len(shape))))
        else:
            g = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        grads.append(g)
    return grads


def inject_faults(grads: list[Tensor], gen: torch.Generator) -> list[str]:
    """Puts NaN, Inf, all-zero and 1e4x spikes into random gradients; returns what it did."""
    done = []
    nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]

    def pick() -> int:
        return nonempty[torch.randint(len(nonempty), (), generator=gen).item()]

    def roll(p: float) -> bool:
        return torch.rand((), generator=gen).item() < p

    if roll(0.15):
        i = pick()
        grads[i].select(0, 0).fill_(float("nan"))
        done.append(f"nan@{i}")
    if roll(0.15):
        i = pick()
        grads[i].select(0, -1).fill_(float("-inf") if roll(0.5) else float("inf"))
        done.append(f"inf@{i}")
    if roll(0.1):
        i = pick()
        grads[i].zero_()
        done.append(f"zero@{i}")
    if roll(0.2):
        i = pick()
        grads[i].mul_(1e4 if grads[i].dtype != torch.float16 else 30.0)
        done.append(f"spike@{i}")
    return done


def assert_grads_close(actual: list[Tensor], expected: list[Tensor], dtype, msg: str) -> None:
    rtol = RTOL[dtype]
    # Results below the smallest normal number of the dtype are rounded to its subnormal spacing.
    finfo = torch.finfo(dtype)
    subnormal_spacing = finfo.smallest_normal * finfo.eps
    for i, (a, e) in enumerate(zip(actual, expected)):
        finite = e[torch.isfinite(e)]
        amax = finite.abs().max().item() if finite.numel() else 0.0
        torch.testing.assert_close(
            a.double(),
            e,
            rtol=rtol,
            atol=max(rtol * amax, subnormal_spacing),
            equal_nan=True,
            msg=lambda m, i=i: f"{msg}, grads[{i}]: {m}",
        )


def max_rel_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    """Largest |a - e| / max(max|e|, smallest normal of a's dtype) over finite entries.

    The floor keeps results that fall into the subnormal range (where a dtype only has absolute
    precision) from reading as large relative errors.
    """
    worst = 0.0
    for a, e in zip(actual, expected):
        mask = torch.isfinite(e)
        if not mask.any():
            continue
        scale = max(e[mask].abs().max().item(), torch.finfo(a.dtype).smallest_normal)
        worst = max(worst, ((a.double()[mask] - e[mask]).abs().max().item()) / scale)
    return worst


def to_device(grads: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """The same tensors on ``device`` with the same sizes, strides and storage offsets."""
    if torch.device(device) == torch.device("cpu"):
        return grads
    out = []
    for g in grads:
        storage = torch.empty(0, dtype=g.dtype).set_(g.untyped_storage())
        base = storage.to(device)
        out.append(base.as_strided(g.size(), g.stride(), g.storage_offset()))
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    argv: list[str], out: Path, world: int, env: dict[str, str], timeout: int, what: str
) -> list[dict]:
    """Runs ``python argv --out OUT`` once per rank of a ``world``-process group on this machine
    (MASTER_ADDR/PORT, WORLD_SIZE, LOCAL_WORLD_SIZE, RANK, LOCAL_RANK set, one thread each, on
    top of ``os.environ`` and ``env``) and returns what each rank saved as ``OUT/rank{r}.pt``.
    Fails the test, naming ``what``, when a rank fails or they take longer than ``timeout`` s."""
    common = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *argv, "--out", str(out)],
            env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} on {world} ranks did not finish in {timeout} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} of {what} failed:\n{log[-20000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
