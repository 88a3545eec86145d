"""Trains a small model with StabilizedAdamW for a range of steps, from and to a checkpoint.

Used by tests/test_adamw.py to show that a run checkpointed, restarted in a fresh process and
resumed equals the uninterrupted run bit for bit:

    python tests/adamw_resume_worker.py --seed 3 --start 6 --stop 14 --resume half.pt --out r.pt
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradstab

SPIKE_STEPS = {3: 1e4, 9: 1e2}
NAN_STEP = 7


def build(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    extra = nn.Parameter(torch.randn(70_001) * 0.1)  # several chunks of the CPU kernel
    groups = [
        {"params": list(model.parameters()), "weight_decay": 0.05},
        {"params": [extra], "lr": 3e-3, "weight_decay": 0.0},
    ]
    opt = gradstab.StabilizedAdamW(groups, lr=1e-2, amsgrad=True, spike_guard=10.0)
    return model, extra, opt


def train(seed: int, start: int, stop: int, resume: str | None, out: str) -> None:
    model, extra, opt = build(seed)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    if resume:
        ckpt = torch.load(resume)
        model.load_state_dict(ckpt["model"])
        extra.data.copy_(ckpt["extra"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 * seed + step)
        x = torch.randn(64, 16, generator=gen)
        y = torch.randn(64, 4, generator=gen)
        loss = nn.functional.mse_loss(model(x), y) + 1e-3 * (extra - 1).square().sum()
        opt.zero_grad()
        loss.backward()
        if step in SPIKE_STEPS:
            for p in model.parameters():
                p.grad.mul_(SPIKE_STEPS[step])
        if step == NAN_STEP:
            extra.grad[17] = float("nan")
        opt.step()
        sched.step()
    torch.save(
        {
            "model": model.state_dict(),
            "extra": extra.detach(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        },
        out,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--stop", type=int, required=True)
    parser.add_argument("--resume")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    train(args.seed, args.start, args.stop, args.resume, args.out)


if __name__ == "__main__":
    main()
