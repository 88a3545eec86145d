"""``StabilizedOptimizer``: a ``torch.optim.Optimizer`` that stabilizes gradients, then steps.

It wraps any optimizer and shares its ``param_groups``, ``state`` and ``defaults``, so LR
schedulers, ``torch.amp.GradScaler``, Lightning and the HuggingFace Trainer treat it as the
optimizer it wraps. ``step()`` runs ``GradientStabilizer.apply`` on the optimizer's gradients and
then the wrapped optimizer's ``step()``.

The stabilizer's state is keyed by the position of each parameter in ``param_groups`` (group by
group, in order), since an optimizer does not know parameter names: a checkpoint loads into an
optimizer built over the same parameters in the same order, and ``add_param_group`` appends new
positions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradstab.stabilizer import GradientStabilizer, StabilizerStats

__all__ = ["StabilizedOptimizer"]

# Where the stabilizer's state lives inside ``StabilizedOptimizer.state_dict()``: next to the
# wrapped optimizer's own "state" and "param_groups", so the dict also loads into a bare optimizer.
STABILIZER_KEY = "gradstab"


class StabilizedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that every ``step()`` stabilizes the gradients first.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap (not LBFGS, whose step re-evaluates the
            closure and would see unstabilized gradients).
        **stabilizer_kwargs: the arguments of ``GradientStabilizer`` (gamma1=0.6, gamma2=0.999,
            eps=1e-12, bias_correction=True, granularity="param", nonfinite="zero",
            spike_guard=None, backend="auto").

    Attributes:
        optimizer: the wrapped optimizer.
        stabilizer: the ``GradientStabilizer``, keyed by parameter position.
        last_stats: the ``StabilizerStats`` of the last ``step()`` that ran, or None.

    With ``torch.amp.GradScaler``, call ``scaler.step(wrapper)``. A plain inner optimizer is
    stepped by the scaler only when no gradient overflowed, so a skipped step never reaches the
    stabilizer. A fused inner optimizer (``_step_supports_amp_scaling``, e.g.
    ``AdamW(fused=True)``) is stepped every time with the scaler's ``grad_scale`` and
    ``found_inf`` tensors: the wrapper then unscales the gradients on the device, stabilizes with
    ``found_inf`` (a step with overflow changes nothing) and hands ``found_inf`` to the inner
    step, so the whole AMP step makes no host-device synchronization.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, **stabilizer_kwargs: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "gradstab: StabilizedOptimizer wraps a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(optimizer, StabilizedOptimizer):
            raise ValueError(
                "gradstab: this optimizer is already a StabilizedOptimizer; wrapping it again "
                "would stabilize every gradient twice"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "gradstab: LBFGS re-evaluates the closure inside its step, so its gradients "
                "cannot be stabilized from outside; use GradientStabilizer.apply in the closure"
            )
        self.stabilizer = GradientStabilizer(**stabilizer_kwargs)
        self.optimizer = optimizer
        self.last_stats: StabilizerStats | None = None
        self._init_hooks()

    def _init_hooks(self) -> None:
        # What Optimizer.__init__ sets up besides the parameters, which belong to the wrapped
        # optimizer: hooks registered on the wrapper run around the wrapper's methods.
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # ----------------------------------------------------------------------------------------
    # what is shared with the wrapped optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when the wrapped optimizer takes ``grad_scale``/``found_inf`` from GradScaler."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the wrapped optimizer; its parameters take the next positions."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ----------------------------------------------------------------------------------------
    # the step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluates ``closure`` (if any, with grad enabled), stabilizes, steps the optimizer.

        Returns the closure's result. When ``torch.amp.GradScaler.step`` has set ``grad_scale``
        and ``found_inf`` on this wrapper (fused inner optimizers only), the gradients are
        unscaled by ``1/grad_scale`` on their device, the stabilizer skips a step with
        ``found_inf > 0``, and the inner optimizer gets ``found_inf`` (and no ``grad_scale``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if grad_scale is not None:
            _unscale_grads_(self.optimizer.param_groups, grad_scale)
        self.last_stats = self.stabilizer.apply(self.optimizer, found_inf=found_inf)
        if found_inf is None:
            self.optimizer.step()
            return loss
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        return loss

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the stabilizer's under ``"gradstab"``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {**self.optimizer.state_dict(), STABILIZER_KEY: self.stabilizer.state_dict()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict saved by ``state_dict()``, or a plain state dict of the inner optimizer.

        A plain one (no ``"gradstab"`` entry) restores the optimizer and resets the stabilizer
        to fresh statistics. Either part is checked before anything is replaced.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict):
            raise TypeError(f"gradstab: state_dict must be a dict, got {type(state_dict).__name__}")
        inner = dict(state_dict)
        stabilizer_state = inner.pop(STABILIZER_KEY, None)
        if stabilizer_state is not None:
            # A throwaway stabilizer validates the entry before the optimizer is touched.
            GradientStabilizer().load_state_dict(stabilizer_state)
        self.optimizer.load_state_dict(inner)
        if stabilizer_state is None:
            self.stabilizer.reset()
        else:
            self.stabilizer.load_state_dict(stabilizer_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "stabilizer": self.stabilizer, "last_stats": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"StabilizedOptimizer(\n{inner},\n    {self.stabilizer!r}\n)"


def _unscale_grads_(param_groups: list[dict[str, Any]], grad_scale: Tensor) -> None:
    """Multiplies every gradient by ``1/grad_scale`` on its device, without reading the scale.

    The reciprocal is taken in float64 and rounded to float32, as ``GradScaler.unscale_`` does,
    so both paths give the same bits.
    """
    inv_scale = grad_scale.double().reciprocal().float()
    by_device: dict[torch.device, list[Tensor]] = {}
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                raise ValueError(
                    f"gradstab: param_groups[{gi}]['params'][{pi}] has a {p.grad.layout} "
                    "gradient; GradientStabilizer needs dense gradients"
                )
            by_device.setdefault(p.grad.device, []).append(p.grad)
    for device, grads in by_device.items():
        torch._foreach_mul_(grads, inv_scale.to(device, non_blocking=True))
