"""GradientStabilizer in a HuggingFace ``transformers.Trainer`` running DeepSpeed ZeRO.

The same tiny Llama and data as examples/huggingface_trainer.py, trained on two ranks with a
DeepSpeed config (ZeRO-2 by default, or ZeRO-3) and ``GradientStabilizerCallback``; then a fresh
Trainer resumes from the mid-run checkpoint and must end with the same weights (the statistics
travel in the checkpoint's trainer_state.json). Runs on the CPU (``DS_ACCELERATOR=cpu``, gloo):

    python examples/deepspeed_trainer.py [--zero 3] [--steps 20] [--nproc 2] [--output-dir DIR]

Started without a launcher it starts itself on ``--nproc`` ranks with torchrun; under a launcher
(``torchrun --nproc-per-node 2 examples/deepspeed_trainer.py`` or ``deepspeed``) it runs as one
rank. Needs ``pip install 'gradstab[hf,deepspeed]'``. DeepSpeed compiles a small shared-memory
op on its first CPU run (about 25 s on 2 cores; cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def launch_self(nproc: int) -> None:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    raise SystemExit(subprocess.call([*cmd, *sys.argv], env=env))


def ds_config(zero: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # the Trainer's max_grad_norm, 0 here: no clipping
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW
        "steps_per_print": 10**9,
    }


def make_trainer(output_dir: Path, steps: int, zero: int):
    from huggingface_trainer import RuleSequences, tiny_llama
    from transformers import Trainer, TrainingArguments

    from gradstab.integrations.huggingface import GradientStabilizerCallback

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,  # GradientStabilizer replaces clipping (DeepSpeed's too)
        logging_steps=max(1, steps // 8),
        save_strategy="steps",
        save_steps=max(1, steps // 2),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # on the CPU accelerate needs this to see the ranks
        disable_tqdm=True,
        deepspeed=ds_config(zero),
        seed=0,
    )
    callback = GradientStabilizerCallback(spike_guard=10.0)
    return Trainer(
        model=tiny_llama(), args=args, train_dataset=RuleSequences(), callbacks=[callback]
    )


def whole_weights(trainer) -> list[torch.Tensor]:
    """The fp32 master weights, gathered from every rank (ZeRO-3 partitions the parameters)."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = trainer.model_wrapped
    return [safe_get_full_fp32_param(p) for p in engine.module.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        launch_self(args.nproc)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # DeepSpeed 0.19 calls a torch.distributed function that torch 2.13 deprecates, every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    rank = torch.distributed.get_rank()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or Path(tmp) / "run"  # rank 0 writes the checkpoints
        if args.output_dir is None:
            shared = [str(out)]
            torch.distributed.broadcast_object_list(shared, src=0)
            out = Path(shared[0])
        trainer = make_trainer(out, args.steps, args.zero)
        trainer.train()
        if rank == 0:
            print(f"ZeRO-{args.zero} on {torch.distributed.get_world_size()} ranks")
            for entry in trainer.state.log_history:
                if "loss" in entry:
                    print(
                        f"step {entry['step']:4d}  loss {entry['loss']:.3f}  grad norm "
                        f"{entry['gradstab/grad_norm_before']:.3f} -> "
                        f"{entry['gradstab/grad_norm_after']:.3f}  "
                        f"skipped {entry['gradstab/skipped']}"
                    )
        straight = whole_weights(trainer)
        middle = out / f"checkpoint-{max(1, args.steps // 2)}"
        resumed = make_trainer(out / "resumed", args.steps, args.zero)
        resumed.train(resume_from_checkpoint=str(middle))
        same = all(torch.equal(p, q) for p, q in zip(straight, whole_weights(resumed)))
        if rank == 0:
            print(f"resumed from {middle.name}: final weights {'identical' if same else 'DIFFER'}")
        torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0 if same else 1)  # DeepSpeed's CPU communication threads can abort a normal exit


if __name__ == "__main__":
    main()
