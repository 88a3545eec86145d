"""GradientStabilizer in a HuggingFace ``transformers.Trainer``: add one callback.

Trains a tiny randomly initialized Llama (no download) on synthetic sequences that follow a simple
rule, with the stabilizer instead of gradient clipping (``max_grad_norm=0``); its figures appear
in the Trainer's logs next to the loss. Then it resumes from the mid-run checkpoint and checks that
the resumed run ends with the same weights: the stabilizer's state travels in the checkpoint.

    python examples/huggingface_trainer.py [--steps 40] [--output-dir DIR]

Needs ``pip install 'transformers>=4.45' 'accelerate>=0.26'`` (the ``hf`` extra). On a GPU, add
``fp16=True`` (or ``bf16=True``) to the TrainingArguments: the callback handles the loss scaler.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from gradstab.integrations.huggingface import GradientStabilizerCallback

VOCAB, SEQ = 97, 16


class RuleSequences(torch.utils.data.Dataset):
    """Sequences x_{t+1} = (x_t + stride) mod VOCAB: learnable from the first two tokens."""

    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=gen)
        stride = torch.randint(1, 8, (n, 1), generator=gen)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def make_trainer(output_dir: Path, steps: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,  # GradientStabilizer replaces clipping
        logging_steps=max(1, steps // 8),
        save_strategy="steps",
        save_steps=max(1, steps // 2),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    callback = GradientStabilizerCallback(spike_guard=10.0)
    return Trainer(
        model=tiny_llama(), args=args, train_dataset=RuleSequences(), callbacks=[callback]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or Path(tmp)
        trainer = make_trainer(out, args.steps)
        trainer.train()
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(
                    f"step {entry['step']:4d}  loss {entry['loss']:.3f}  grad norm "
                    f"{entry['gradstab/grad_norm_before']:.3f} -> "
                    f"{entry['gradstab/grad_norm_after']:.3f}  skipped {entry['gradstab/skipped']}"
                )
        middle = out / f"checkpoint-{max(1, args.steps // 2)}"
        resumed = make_trainer(out / "resumed", args.steps)
        resumed.train(resume_from_checkpoint=str(middle))
        same = all(
            torch.equal(p, q)
            for p, q in zip(trainer.model.parameters(), resumed.model.parameters())
        )
        print(f"resumed from {middle.name}: final weights {'identical' if same else 'DIFFER'}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
