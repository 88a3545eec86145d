"""The stateless core of gradstab: ``init_state`` and ``stabilize_``.

For each gradient ``g`` (``granularity="param"``) or for all of them at once (``"global"``), one
step of GradientStabilizer (Huang et al., ICML 2026) is::

    n = ||g||_2                                   (a float64 sum of squares: finite whenever
                                                   every element is, even past float32's range)
    k += 1
    m = gamma1 * m + (1 - gamma1) * n             first moment of the norm
    v = gamma2 * v + (1 - gamma2) * n^2           second moment of the norm
    m_hat = m / (1 - gamma1^k);  v_hat = v / (1 - gamma2^k)      (bias_correction)
    g <- g * (m_hat / (sqrt(v_hat) + eps)) / max(n, eps)

so ``g`` keeps its direction and takes the norm ``m_hat / (sqrt(v_hat) + eps)``. A step with a
non-finite norm, a zero norm or ``found_inf > 0`` does not touch the statistics (see
``stabilize_``). The whole list is handled by one call of the compiled op ``gradstab::stabilize_``
(or its pure-torch twin), which ``torch.compile(fullgraph=True)`` can trace.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradstab import _ops, _torch_backend, distributed

GRANULARITIES = ("param", "global")
NONFINITE_POLICIES = {"zero": 0, "skip": 1, "raise": 2}
BACKENDS = ("auto", "compiled", "torch")
# eps guards the division against a zero norm and is meant to be far below every gradient's
# norm: at 1 or more it would dominate sqrt(v_hat) and change the transform (docs/design.md).
EPS_BOUND = 1.0

__all__ = ["StabilizerState", "init_state", "stabilize_", "validate_config", "validate_eps"]


class StabilizerState(NamedTuple):
    """Running statistics for one list of gradients, as flat tensors on the gradients' device.

    m: float64 first moment of the norm; v: float64 second moment; k: int64 number of valid
    updates. One entry per gradient for ``granularity="param"``, a single entry for ``"global"``.
    """

    m: Tensor
    v: Tensor
    k: Tensor


def validate_eps(eps: float, name: str = "gradstab: eps") -> None:
    """Raises ``TypeError`` unless ``eps`` is a number, ``ValueError`` unless it is in
    (0, EPS_BOUND); ``name`` starts the message."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(eps).__name__}")
    if not 0.0 < eps < EPS_BOUND:
        raise ValueError(f"{name} must be in (0, {EPS_BOUND:g}), got {eps!r}")


def validate_config(
    gamma1: float,
    gamma2: float,
    eps: float,
    bias_correction: bool,
    granularity: str,
    nonfinite: str,
    spike_guard: float | None,
) -> None:
    """Raises ``ValueError`` (``TypeError`` for a wrong type) naming the first bad argument.

    The ranges: gamma1 and gamma2 in [0, 1), eps in (0, 1), spike_guard > 0 and finite, or None.
    """
    for name, value in (("gamma1", gamma1), ("gamma2", gamma2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"gradstab: {name} must be a float, got {type(value).__name__}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"gradstab: {name} must be in [0, 1), got {value!r}")
    validate_eps(eps)
    if not isinstance(bias_correction, bool):
        raise TypeError(
            f"gradstab: bias_correction must be a bool, got {type(bias_correction).__name__}"
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"gradstab: granularity must be 'param' or 'global', got {granularity!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"gradstab: nonfinite must be 'zero', 'skip' or 'raise', got {nonfinite!r}"
        )
    if spike_guard is not None:
        if isinstance(spike_guard, bool) or not isinstance(spike_guard, (int, float)):
            raise TypeError(
                f"gradstab: spike_guard must be a float or None, got {type(spike_guard).__name__}"
            )
        if not (spike_guard > 0.0 and spike_guard != float("inf")):
            raise ValueError(
                f"gradstab: spike_guard must be a finite number > 0 or None, got {spike_guard!r}"
            )


def init_state(
    grads: Sequence[Tensor],
    granularity: str = "param",
    device: torch.device | str | None = None,
) -> StabilizerState:
    """Fresh (zero) statistics for ``grads``.

    Args:
        grads: the gradients the state will serve (only their number and device are used).
        granularity: ``"param"`` (default): one (m, v, k) per gradient; ``"global"``: one in all.
        device: where the state lives; default: the device of ``grads[0]``, else the CPU.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"gradstab: granularity must be 'param' or 'global', got {granularity!r}")
    if device is None:
        device = grads[0].device if len(grads) else torch.device("cpu")
    size = 1 if granularity == "global" else len(grads)
    return StabilizerState(
        m=torch.zeros(size, dtype=torch.float64, device=device),
        v=torch.zeros(size, dtype=torch.float64, device=device),
        k=torch.zeros(size, dtype=torch.int64, device=device),
    )


_is_cpu = operator.attrgetter("is_cpu")
_is_cuda = operator.attrgetter("is_cuda")


def _all_on(grads: Sequence[Tensor], device: torch.device) -> bool:
    """Whether every grad is on ``device``; without building a torch.device per grad, which
    cost 0.2 us each (80 us for 400 gradients, a third of a compiled CPU step), nor a Python
    frame per grad where ``map`` can do (a generator doubled the cost)."""
    compiling = torch.compiler.is_compiling()  # Dynamo cannot trace attrgetter
    if device.type == "cpu":
        return all(g.is_cpu for g in grads) if compiling else all(map(_is_cpu, grads))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if compiling:
            return all(g.is_cuda and g.get_device() == index for g in grads)
        return all(map(_is_cuda, grads)) and set(map(Tensor.get_device, grads)) <= {index}
    return all(g.device == device for g in grads)


def _use_compiled(grads: Sequence[Tensor], device: torch.device, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "compiled":
        if not _ops.HAS_EXTENSION:
            raise RuntimeError(f"gradstab: backend='compiled' but {_ops.build_info()}")
        if not _ops.has_kernel(device.type):
            raise RuntimeError(
                f"gradstab: backend='compiled' has no kernel for gradients on {device.type}; "
                "use backend='auto' or 'torch'"
            )
        # The op itself refuses, naming it, a gradient on another device.
        return True
    return _ops.has_kernel(device.type) and _all_on(grads, device)


def stabilize_(
    grads: Sequence[Tensor],
    state: StabilizerState,
    *,
    gamma1: float = 0.6,
    gamma2: float = 0.999,
    eps: float = 1e-12,
    bias_correction: bool = True,
    granularity: str = "param",
    nonfinite: str = "zero",
    spike_guard: float | None = None,
    found_inf: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """One GradientStabilizer step on ``grads``, in place; returns their norms before scaling.

    Args:
        grads: gradient tensors (float16, bfloat16, float32 or float64, dense, any strides) on
            the device of ``state``; rescaled in place.
        state: ``init_state(grads, granularity)``; its m, v, k are updated in place.
        gamma1: decay of the first moment m of the norm. Default 0.6.
        gamma2: decay of the second moment v of the norm. Default 0.999.
        eps: added to sqrt(v_hat), and the floor of n in the division; in (0, 1). Default 1e-12.
        bias_correction: divide m and v by (1 - gamma^k). Default True.
        granularity: ``"param"`` (one norm per gradient, the paper's default) or ``"global"``
            (one norm over all gradients, like ``clip_grad_norm_``). Default ``"param"``.
        nonfinite: what to do with a gradient whose norm is NaN or Inf: ``"zero"`` (default) sets
            it to 0, ``"skip"`` leaves it as it is, ``"raise"`` raises ``FloatingPointError``
            before anything changes (this one reads the norms on the host). The statistics are
            never fed a non-finite norm.
        spike_guard: ``None`` (default, the paper's transform) or G > 0: once k > 0 the
            statistics are fed ``min(n, G * sqrt(v_hat_prev))``; the gradient is still divided
            by its true n.
        found_inf: optional one-element tensor; > 0 means a loss scaler will skip this step, so
            nothing (gradients or state) changes. With sharded (``DTensor``) gradients, > 0 on
            any rank that shares them skips the step on all of them.
        backend: ``"auto"`` (default: the compiled op where it has a kernel, else torch ops),
            ``"compiled"`` or ``"torch"``.

    ``grads`` may be ``DTensor`` s (FSDP2's sharded gradients): then every rank holding pieces
    of them must call this with the same list, and the norms are those of the whole tensors,
    summed over ranks in one all-reduce (``gradstab.distributed``; always torch ops).

    Returns:
        float64 tensor ``[len(grads)]`` of the norms before scaling, on the state's device: the
        norms the state update saw (float64 sums of squares: a gradient of finite elements has a
        finite norm even past float32's 3.4e38, and it is stabilized like any other).
    """
    return _stabilize(
        grads,
        state,
        gamma1,
        gamma2,
        eps,
        bias_correction,
        granularity,
        nonfinite,
        spike_guard,
        found_inf,
        backend,
    )[0]


def _stabilize(
    grads: Sequence[Tensor],
    state: StabilizerState,
    gamma1: float,
    gamma2: float,
    eps: float,
    bias_correction: bool,
    granularity: str,
    nonfinite: str,
    spike_guard: float | None,
    found_inf: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    """``stabilize_``, also returning the found_inf the step obeyed: for sharded gradients, the
    flag agreed on by every rank that holds them (one rank's flag skips the step on all)."""
    validate_config(gamma1, gamma2, eps, bias_correction, granularity, nonfinite, spike_guard)
    if backend not in BACKENDS:
        raise ValueError(f"gradstab: backend must be one of {BACKENDS}, got {backend!r}")
    grads = list(grads)
    args = (
        grads,
        state.m,
        state.v,
        state.k,
        found_inf,
        float(gamma1),
        float(gamma2),
        float(eps),
        bias_correction,
        granularity == "global",
        NONFINITE_POLICIES[nonfinite],
        None if spike_guard is None else float(spike_guard),
    )
    if not torch.compiler.is_compiling() and distributed.has_dtensor(grads):
        # Sharded gradients need their norms summed over ranks before the state update, which
        # the compiled op (it takes its own norms) cannot do: see gradstab/distributed.py.
        if backend == "compiled":
            raise RuntimeError(
                "gradstab: backend='compiled' cannot take DTensor gradients (FSDP2); "
                "use backend='auto' or 'torch'"
            )
        return distributed.stabilize_(*args)
    if not _use_compiled(grads, state.m.device, backend):
        return _torch_backend.stabilize_(*args), found_inf
    if torch.compiler.is_compiling():
        return torch.ops.gradstab.stabilize_.default(*args), found_inf
    try:
        # The overload itself, not the packet: resolving the packet costs 15 us per call.
        return torch.ops.gradstab.stabilize_.default(*args), found_inf
    except RuntimeError as err:
        if _torch_backend.NONFINITE_MESSAGE in str(err):
            raise FloatingPointError(str(err).splitlines()[0]) from None
        raise
