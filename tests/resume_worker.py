"""Trains a small model for a range of steps, optionally from and to a checkpoint.

Used by tests/test_stabilizer.py to show that a run checkpointed, restarted in a fresh process
and resumed equals the uninterrupted run bit for bit:

    python tests/resume_worker.py --start 5 --stop 12 --resume half.pt --out resumed.pt

(the uninterrupted run and the first half run in the test process, through ``train``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstab

SPIKE_STEPS = {3: 1e4, 7: 1e2}


def build(granularity: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stab = gradstab.GradientStabilizer(granularity=granularity, spike_guard=10.0)
    return model, opt, stab


def train(start: int, stop: int, granularity: str, resume: str | None, out: str) -> None:
    model, opt, stab = build(granularity)
    if resume:
        ckpt = torch.load(resume)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        stab.load_state_dict(ckpt["stab"])
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(64, 16, generator=gen)
        y = torch.randn(64, 4, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step in SPIKE_STEPS:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(SPIKE_STEPS[step])
        stab.apply(model)
        opt.step()
        opt.zero_grad()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "stab": stab.state_dict()}, out
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--stop", type=int, required=True)
    parser.add_argument("--granularity", default="param")
    parser.add_argument("--resume")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    train(args.start, args.stop, args.granularity, args.resume, args.out)


if __name__ == "__main__":
    main()
