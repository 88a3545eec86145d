"""GradientStabilizer in a plain PyTorch loop: one line between ``backward()`` and ``step()``.

A small MLP learns a synthetic regression task; every 25th batch is corrupted (its targets are
multiplied by 1000, as a bad data shard would do), so its gradient is a huge spike. The script
trains the same model three ways and prints the final clean loss of each:

    python examples/plain_loop.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstab


def make_data(steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=gen)
    data = []
    for step in range(steps):
        x = torch.randn(64, 16, generator=gen)
        y = torch.tanh(x @ teacher)
        if step % 25 == 24:
            y = y * 1000.0  # a corrupted batch: a gradient spike
        data.append((x, y))
    return data


def train(data, mode: str, seed: int) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stabilizer = gradstab.GradientStabilizer(spike_guard=10.0) if mode == "gradstab" else None
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if stabilizer is not None:
            stabilizer.apply(model)  # <- the one line: rescales every p.grad in place
        elif mode == "clip":
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    clean = [(x, y) for i, (x, y) in enumerate(data[-50:]) if (len(data) - 50 + i) % 25 != 24]
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x), y).item() for x, y in clean) / len(clean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = make_data(args.steps, args.seed)
    print(f"{'training':<28} final clean loss")
    for mode, label in (
        ("plain", "AdamW"),
        ("clip", "AdamW + clip_grad_norm_(1)"),
        ("gradstab", "AdamW + GradientStabilizer"),
    ):
        print(f"{label:<28} {train(data, mode, args.seed):.4f}")


if __name__ == "__main__":
    main()
