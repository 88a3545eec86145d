"""Per-step cost of ``stab.apply(engine)`` under DeepSpeed ZeRO, side by side, on CPU ranks.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 \\
        benchmarks/deepspeed_overhead.py [--stages 0 1 2 3] [--dtypes fp32 bf16] [--steps 40]

For each ZeRO stage and dtype it builds two identical engines (an MLP of ``--layers`` square
``--width`` layers, torch AdamW), one trained with GradientStabilizer and one without, and
alternates their steps (forward, engine.backward, [apply], engine.step), so that both see the
same machine load. Rank 0 prints the median step time of each, the median time of apply() alone,
and the ratio. Docs: docs/distributed.md, section DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import gradstab  # noqa: E402


def build(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, 1))


def engine_for(stage: int, dtype: str, args) -> deepspeed.DeepSpeedEngine:
    model = build(args.layers, args.width)
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def timed_step(engine, stab, x, y) -> tuple[float, float]:
    """One optimizer step (with ``stab.apply(engine)`` unless ``stab`` is None); its time and
    apply()'s, in ms."""
    dist.barrier()
    start = time.perf_counter()
    loss = nn.functional.mse_loss(engine(x).float(), y)
    engine.backward(loss)
    applied = 0.0
    if stab is not None:
        t0 = time.perf_counter()
        stab.apply(engine)
        applied = time.perf_counter() - t0
    engine.step()
    return (time.perf_counter() - start) * 1e3, applied * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, 1, generator=gen)
    rows = []
    for stage in args.stages:
        for dtype in args.dtypes:
            plain, stabilized = engine_for(stage, dtype, args), engine_for(stage, dtype, args)
            stab = gradstab.GradientStabilizer()
            xs = x.to(next(plain.module.parameters()).dtype)
            times: dict[str, list[float]] = {"without": [], "with": [], "apply": []}
            for i in range(args.warmup + args.steps):
                for engine, use in ((plain, None), (stabilized, stab)):
                    total, applied = timed_step(engine, use, xs, y)
                    if i >= args.warmup:
                        times["with" if use else "without"].append(total)
                        if use:
                            times["apply"].append(applied)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((stage, dtype, med))
            plain.destroy()
            stabilized.destroy()
    if rank == 0:
        params = sum(p.numel() for p in build(args.layers, args.width).parameters())
        tensors = len(list(build(args.layers, args.width).parameters()))
        print(
            f"\n{world} CPU ranks, 1 thread each; MLP {args.layers}x{args.width} "
            f"({params / 1e6:.2f} M parameters in {tensors} tensors), batch {args.batch} per "
            f"rank, torch AdamW; medians of {args.steps} steps each, interleaved\n"
        )
        print("| ZeRO | dtype | step without (ms) | step with (ms) | apply (ms) | ratio |")
        print("|---|---|---|---|---|---|")
        for stage, dtype, med in rows:
            print(
                f"| {stage} | {dtype} | {med['without']:.2f} | {med['with']:.2f} | "
                f"{med['apply']:.2f} | {med['with'] / med['without']:.3f} |"
            )
        print(
            f"\ndeepspeed {deepspeed.__version__}, torch {torch.__version__}, gradstab "
            f"{gradstab.__version__}"
        )
    dist.barrier()
    os._exit(0)  # DeepSpeed's CPU communication threads can abort a normal exit


if __name__ == "__main__":
    main()
