"""CPU cost of GradientStabilizer.apply on FSDP2-style DTensor gradients, side by side.

Run on 2 ranks (gloo, CPU):

    torchrun --nproc-per-node 2 benchmarks/distributed_overhead.py

For T parameters it times, interleaved, ``apply`` on T DTensor gradients (Shard(0) over 2 ranks,
a 4x4 shard each; torch ops plus one all-reduce), on T plain 4x4 gradients with the torch
backend, and on the same with the compiled CPU kernel, and a bare all-reduce of T + 1 float64
(the collective the DTensor path adds). Rank 0 prints medians over 15 rounds and ratios to the
plain torch backend.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import gradstab

ROUNDS, CALLS = 15, 5


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e3


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = 4 * dist.get_world_size()
    for count in (100, 1000):
        sharded, plain = [], []
        for _ in range(count):
            p = torch.nn.Parameter(distribute_tensor(torch.zeros(rows, 4), mesh, [Shard(0)]))
            p.grad = distribute_tensor(torch.randn(rows, 4), mesh, [Shard(0)])
            sharded.append(p)
            q = torch.nn.Parameter(torch.zeros(4, 4))
            q.grad = torch.randn(4, 4)
            plain.append(q)
        buffer = torch.zeros(count + 1, dtype=torch.float64)
        cases = {
            "DTensor grads (torch ops + all-reduce)": (gradstab.GradientStabilizer(), sharded),
            "plain grads, torch backend": (gradstab.GradientStabilizer(backend="torch"), plain),
            "plain grads, compiled CPU kernel": (gradstab.GradientStabilizer(), plain),
        }
        fns = {name: (lambda s=s, ps=ps: s.apply(ps)) for name, (s, ps) in cases.items()}
        fns[f"bare all-reduce of {count + 1} float64"] = lambda buffer=buffer: dist.all_reduce(
            buffer
        )
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(ROUNDS):
            for name, fn in fns.items():
                times[name].append(timed(fn))
        if dist.get_rank() == 0:
            base = statistics.median(times["plain grads, torch backend"])
            print(f"\nT = {count} parameters, {dist.get_world_size()} ranks")
            print("| case | median ms | ratio to plain torch backend |\n|---|---|---|")
            for name, values in times.items():
                median = statistics.median(values)
                print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
