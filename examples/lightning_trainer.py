"""GradientStabilizer in a Lightning ``Trainer``: add one callback.

Fits a small MLP to a synthetic regression task in which every 25th batch is corrupted (a
gradient spike), with the stabilizer instead of gradient clipping; its figures are logged through
``pl_module.log`` (here to a CSV file), and its state is saved in Lightning checkpoints. The script
then resumes from the checkpoint of the first half and checks that it ends with the same weights.

    python examples/lightning_trainer.py [--steps 100] [--output-dir DIR]

Needs ``pip install 'lightning>=2.0'`` (the ``lightning`` extra). For AMP pass
``precision="16-mixed"`` (GPU) to the Trainer: the callback handles the loss scaler.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from gradstab.integrations.lightning import GradientStabilizerCallback

BATCHES_PER_EPOCH = 25


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=gen)
    x = torch.randn(64 * BATCHES_PER_EPOCH, 16, generator=gen)
    y = torch.tanh(x @ teacher)
    y[-64:] *= 1000.0  # the last batch of every epoch is corrupted
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def fit(out: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, Regression]:
    model = Regression()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=epochs,
        callbacks=[GradientStabilizerCallback(spike_guard=10.0)],
        logger=CSVLogger(out, name="gradstab"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    epochs = max(2, 2 * round(args.steps / BATCHES_PER_EPOCH / 2))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or Path(tmp)
        trainer, model = fit(out / "full", epochs)
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("gradstab/grad_norm_after")]
        for r in rows[:: max(1, len(rows) // 8)]:
            print(
                f"step {int(r['step']):4d}  loss {float(r['loss']):10.4f}  grad norm "
                f"{float(r['gradstab/grad_norm_before']):10.3f} -> "
                f"{float(r['gradstab/grad_norm_after']):.3f}"
            )

        half, _ = fit(out / "half", epochs // 2)
        half.save_checkpoint(out / "half.ckpt")
        _, resumed = fit(out / "resumed", epochs, ckpt_path=out / "half.ckpt")
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
        print(
            f"resumed after epoch {epochs // 2}: final weights {'identical' if same else 'DIFFER'}"
        )
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
