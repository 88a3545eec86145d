"""One rank of the HuggingFace Trainer + DeepSpeed tests (tests/test_deepspeed.py).

Launched on 2 CPU ranks (DS_ACCELERATOR=cpu), it trains the small MLP of
tests/distributed_worker.py with ``transformers.Trainer``, a DeepSpeed config (ZeRO-2, then
ZeRO-3) and ``GradientStabilizerCallback``: 6 steps straight, then 3 steps with a checkpoint and a
fresh Trainer resuming from it to step 6. Every step sees the whole data set (32 samples, 16 per
rank), so the gradient does not depend on the order the samplers pick and the run must equal one
process training on all 32 samples (``train_single`` below). Writes ``DIR/rank{RANK}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradstab
from tests import distributed_worker as dw

# DeepSpeed and transformers are imported where they are used, so that the test can import
# ``train_single`` and the constants without them.

STEPS, HALF = 6, 3
SPIKE_STEP, SPIKE = 2, 1e4
LR = 1e-2
SAMPLES = 32


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = dw.build_model()
        self.loss_factor = 1.0
        self.seen: list[list[int]] = []  # per forward, the indices of the samples (column 0)

    def forward(self, x, labels):
        self.seen.append(sorted(x[:, 0].double().mul(1e6).round().long().tolist()))
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels) * self.loss_factor, "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(SAMPLES, 16, generator=gen)
        self.y = torch.randn(SAMPLES, 1, generator=gen)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def train_single() -> dict:
    """One process, all 32 samples per step, AdamW as the Trainer builds it."""
    model = Regression()
    data = Data()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    stab = gradstab.GradientStabilizer()
    for step in range(STEPS):
        model.loss_factor = SPIKE if step == SPIKE_STEP else 1.0
        model(data.x, data.y)["loss"].backward()
        stab.apply(model)
        opt.step()
        opt.zero_grad()
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": stab.state_dict(),
    }


def trainer(stage: int, out: Path, max_steps: int, callback):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Spike(TrainerCallback):
        """Scales the loss (so every gradient) by SPIKE at step SPIKE_STEP, and records what
        DeepSpeed's optimizer holds when the Trainer calls on_pre_optimizer_step."""

        def __init__(self) -> None:
            self.at_pre_optimizer_step: list[dict] = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            model.loss_factor = SPIKE if state.global_step == SPIKE_STEP else 1.0

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            ds_optimizer = optimizer.optimizer  # accelerate's wrapper around engine.optimizer
            inner = ds_optimizer.optimizer.state.values()  # the torch AdamW DeepSpeed steps
            self.at_pre_optimizer_step.append(
                {
                    "global_step": state.global_step,
                    "adamw_steps": max((int(s["step"]) for s in inner if "step" in s), default=0),
                    "gradients": any(
                        g is not None for g in ds_optimizer.averaged_gradients.values()
                    ),
                }
            )

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=SAMPLES // dist.get_world_size(),
        max_steps=max_steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=HALF,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        deepspeed=ds_config,
        use_cpu=True,
        seed=0,
    )
    return Trainer(
        model=Regression(), args=args, train_dataset=Data(), callbacks=[callback, Spike()]
    )


def finish(t, callback) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    (probe,) = [c for c in t.callback_handler.callbacks if hasattr(c, "at_pre_optimizer_step")]
    engine = t.model_wrapped
    weights = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        weights[name] = (p if full is None else full).detach().float().clone()
    logs = [
        {k: v for k, v in entry.items() if k.startswith("gradstab/") or k in ("loss", "step")}
        for entry in t.state.log_history
        if "loss" in entry
    ]
    return {
        "weights": weights,
        "state": callback.stabilizer.state_dict(),
        "logs": logs,
        "optimizer": type(engine.optimizer).__name__,
        "seen": engine.module.seen,
        "at_pre_optimizer_step": probe.at_pre_optimizer_step,
        "hook_removed": "step" not in vars(engine.optimizer)
        or not getattr(engine.optimizer.step, "_gradstab_pre_step", False),
    }


def run(stage: int, out: Path) -> dict:
    from gradstab.integrations.huggingface import GradientStabilizerCallback

    results = {}
    callback = GradientStabilizerCallback()
    t = trainer(stage, out / f"straight{stage}", STEPS, callback)
    t.train()
    results["straight"] = finish(t, callback)
    t.model_wrapped.destroy()

    callback = GradientStabilizerCallback()
    t = trainer(stage, out / f"resumed{stage}", HALF, callback)
    t.train()
    t.model_wrapped.destroy()
    callback = GradientStabilizerCallback()
    t = trainer(stage, out / f"resumed{stage}", STEPS, callback)
    t.train(resume_from_checkpoint=str(out / f"resumed{stage}" / f"checkpoint-{HALF}"))
    results["resumed"] = finish(t, callback)
    t.model_wrapped.destroy()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    import deepspeed

    from tests.deepspeed_worker import save_and_exit

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    save_and_exit(
        lambda: {f"zero{stage}": run(stage, out) for stage in (2, 3)}, out, dist.get_rank()
    )


if __name__ == "__main__":
    main()
