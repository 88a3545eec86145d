"""Loads the compiled extension and registers what torch.compile needs to trace its op.

A missing or broken ``gradstab._C`` is not an error: gradstab then runs on its pure-torch backend
and says so once, with a ``RuntimeWarning`` that names the cause.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

try:
    from gradstab import _C
except (ImportError, OSError) as err:
    _C = None
    LOAD_ERROR: str | None = f"{type(err).__name__}: {err}"
    warnings.warn(
        "gradstab: the compiled extension gradstab._C could not be loaded "
        f"({LOAD_ERROR}); falling back to the slower pure-torch backend. Reinstall with "
        "`pip install --no-build-isolation .` next to the torch you run to get the kernels.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None

HAS_EXTENSION = _C is not None


# The kernels are registered once, when gradstab._C loads. Asking the dispatcher then, not per
# call, keeps has_kernel a plain lookup: cheap, and traceable by torch.compile (which cannot trace
# the dispatcher query inside a fullgraph=True graph).
_KERNELS = {
    (op, device_type): _C is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"gradstab::{op}", key)
    for op in ("stabilize_", "stabilized_adamw_")
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has_kernel(device_type: str, op: str = "stabilize_") -> bool:
    """Whether the compiled op ``gradstab::<op>`` has a kernel for tensors on ``device_type``
    ("cpu", "cuda")."""
    return _KERNELS.get((op, device_type), False)


def build_info() -> str:
    return _C.build_info() if _C is not None else f"not loaded ({LOAD_ERROR})"


if _C is not None:

    @torch.library.register_fake("gradstab::stabilize_")
    def _stabilize_fake(
        grads: list[Tensor],
        m: Tensor,
        v: Tensor,
        k: Tensor,
        found_inf: Tensor | None,
        gamma1: float,
        gamma2: float,
        eps: float,
        bias_correction: bool,
        global_norm: bool,
        nonfinite: int,
        spike_guard: float | None,
    ) -> Tensor:
        return m.new_empty((len(grads),), dtype=torch.float64)

    @torch.library.register_fake("gradstab::stabilized_adamw_")
    def _stabilized_adamw_fake(
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        m: Tensor,
        v: Tensor,
        k: Tensor,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        group_sizes: list[int],
        lr: list[float],
        beta1: list[float],
        beta2: list[float],
        weight_decay: list[float],
        eps: list[float],
        amsgrad: bool,
        maximize: bool,
        gamma1: float,
        gamma2: float,
        stab_eps: float,
        bias_correction: bool,
        global_norm: bool,
        nonfinite: int,
        spike_guard: float | None,
    ) -> Tensor:
        return m.new_empty((len(params),), dtype=torch.float64)
