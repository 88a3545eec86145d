"""GradientStabilizer with automatic mixed precision (``torch.autocast`` + ``GradScaler``).

Two ways, same result:

* ``--api wrapper`` (default): ``gradstab.StabilizedOptimizer`` stepped by ``scaler.step(opt)``.
  With a fused inner optimizer (``AdamW(fused=True)``) the scaler hands it the scale and the
  overflow flag as device tensors, and the whole step runs without a host-device sync.
* ``--api apply``: ``stab.apply(model, scaler=scaler, optimizer=opt)`` before ``scaler.step(opt)``:
  gradstab unscales the gradients if the scaler has not yet.

Either way, a step the scaler skips (fp16 overflow) leaves the stabilizer untouched. The run starts
with a deliberately huge loss scale, so the first steps overflow and are skipped: the script prints
how many, and the stabilizer's step count k, which counts only the steps taken. Runs on a GPU when
there is one, else on the CPU (fp16 autocast works there too):

    python examples/amp.py [--steps 100] [--api wrapper|apply]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--api", choices=["wrapper", "apply"], default="wrapper")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 8, generator=gen)

    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 8)).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24)  # too big on purpose: overflows
    if args.api == "wrapper":
        optimizer = gradstab.StabilizedOptimizer(inner, spike_guard=10.0)
        stabilizer = optimizer.stabilizer
    else:
        optimizer = inner
        stabilizer = gradstab.GradientStabilizer(spike_guard=10.0)

    skipped = 0
    for step in range(args.steps):
        x = torch.randn(128, 32, generator=gen).to(device)
        y = torch.tanh(x @ teacher.to(device))
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if args.api == "apply":
            stabilizer.apply(model, scaler=scaler, optimizer=optimizer)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  loss scale {scaler.get_scale():.0f}")
    k = stabilizer.state_dict()["k"]
    print(
        f"device {device}, api {args.api}: {skipped} of {args.steps} steps skipped by the scaler;"
    )
    print(f"the stabilizer counted {int(k.min())}..{int(k.max())} updates per parameter")
    assert int(k.min()) == int(k.max()) == args.steps - skipped  # skipped steps left no trace


if __name__ == "__main__":
    main()
