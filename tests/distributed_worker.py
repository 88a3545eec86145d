"""One rank of the distributed tests (tests/test_distributed.py), on the CPU with gloo.

Launched on 2 ranks by the test (or by hand: ``torchrun --nproc-per-node 2
tests/distributed_worker.py --out DIR --seed S``), it runs every scenario below in one process
group, so that the start-up cost is paid once; on 4 ranks it runs the DTensor scenarios on a
(2, 2) mesh. It writes what it saw to ``DIR/rank{RANK}.pt`` for the test to compare with a single
process and with the float64 reference, and asserts nothing itself.

Scenarios:
    train/*       a small MLP trained with AdamW under DDP, FSDP2 (1-D mesh) and HSDP (2-D mesh
                  (2, 1): gradients replicated over 2 ranks, sharded over 1), with a gradient
                  spike and a NaN injected on one rank's shard; the single-process twin is
                  ``train_single``.
    resume        FSDP2 training stopped half way, checkpointed (model and optimizer with
                  torch.distributed.checkpoint, the stabilizer with torch.save from rank 0),
                  rebuilt from scratch, loaded on every rank and finished.
    dtensor/*     DTensor gradients made directly with distribute_tensor on 1-D and 2-D meshes
                  (Shard(0), Shard(1), Replicate, both, mixed with plain tensors), odd shapes,
                  every dtype, faults, and a found_inf set on one rank only.
    raise, partial, fsdp1     the errors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradstab
from tests.helpers import SHAPES, inject_faults, random_grads

STEPS = 8
HALF = 4
BATCH = 32
SPIKE_STEP, SPIKE = 2, 1e4
NAN_STEP, NAN_PARAM, NAN_INDEX = 5, "0.weight", (32, 0)  # row 32 lives on rank 1 under FSDP2
LR = 1e-2
DTENSOR_STEPS = 6
FOUND_INF_STEP = 3  # in the DTensor scenarios, only rank 1 passes found_inf=1 at this step


def build_model() -> nn.Sequential:
    """Odd sizes so that FSDP2 shards unevenly: 33 rows split 17/16, 7 rows 4/3, and the last
    bias (1 row) leaves rank 1 an empty shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(), nn.Linear(7, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 1, generator=gen)


def _is_dtensor(t: torch.Tensor) -> bool:
    return gradstab.distributed.is_dtensor(t)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on every rank (an all-gather for a DTensor)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().clone()


def set_element(grad: torch.Tensor, index: tuple[int, ...], value: float) -> None:
    """Sets one element of the whole gradient, on whichever rank holds it."""
    if not _is_dtensor(grad):
        grad[index] = value
        return
    from torch.distributed.tensor import distribute_tensor

    whole = grad.full_tensor()
    whole[index] = value
    shard = distribute_tensor(whole, grad.device_mesh, grad.placements, src_data_rank=None)
    grad.to_local().copy_(shard.to_local())


def train_steps(model, named, opt, stab, start: int, stop: int, rank: int, world: int, counts):
    """Steps ``start..stop``: each rank takes its slice of the batch; DDP and FSDP2 average."""
    per_rank = BATCH // world
    for step in range(start, stop):
        x, y = batch(step)
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        params = dict(named())
        if step == SPIKE_STEP:
            for p in params.values():
                p.grad.mul_(SPIKE)
        if step == NAN_STEP:
            set_element(params[NAN_PARAM].grad, NAN_INDEX, float("nan"))
        with CollectiveCounter() as counter:
            stab.apply(model)
        counts.append(counter.calls)
        opt.step()
        opt.zero_grad()


def train_single(granularity: str) -> dict:
    """The single process on the whole batch that every distributed run must equal."""
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    stab = gradstab.GradientStabilizer(granularity=granularity)
    train_steps(model, model.named_parameters, opt, stab, 0, STEPS, 0, 1, [])
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": stab.state_dict(),
    }


class CollectiveCounter:
    """Counts ``torch.distributed.all_reduce`` calls (and their group sizes) while active."""

    def __enter__(self):
        self.calls: list[int] = []
        self._orig = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(dist.get_world_size(group))
            return self._orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_training(mode: str, granularity: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(build_model())

        def named():
            return model.module.named_parameters()

    else:
        shape = (world,) if mode == "fsdp2" else (world, 1)
        names = ("shard",) if mode == "fsdp2" else ("replicate", "shard")
        model = fsdp_model(init_device_mesh("cpu", shape, mesh_dim_names=names))
        named = model.named_parameters
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    stab = gradstab.GradientStabilizer(granularity=granularity)
    counts: list[list[int]] = []
    train_steps(model, named, opt, stab, 0, STEPS, rank, world, counts)
    return {
        "weights": {n: full(p) for n, p in named()},
        "state": stab.state_dict(),
        "all_reduce_calls": counts,
        "placements": {n: str(getattr(p, "placements", None)) for n, p in named()},
    }


def run_resume(rank: int, world: int, out: Path) -> dict:
    """FSDP2: steps 0..HALF, checkpoint, a fresh model/optimizer/stabilizer, load, HALF..STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ckpt_dir, stab_file = out / "resume_dcp", out / "resume_stabilizer.pt"

    def build():
        model = fsdp_model(mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return model, opt, gradstab.GradientStabilizer()

    model, opt, stab = build()
    train_steps(model, model.named_parameters, opt, stab, 0, HALF, rank, world, [])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    if rank == 0:
        torch.save(stab.state_dict(), stab_file)
    dist.barrier()
    del model, opt, stab

    model, opt, stab = build()
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    stab.load_state_dict(torch.load(stab_file))
    train_steps(model, model.named_parameters, opt, stab, HALF, STEPS, rank, world, [])
    return {
        "weights": {n: full(p) for n, p in model.named_parameters()},
        "state": stab.state_dict(),
    }


def dtensor_layouts(world: int):
    """(mesh, placements) cycled over the gradients; None means a plain tensor.

    On 2 ranks: a 1-D mesh and a (2, 1) mesh. On 4 ranks: a (2, 2) mesh, where a tensor sharded
    on both dimensions must be summed over both groups in turn (as under FSDP2 + TP).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        return [
            (mesh, [Shard(0), Shard(1)]),
            (mesh, [Shard(0), Replicate()]),
            (mesh, [Replicate(), Shard(0)]),
            None,
            (mesh, [Replicate(), Replicate()]),
            (mesh, [Shard(1), Shard(0)]),
        ]
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("a", "b"))
    return [
        (mesh1, [Shard(0)]),
        (mesh1, [Shard(1)]),
        (mesh2, [Replicate(), Shard(0)]),  # replicated over the 2 ranks: must not count twice
        (mesh1, [Replicate()]),
        (mesh2, [Shard(0), Replicate()]),
        None,
        (mesh2, [Shard(0), Shard(1)]),
    ]


def run_dtensor(
    dtype: torch.dtype, granularity: str, nonfinite: str, seed: int, rank: int, world: int
) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    layouts = dtensor_layouts(world)
    gen = torch.Generator().manual_seed(seed)  # the same on every rank: same whole gradients
    stab = gradstab.GradientStabilizer(granularity=granularity, nonfinite=nonfinite)
    params, placements = [], []
    for i, shape in enumerate(SHAPES):
        layout = layouts[i % len(layouts)]
        if layout is not None and len(shape) < 2:
            layout = (layout[0], [Shard(0) if p == Shard(1) else p for p in layout[1]])
        placements.append(None if layout is None else str(layout[1]))
        params.append((layout, shape))
    steps = []
    for step in range(DTENSOR_STEPS):
        whole = random_grads(dtype, gen)
        faults = inject_faults(whole, gen)
        inputs = [g.clone() for g in whole]  # a Replicate DTensor may share memory with g
        tensors = []
        for (layout, _), g in zip(params, whole):
            if layout is None:
                t = nn.Parameter(torch.zeros(g.shape, dtype=dtype))
                t.grad = g.clone()
            else:
                mesh, place = layout
                zeros = torch.zeros(g.shape, dtype=dtype)
                t = nn.Parameter(distribute_tensor(zeros, mesh, place, src_data_rank=None))
                t.grad = distribute_tensor(g, mesh, place, src_data_rank=None)
            tensors.append(t)
        found_inf = None
        if step == FOUND_INF_STEP:
            found_inf = torch.tensor([float(rank == 1)])
        with CollectiveCounter() as counter:
            stats = stab.apply(tensors, found_inf=found_inf)
        steps.append(
            {
                "input": inputs,
                "faults": faults,
                "output": [full(t.grad) for t in tensors],
                "stats": stats.to_dict(),
                "all_reduce_calls": counter.calls,
            }
        )
    shard_groups = {
        id(mesh.get_group(dim))
        for layout, _ in params
        if layout is not None
        for mesh, place in [layout]
        for dim, p in enumerate(place)
        if p.is_shard() and mesh.size(dim) > 1
    }
    return {
        "steps": steps,
        "state": stab.state_dict(),
        "placements": placements,
        "shard_groups": len(shard_groups),
    }


def run_raise(rank: int, world: int) -> dict:
    """A NaN on rank 1's shard only, with nonfinite='raise': every rank must raise."""
    from torch.distributed.device_mesh import init_device_mesh

    model = fsdp_model(init_device_mesh("cpu", (world,)))
    stab = gradstab.GradientStabilizer(nonfinite="raise")
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    stab.apply(model)
    before = stab.state_dict()
    nn.functional.mse_loss(model(x), y).backward()
    set_element(dict(model.named_parameters())[NAN_PARAM].grad, NAN_INDEX, float("nan"))
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    try:
        stab.apply(model)
        error = None
    except FloatingPointError as err:
        error = str(err)
    after = {n: full(p.grad) for n, p in model.named_parameters()}
    return {
        "error": error,
        "state_before": before,
        "state_after": stab.state_dict(),
        "grads_before": grads,
        "grads_after": after,
    }


def run_partial(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(DTensor.from_local(torch.zeros(5, 3), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.ones(5, 3), mesh, [Partial()])
    model = nn.Module()
    model.weight = p
    try:
        gradstab.GradientStabilizer().apply(model)
        error = None
    except ValueError as err:
        error = str(err)
    return {
        "error": error,
        "grad_untouched": bool(torch.equal(p.grad.to_local(), torch.ones(5, 3))),
    }


def run_compiled(world: int) -> str | None:
    """backend='compiled' cannot take DTensor gradients: the error, or None if it did."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    grad = distribute_tensor(torch.ones(4, 3), init_device_mesh("cpu", (world,)), [Shard(0)])
    state = gradstab.functional.init_state([grad])
    try:
        gradstab.functional.stabilize_([grad], state, backend="compiled")
    except RuntimeError as err:
        return str(err)
    return None


def run_fsdp1() -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    errors = {}
    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(
            build_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params
        )
        nn.functional.mse_loss(model(batch(0)[0]), batch(0)[1]).backward()
        for target in ("module", "optimizer"):
            params = model if target == "module" else torch.optim.AdamW(model.parameters())
            try:
                gradstab.GradientStabilizer().apply(params)
                errors[(use_orig_params, target)] = None
            except TypeError as err:
                errors[(use_orig_params, target)] = str(err)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        results: dict = {"world": world}
        if world == 4:
            for granularity, nonfinite in (("param", "zero"), ("global", "skip")):
                results[f"dtensor/float32/{granularity}/{nonfinite}"] = run_dtensor(
                    torch.float32, granularity, nonfinite, args.seed, rank, world
                )
            torch.save(results, out / f"rank{rank}.pt")
            dist.destroy_process_group()
            return
        for mode in ("ddp", "fsdp2", "hsdp"):
            for granularity in ("param", "global"):
                results[f"train/{mode}/{granularity}"] = run_training(
                    mode, granularity, rank, world
                )
        results["resume"] = run_resume(rank, world, out)
        for i, dtype in enumerate((torch.float32, torch.float64, torch.float16, torch.bfloat16)):
            for j, (granularity, nonfinite) in enumerate((("param", "zero"), ("global", "skip"))):
                key = f"dtensor/{str(dtype).removeprefix('torch.')}/{granularity}/{nonfinite}"
                results[key] = run_dtensor(
                    dtype, granularity, nonfinite, args.seed + 10 * i + j, rank, world
                )
        results["raise"] = run_raise(rank, world)
        results["partial"] = run_partial(world)
        results["compiled"] = run_compiled(world)
        results["fsdp1"] = run_fsdp1()
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait in destroy_process_group for a rank that is gone
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
