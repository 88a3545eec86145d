"""Where gradstab's warnings point."""

from __future__ import annotations

import sys

# Packages whose frames lie between the user's code and gradstab's warnings: torch's decorators
# and optimizer hooks, the trainers of the integrations, and DeepSpeed's optimizer step (which
# runs the HuggingFace callback's hook).
_NOT_USER_CODE = frozenset(
    {"gradstab", "torch", "transformers", "accelerate", "lightning", "pytorch_lightning",
     "lightning_fabric", "deepspeed"}
)  # fmt: skip


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` called by the caller of this function
    point at the user's code: the first frame outside gradstab, torch, DeepSpeed and the trainers,
    e.g. the line that called ``stab.apply(...)`` or ``trainer.train()``. A fixed stacklevel
    would point into torch's decorators or a trainer, at a depth that changes between their
    versions."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        _NOT_USER_CODE
    ):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1
