"""GradientStabilizer for the HuggingFace ``transformers.Trainer``: one callback.

::

    from gradstab.integrations.huggingface import GradientStabilizerCallback

    args = TrainingArguments(..., max_grad_norm=0.0)   # the stabilizer replaces clipping
    trainer = Trainer(model, args, callbacks=[GradientStabilizerCallback(spike_guard=10.0)])

What the callback does, per Trainer event:

* ``on_pre_optimizer_step`` (after the Trainer's clipping, before ``optimizer.step()``): stabilizes
  the model's gradients, keyed by parameter name. Under fp16 AMP it finds the GradScaler on the
  Trainer's (accelerate) optimizer: if the Trainer has not unscaled the gradients yet (no
  clipping in transformers 4.x) it unscales them; a step the scaler will skip (an overflow)
  leaves gradients and statistics untouched. No host-device synchronization.
* ``on_log``: adds ``gradstab/grad_norm_before``, ``gradstab/grad_norm_after`` (the last step's
  L2 norm of all gradients before and after) and ``gradstab/skipped`` (gradients left unscaled
  since the previous log: non-finite ones, or all of them on a step the scaler skipped) to the
  training logs (one synchronization per log).
* checkpoints: its statistics are saved in ``trainer_state.json`` of every checkpoint (the
  Trainer's ``ExportableState`` mechanism) and restored on ``train(resume_from_checkpoint=...)``,
  so a resumed run equals an uninterrupted one. The arguments given to the callback win over the
  checkpoint's settings (one warning names each difference), e.g. to turn ``spike_guard`` on in a
  resumed run; with ``restore_callback_states_from_checkpoint=True`` transformers rebuilds the
  callback from the checkpoint's own arguments instead.

The Trainer clips gradients to ``max_grad_norm`` (default 1.0) before the callback runs; clipping
feeds the statistics clipped norms, so the callback warns once when ``max_grad_norm > 0``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gradstab._warn import user_stacklevel
from gradstab.integrations import deepspeed as _deepspeed
from gradstab.stabilizer import GradientStabilizer, StabilizerStats

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradstab.integrations.huggingface needs transformers: "
        "pip install 'transformers>=4.45' 'accelerate>=0.26'"
    ) from err

__all__ = ["GradientStabilizerCallback"]

LOG_PREFIX = "gradstab/"


class GradientStabilizerCallback(TrainerCallback, ExportableState):
    """Stabilizes the gradients of a ``transformers.Trainer`` before every optimizer step.

    Args:
        **stabilizer_kwargs: the arguments of ``GradientStabilizer`` (gamma1=0.6, gamma2=0.999,
            eps=1e-12, bias_correction=True, granularity="param", nonfinite="zero",
            spike_guard=None, backend="auto").

    Attributes:
        stabilizer: the ``GradientStabilizer`` (state keyed by parameter name).
    """

    def __init__(self, **stabilizer_kwargs: Any) -> None:
        self.stabilizer = GradientStabilizer(**stabilizer_kwargs)
        self._kwargs = dict(stabilizer_kwargs)
        self._warned: set[str] = set()
        self._last: StabilizerStats | None = None
        self._skipped: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------
    # checkpoints: trainer_state.json holds state() of every ExportableState callback

    def state(self) -> dict[str, Any]:
        # "args" rebuild the callback under restore_callback_states_from_checkpoint=True: the
        # settings chosen by the user (in the constructor or assigned since), as they are now.
        stabilizer = self.stabilizer
        chosen = {name: getattr(stabilizer, name) for name in sorted(stabilizer._explicit)}
        return {
            "args": {**self._kwargs, **chosen},
            "attributes": {"stabilizer_state": self.stabilizer_state},
        }

    @property
    def stabilizer_state(self) -> dict[str, Any]:
        """The stabilizer's ``state_dict()`` in plain JSON types (exact: float64 values print
        and parse back to the same bits)."""
        sd = self.stabilizer.state_dict()
        return {**sd, "m": sd["m"].tolist(), "v": sd["v"].tolist(), "k": sd["k"].tolist()}

    @stabilizer_state.setter
    def stabilizer_state(self, value: dict[str, Any]) -> None:
        # The Trainer's restore_callback_states_from_checkpoint=True sets this on a new instance.
        self.stabilizer.load_state_dict(
            {
                **value,
                "m": torch.tensor(value["m"], dtype=torch.float64),
                "v": torch.tensor(value["v"], dtype=torch.float64),
                "k": torch.tensor(value["k"], dtype=torch.int64),
            }
        )

    # ----------------------------------------------------------------------------------------
    # Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            self._warn_once(
                "clip",
                f"GradientStabilizerCallback: the Trainer clips gradients to max_grad_norm="
                f"{args.max_grad_norm} before the stabilizer runs, which feeds its statistics "
                "clipped norms; GradientStabilizer replaces clipping, so set "
                "TrainingArguments(max_grad_norm=0.0).",
            )
        if state.global_step > 0:  # resumed from a checkpoint: its trainer_state.json is loaded
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(saved, list):
                raise RuntimeError(
                    "gradstab: the checkpoint holds several GradientStabilizerCallback states; "
                    "use one GradientStabilizerCallback per Trainer"
                )
            if saved is None:
                self._warn_once(
                    "resume",
                    "GradientStabilizerCallback: the checkpoint being resumed holds no "
                    "stabilizer state (was it trained without the callback?); the statistics "
                    "start fresh.",
                )
                # The Trainer's next checkpoint expects an entry for every stateful callback.
                state.stateful_callbacks[type(self).__name__] = self.state()
            else:
                self.stabilizer_state = saved["attributes"]["stabilizer_state"]
        self._last, self._skipped = None, None
        self._remove_deepspeed_hook()
        self._deepspeed_hook = _deepspeed.trainer_hook(
            self.stabilizer, model, kwargs.get("optimizer"), args, self._record
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_deepspeed_hook()

    def _remove_deepspeed_hook(self) -> None:
        hook = getattr(self, "_deepspeed_hook", None)
        if hook is not None:
            hook.remove()
        self._deepspeed_hook = None

    def _record(self, stats: StabilizerStats) -> None:
        self._last = stats
        self._skipped = stats.skipped if self._skipped is None else self._skipped + stats.skipped

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(self, "_deepspeed_hook", None) is not None:
            return  # DeepSpeed: stabilized inside engine.step(), before its optimizer steps
        inner, scaler = _unwrap(optimizer)
        if not any(p.grad is not None for p in model.parameters()):
            self._warn_once(
                "nograd",
                "GradientStabilizerCallback: the model has no gradients at the optimizer step "
                "(a sharded setup gradstab does not know keeps them elsewhere); nothing is "
                "stabilized.",
            )
            return
        self._record(self.stabilizer.apply(model, scaler=scaler, optimizer=inner))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None:
            return
        figures = torch.stack(
            [
                self._last.norm_before.double(),
                self._last.norm_after.double(),
                self._skipped.double(),
            ]
        ).tolist()
        self._last, self._skipped = None, None
        new = {
            LOG_PREFIX + "grad_norm_before": figures[0],
            LOG_PREFIX + "grad_norm_after": figures[1],
            LOG_PREFIX + "skipped": int(figures[2]),
        }
        # The Trainer appended these logs to state.log_history before calling on_log, and passes
        # the same dict to the callbacks after this one (the progress bar or printer).
        logs.update(new)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(new)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    def __repr__(self) -> str:
        return f"GradientStabilizerCallback({self.stabilizer!r})"


def _unwrap(optimizer: Any) -> tuple[torch.optim.Optimizer | None, torch.amp.GradScaler | None]:
    """The optimizer that the GradScaler steps and the scaler: accelerate's AcceleratedOptimizer
    holds both (``.optimizer``, ``.scaler``); a bare optimizer has no scaler."""
    from gradstab.optim import StabilizedOptimizer

    if optimizer is None:
        return None, None
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", optimizer) if scaler is not None else optimizer
    if isinstance(inner, StabilizedOptimizer) or isinstance(
        getattr(optimizer, "optimizer", None), StabilizedOptimizer
    ):
        raise ValueError(
            "gradstab: the Trainer's optimizer is a StabilizedOptimizer and a "
            "GradientStabilizerCallback is installed too; use one of them, not both (each "
            "would stabilize the gradients)"
        )
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    return inner, scaler
