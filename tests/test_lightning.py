"""``GradientStabilizerCallback`` in a real ``lightning.Trainer`` on the CPU.

``precision="16-mixed"`` runs with Lightning's own ``MixedPrecision`` plugin and a real
``torch.amp.GradScaler("cpu")`` (fp16 autocast works on the CPU). Lightning unscales before the
callback, except for fused optimizers, whose gradients the callback unscales: both are tested.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

import gradstab  # noqa: E402
from gradstab.integrations.lightning import GradientStabilizerCallback  # noqa: E402
from tests.helpers import assert_grads_close  # noqa: E402
from tests.reference import ReferenceStabilizer  # noqa: E402
from tests.training_helpers import assert_same_bits, mlp, snapshot  # noqa: E402

INIT_SCALE = 2.0**10
BATCHES_PER_EPOCH = 4


class Regression(L.LightningModule):
    def __init__(self, seed: int = 0, fused: bool = False, wrap: bool = False) -> None:
        super().__init__()
        self.net = mlp(seed)
        self.fused, self.wrap = fused, wrap
        self.autocast_dtypes: list[torch.dtype] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.autocast_dtypes.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)
        if self.wrap:
            opt = gradstab.StabilizedOptimizer(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * BATCHES_PER_EPOCH, 13, generator=gen)
    y = torch.randn(16 * BATCHES_PER_EPOCH, 3, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


class MemoryLogger(Logger):
    """Keeps what Lightning sends to a logger, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.setdefault(step, {}).update(metrics)


class GradProbe(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.stages: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.stages.append(scaler._per_optimizer_states[id(optimizer)]["stage"].name)


class Recorder(L.Callback):
    def __init__(self, cb: GradientStabilizerCallback) -> None:
        self.cb = cb
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.steps[len(self.steps) + 1] = {
            "stab": self.cb.stabilizer.state_dict(),
            "weights": snapshot(pl_module),
            "scale": None if scaler is None else scaler.get_scale(),
        }


class OverflowAt(L.Callback):
    """Makes one gradient infinite in the backward pass of batch ``index`` (0-based)."""

    def __init__(self, module: Regression, index: int) -> None:
        self.armed = False
        self.index = index
        module.net[0].weight.register_hook(lambda g: g * math.inf if self.armed else g)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.armed = trainer.global_step == self.index


def make_trainer(callbacks, precision: str = "32", epochs: int = 2, **kwargs) -> L.Trainer:
    plugins = []
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    elif precision == "bf16-mixed":
        plugins = [MixedPrecision("bf16-mixed", "cpu")]
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        plugins=plugins,
        logger=kwargs.pop("logger", False),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("precision", "fused"),
    [("32", False), ("bf16-mixed", False), ("16-mixed", False), ("16-mixed", True)],
    ids=["fp32", "bf16", "fp16", "fp16-fused"],
)
def test_gradients_match_the_reference_and_figures_are_logged(precision, fused):
    module = Regression(fused=fused)
    cb = GradientStabilizerCallback()
    before, after = GradProbe(), GradProbe()
    logger = MemoryLogger()
    trainer = make_trainer([before, cb, after], precision, epochs=1, logger=logger)
    trainer.fit(module, loader())
    expected_dtype = {"32": torch.float32, "bf16-mixed": torch.bfloat16}.get(precision, torch.half)
    assert set(module.autocast_dtypes) == {expected_dtype}
    if precision == "16-mixed":
        # Lightning unscales for a plain optimizer; for a fused one the callback does.
        assert set(before.stages) == {"READY" if fused else "UNSCALED"}
        assert set(after.stages) == {"UNSCALED"}
    names = [n for n, _ in module.named_parameters()]
    refs = {n: ReferenceStabilizer(1) for n in names}
    assert len(before.grads) == BATCHES_PER_EPOCH
    for step, (g_in, g_out) in enumerate(zip(before.grads, after.grads)):
        if precision == "16-mixed" and fused:
            g_in = {n: g / INIT_SCALE for n, g in g_in.items()}  # exact: a power of two
        for n in names:
            expected, _ = refs[n].step([g_in[n]])
            assert_grads_close([g_out[n]], expected, torch.float32, f"step={step} {n}")
        figures = logger.metrics[step]
        norm_in = torch.stack([g.double().norm() for g in g_in.values()]).norm().item()
        norm_out = torch.stack([g.double().norm() for g in g_out.values()]).norm().item()
        assert figures["gradstab/grad_norm_before"] == pytest.approx(norm_in, rel=1e-5)
        assert figures["gradstab/grad_norm_after"] == pytest.approx(norm_out, rel=1e-5)
        assert figures["gradstab/skipped_step"] == 0
    assert cb.stabilizer.state_dict()["keys"] == names


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_skipped_overflow_step_leaves_no_trace(fused):
    module = Regression(fused=fused)
    cb = GradientStabilizerCallback()
    rec = Recorder(cb)
    logger = MemoryLogger()
    trainer = make_trainer([cb, rec, OverflowAt(module, 2)], "16-mixed", epochs=1, logger=logger)
    trainer.fit(module, loader())
    assert rec.steps[3]["scale"] == rec.steps[2]["scale"] / 2, "the scaler skipped step 3"
    assert_same_bits(rec.steps[3]["stab"], rec.steps[2]["stab"], "stabilizer at the skipped step")
    assert_same_bits(
        rec.steps[3]["weights"], rec.steps[2]["weights"], "weights at the skipped step"
    )
    assert rec.steps[4]["stab"]["k"].eq(3).all()
    skipped = {
        step: m["gradstab/skipped_step"]
        for step, m in logger.metrics.items()
        if "gradstab/skipped_step" in m
    }
    assert skipped == {0: 0, 1: 0, 2: 4, 3: 0}
    epoch_total = [
        m["gradstab/skipped_epoch"]
        for m in logger.metrics.values()
        if "gradstab/skipped_epoch" in m
    ]
    assert epoch_total == [4]


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_resumed_fit_equals_uninterrupted(tmp_path: Path, precision):
    full_module, full_cb = Regression(), GradientStabilizerCallback(spike_guard=5.0)
    make_trainer([full_cb], precision, epochs=2).fit(full_module, loader())

    half_module, half_cb = Regression(), GradientStabilizerCallback(spike_guard=5.0)
    half = make_trainer([half_cb], precision, epochs=1)
    half.fit(half_module, loader())
    ckpt = tmp_path / "half.ckpt"
    half.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    stab_state = saved["callbacks"]["GradientStabilizerCallback"]
    assert stab_state["k"].eq(BATCHES_PER_EPOCH).all()
    assert stab_state["config"]["spike_guard"] == 5.0

    def resume(path: Path):
        module, cb = Regression(seed=1), GradientStabilizerCallback()
        make_trainer([cb], precision, epochs=2).fit(module, loader(), ckpt_path=path)
        return module, cb

    module, cb = resume(ckpt)
    assert cb.stabilizer.spike_guard == 5.0
    assert_same_bits(snapshot(module), snapshot(full_module), "weights")
    assert_same_bits(cb.stabilizer.state_dict(), full_cb.stabilizer.state_dict(), "stabilizer")

    # Control: without the callback's state the resumed run ends elsewhere.
    del saved["callbacks"]["GradientStabilizerCallback"]
    torch.save(saved, tmp_path / "without.ckpt")
    module, _ = resume(tmp_path / "without.ckpt")
    weights = snapshot(module)
    assert any(not torch.equal(weights[n], w) for n, w in snapshot(full_module).items())


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_stabilized_optimizer_in_lightning_equals_the_callback(precision):
    """configure_optimizers may return a StabilizedOptimizer (with an LR scheduler) instead."""
    with_cb = Regression()
    make_trainer([GradientStabilizerCallback()], precision).fit(with_cb, loader())
    wrapped = Regression(wrap=True)
    make_trainer([], precision).fit(wrapped, loader())
    assert_same_bits(snapshot(wrapped), snapshot(with_cb), "weights")
    with pytest.raises(ValueError, match="one of them"):
        make_trainer([GradientStabilizerCallback()]).fit(Regression(wrap=True), loader())


def test_warns_once_when_lightning_clips():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = GradientStabilizerCallback()
        model = Regression()  # one callback keeps the statistics of one model
        trainer = make_trainer([cb], gradient_clip_val=1.0)
        trainer.fit(model, loader())
        trainer = make_trainer([cb], gradient_clip_val=1.0)
        trainer.fit(model, loader())
    ours = [str(w.message) for w in caught if "GradientStabilizerCallback" in str(w.message)]
    assert len(ours) == 1 and "gradient_clip_val" in ours[0], ours


class TwoOptimizers(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)


def test_two_optimizers_are_refused():
    with pytest.raises(RuntimeError, match="one optimizer"):
        make_trainer([GradientStabilizerCallback()], epochs=1).fit(TwoOptimizers(), loader())


def test_callback_takes_the_stabilizer_arguments():
    cb = GradientStabilizerCallback(granularity="global", gamma2=0.99)
    assert (cb.stabilizer.granularity, cb.stabilizer.gamma2) == ("global", 0.99)
    with pytest.raises(ValueError, match="nonfinite"):
        GradientStabilizerCallback(nonfinite="ignore")
