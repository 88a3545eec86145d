"""``GradientStabilizerCallback`` in a real ``transformers.Trainer`` (tiny random Llama, CPU).

AMP on the CPU: accelerate refuses fp16 there (it creates no GradScaler), so the tests hand the
Trainer's accelerator a real ``torch.amp.GradScaler("cpu")``; everything else is the Trainer's own
code path. Two set-ups:

* ``"fp16"``: ``fp16=True`` and the scaler with ``native_amp``: real fp16 autocast on the CPU; the
  Trainer unscales before the callback (transformers 5 always does, to log ``grad_norm``).
* ``"scaled"``: float32 compute with the scaler only: the loss is scaled and the Trainer never
  unscales (as transformers 4 without clipping), so the callback must; with a power-of-two
  scale this run must equal the unscaled one bit for bit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradstab.integrations.huggingface import GradientStabilizerCallback  # noqa: E402
from tests.helpers import assert_grads_close  # noqa: E402
from tests.reference import ReferenceStabilizer  # noqa: E402
from tests.training_helpers import assert_same_bits, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 64, 12
INIT_SCALE = 2.0**10
KEY = "GradientStabilizerCallback"


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Snapshots after every step: stabilizer state, weights, loss scale."""

    def __init__(self, stabilizer_callback: GradientStabilizerCallback) -> None:
        self.cb = stabilizer_callback
        self.steps: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        self.steps[state.global_step] = {
            "stab": self.cb.stabilizer.state_dict(),
            "weights": snapshot(model),
            "scale": None if scaler is None else scaler.get_scale(),
        }


class GradProbe(TrainerCallback):
    """Copies the gradients (and the scaler's stage) where it sits in the callback list."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.stages: list[str] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            self.stages.append(scaler._per_optimizer_states[id(optimizer.optimizer)]["stage"].name)


class OverflowAt(TrainerCallback):
    """Makes one gradient infinite during the backward pass of step ``step`` (0-based)."""

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        self.armed = False
        self.step = step
        model.lm_head.weight.register_hook(lambda g: g * math.inf if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.step


def make_trainer(
    out: Path,
    model: LlamaForCausalLM,
    callbacks: list,
    *,
    amp: str = "off",
    max_steps: int = 6,
    max_grad_norm: float = 0.0,
    save_steps: int | None = None,
    **extra,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        fp16=amp == "fp16",
        bf16=amp == "bf16",
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(0), callbacks=callbacks)
    if amp in ("fp16", "scaled"):
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        trainer.accelerator.native_amp = amp == "fp16"
    return trainer


def train(tmp_path: Path, amp: str = "off", **kwargs):
    model = tiny_llama(0)
    cb = GradientStabilizerCallback(**kwargs.pop("stabilizer", {}))
    recorder = Recorder(cb)
    callbacks = [cb, recorder, *kwargs.pop("callbacks", [])]
    if "overflow_at" in kwargs:
        callbacks.append(OverflowAt(model, kwargs.pop("overflow_at")))
    trainer = make_trainer(tmp_path / amp, model, callbacks, amp=amp, **kwargs)
    trainer.train()
    return trainer, cb, recorder


def test_scaled_fp32_run_equals_unscaled_bit_for_bit(tmp_path):
    """The Trainer does not unscale here, so the callback does (the transformers-4 path)."""
    scaled, scaled_cb, _ = train(tmp_path, "scaled", stabilizer={"spike_guard": 8.0})
    plain, plain_cb, _ = train(tmp_path, "off", stabilizer={"spike_guard": 8.0})
    assert_same_bits(snapshot(scaled.model), snapshot(plain.model), "weights")
    assert_same_bits(scaled_cb.stabilizer.state_dict(), plain_cb.stabilizer.state_dict(), "stab")
    assert scaled_cb.stabilizer.state_dict()["k"].eq(6).all()

    # Where the callback runs, the gradients are still scaled (stage READY) on this path.
    model = tiny_llama(0)
    cb = GradientStabilizerCallback()
    before = GradProbe()
    trainer = make_trainer(tmp_path / "probe", model, [before, cb], amp="scaled", max_steps=1)
    trainer.train()
    assert before.stages == ["READY"]


@pytest.mark.parametrize(
    ("amp", "max_grad_norm"), [("scaled", 0.0), ("fp16", 0.0), ("fp16", 1.0)], ids=str
)
def test_skipped_overflow_step_leaves_no_trace(tmp_path, amp, max_grad_norm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, rec = train(tmp_path, amp, overflow_at=2, max_grad_norm=max_grad_norm)
    ours = [w for w in caught if "GradientStabilizerCallback" in str(w.message)]
    assert len(ours) == (1 if max_grad_norm > 0 else 0), [str(w.message) for w in ours]
    if ours:
        assert "max_grad_norm" in str(ours[0].message)
    # Step 3 (the third) overflowed: the scaler skipped it and halved its scale.
    assert rec.steps[3]["scale"] == rec.steps[2]["scale"] / 2
    assert_same_bits(rec.steps[3]["stab"], rec.steps[2]["stab"], "stabilizer at the skipped step")
    assert_same_bits(
        rec.steps[3]["weights"], rec.steps[2]["weights"], "weights at the skipped step"
    )
    n_params = len(list(trainer.model.parameters()))
    assert rec.steps[6]["stab"]["k"].eq(5).all(), "every other step was a valid update"
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert logs[3]["gradstab/skipped"] == n_params
    assert [logs[s]["gradstab/skipped"] for s in (1, 2, 4, 5, 6)] == [0] * 5
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_gradients_match_the_reference_and_figures_are_logged(tmp_path, amp):
    model = tiny_llama(0)
    cb = GradientStabilizerCallback(granularity="param")
    before, after = GradProbe(), GradProbe()
    autocast_dtypes = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: autocast_dtypes.append(o.dtype)
    )
    trainer = make_trainer(tmp_path, model, [before, cb, after], amp=amp, max_steps=5)
    trainer.train()
    expected_dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert set(autocast_dtypes) == {expected_dtype}
    names = [n for n, _ in model.named_parameters()]
    refs = {n: ReferenceStabilizer(1) for n in names}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 5
    for step, (g_in, g_out, log) in enumerate(zip(before.grads, after.grads, logs)):
        for n in names:
            expected, _ = refs[n].step([g_in[n]])
            assert_grads_close([g_out[n]], expected, torch.float32, f"{amp} step={step} {n}")
        norm_in = torch.stack([g.double().norm() for g in g_in.values()]).norm().item()
        norm_out = torch.stack([g.double().norm() for g in g_out.values()]).norm().item()
        assert log["gradstab/grad_norm_before"] == pytest.approx(norm_in, rel=1e-5)
        assert log["gradstab/grad_norm_after"] == pytest.approx(norm_out, rel=1e-5)
        assert log["gradstab/skipped"] == 0
    assert cb.stabilizer.state_dict()["keys"] == names


@pytest.mark.parametrize(
    ("amp", "restore_flag"), [("off", False), ("fp16", False), ("off", True)], ids=str
)
def test_resumed_run_equals_uninterrupted(tmp_path, amp, restore_flag):
    extra = {"restore_callback_states_from_checkpoint": restore_flag}
    full, full_cb, _ = train(
        tmp_path / "full", amp, save_steps=3, stabilizer={"gamma1": 0.7}, **extra
    )
    checkpoint = tmp_path / "full" / amp / "checkpoint-3"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"][KEY]
    assert state["args"] == {"gamma1": 0.7}
    assert state["attributes"]["stabilizer_state"]["k"] == [3] * len(list(full.model.parameters()))

    def resume(from_checkpoint: Path, out: Path):
        model = tiny_llama(1)  # other weights: the checkpoint must bring them back
        cb = GradientStabilizerCallback(gamma1=0.7)
        trainer = make_trainer(out, model, [cb], amp=amp, save_steps=3, **extra)
        trainer.train(resume_from_checkpoint=str(from_checkpoint))
        live = [c for c in trainer.callback_handler.callbacks if isinstance(c, type(cb))]
        assert len(live) == 1
        return trainer, live[0]

    resumed, resumed_cb = resume(checkpoint, tmp_path / "resumed")
    assert_same_bits(snapshot(resumed.model), snapshot(full.model), "weights")
    assert_same_bits(resumed_cb.stabilizer.state_dict(), full_cb.stabilizer.state_dict(), "stab")

    # Control: the same resume without the saved statistics ends elsewhere (and says so).
    del saved["stateful_callbacks"][KEY]
    (checkpoint / "trainer_state.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="no stabilizer state"):
        fresh, _ = resume(checkpoint, tmp_path / "fresh")
    weights = snapshot(fresh.model)
    assert any(not torch.equal(weights[n], p) for n, p in snapshot(full.model).items())


def test_callback_takes_the_stabilizer_arguments():
    cb = GradientStabilizerCallback(gamma1=0.8, nonfinite="skip", spike_guard=6.0)
    assert (cb.stabilizer.gamma1, cb.stabilizer.nonfinite, cb.stabilizer.spike_guard) == (
        0.8,
        "skip",
        6.0,
    )
    with pytest.raises(ValueError, match="gamma2"):
        GradientStabilizerCallback(gamma2=1.0)


def test_stabilized_optimizer_with_the_callback_is_refused(tmp_path):
    import gradstab

    model = tiny_llama(0)
    opt = gradstab.StabilizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, max_grad_norm=0.0
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(0),
        callbacks=[GradientStabilizerCallback()],
        optimizers=(opt, None),
    )
    with pytest.raises(ValueError, match="one of them"):
        trainer.train()


def test_importing_gradstab_needs_neither_transformers_nor_lightning():
    code = (
        "import sys, gradstab, gradstab.integrations\n"
        "assert not {'transformers', 'lightning', 'pytorch_lightning'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
