"""GradientStabilizer for Lightning: one callback.

::

    from gradstab.integrations.lightning import GradientStabilizerCallback

    trainer = lightning.Trainer(callbacks=[GradientStabilizerCallback(spike_guard=10.0)])

What the callback does, per Lightning hook:

* ``on_before_optimizer_step``: stabilizes the LightningModule's gradients, keyed by parameter
  name. Under ``precision="16-mixed"`` it takes the precision plugin's GradScaler: Lightning has
  unscaled the gradients already, except for fused optimizers (``AdamW(fused=True)``), whose
  gradients the callback unscales itself; a step the scaler will skip (an overflow) leaves
  gradients and statistics untouched. No host-device synchronization.
* logging, through ``pl_module.log``: ``gradstab/grad_norm_before`` and
  ``gradstab/grad_norm_after`` (L2 norm of all gradients before and after, per step) and
  ``gradstab/skipped`` (gradients left unscaled: non-finite ones, or all of them on a skipped
  step; ``_step`` per step and ``_epoch`` summed over the epoch).
* checkpoints: ``state_dict()``/``load_state_dict()`` put the statistics in Lightning checkpoints,
  so ``trainer.fit(..., ckpt_path=...)`` resumes them.

Lightning clips gradients (``gradient_clip_val``) after this hook, i.e. the stabilized gradients;
the callback warns once if clipping is on. One optimizer per Trainer (several optimizers: wrap
each in ``gradstab.StabilizedOptimizer`` instead).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gradstab._warn import user_stacklevel
from gradstab.optim import StabilizedOptimizer
from gradstab.stabilizer import GradientStabilizer

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
    except ImportError as err:
        raise ImportError(
            "gradstab.integrations.lightning needs Lightning: pip install 'lightning>=2.0'"
        ) from err

__all__ = ["GradientStabilizerCallback"]

LOG_PREFIX = "gradstab/"


class GradientStabilizerCallback(Callback):
    """Stabilizes the gradients of a LightningModule before every optimizer step.

    Args:
        **stabilizer_kwargs: the arguments of ``GradientStabilizer`` (gamma1=0.6, gamma2=0.999,
            eps=1e-12, bias_correction=True, granularity="param", nonfinite="zero",
            spike_guard=None, backend="auto").

    Attributes:
        stabilizer: the ``GradientStabilizer`` (state keyed by parameter name).
    """

    def __init__(self, **stabilizer_kwargs: Any) -> None:
        self.stabilizer = GradientStabilizer(**stabilizer_kwargs)
        self._warned: set[str] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.gradient_clip_val:
            self._warn_once(
                "clip",
                f"GradientStabilizerCallback: Lightning clips gradients (gradient_clip_val="
                f"{trainer.gradient_clip_val}) after this callback, so clipping rescales the "
                "stabilized gradients; GradientStabilizer replaces clipping, so leave "
                "gradient_clip_val unset.",
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if len(trainer.optimizers) > 1:
            raise RuntimeError(
                "gradstab: GradientStabilizerCallback supports one optimizer; with "
                f"{len(trainer.optimizers)} optimizers wrap each in gradstab.StabilizedOptimizer"
            )
        if isinstance(optimizer, StabilizedOptimizer):
            raise ValueError(
                "gradstab: configure_optimizers returned a StabilizedOptimizer and a "
                "GradientStabilizerCallback is installed too; use one of them, not both (each "
                "would stabilize the gradients)"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        stats = self.stabilizer.apply(pl_module, scaler=scaler, optimizer=optimizer)
        logged = {"on_step": True, "batch_size": 1}
        pl_module.log(LOG_PREFIX + "grad_norm_before", stats.norm_before, on_epoch=False, **logged)
        pl_module.log(LOG_PREFIX + "grad_norm_after", stats.norm_after, on_epoch=False, **logged)
        skipped = stats.skipped.to(torch.float32)
        pl_module.log(LOG_PREFIX + "skipped", skipped, on_epoch=True, reduce_fx="sum", **logged)

    def state_dict(self) -> dict[str, Any]:
        return self.stabilizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stabilizer.load_state_dict(state_dict)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    def __repr__(self) -> str:
        return f"GradientStabilizerCallback({self.stabilizer!r})"
