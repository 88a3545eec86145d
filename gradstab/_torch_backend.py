"""GradientStabilizer in plain ``torch._foreach_*`` ops: the fallback without ``gradstab._C``.

It implements the same contract as the compiled op ``gradstab::stabilize_`` (DESIGN.md section 1)
with the same signature, for gradients on any device, without host-device synchronization except
under ``nonfinite="raise"`` (which must look at the norms to decide whether to raise). The state
update is vectorized over all tensors: a handful of small kernels on the ``[T]``-shaped state,
whatever the number of gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

NONFINITE_ZERO, NONFINITE_SKIP, NONFINITE_RAISE = 0, 1, 2
# Norms above this are fed to the statistics clamped so that n^2 stays finite in float64
# (csrc/stabilize_math.h: kMaxStatNorm).
MAX_STAT_NORM = 1e150
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_MESSAGE = "gradstab: non-finite gradient norm with nonfinite='raise'"


def check_tensors(
    grads: list[Tensor],
    m: Tensor,
    v: Tensor,
    k: Tensor,
    found_inf: Tensor | None,
    global_norm: bool,
) -> None:
    """The checks of csrc/stabilize_args.cpp, for the torch backend."""
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise RuntimeError(
                f"gradstab::stabilize_: grads[{i}] has layout {g.layout}; only dense (strided) "
                "gradients are supported"
            )
        if g.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(
                f"gradstab::stabilize_: grads[{i}] has dtype {g.dtype}; supported: float16, "
                "bfloat16, float32, float64"
            )
    size = 1 if global_norm else len(grads)
    for name, t, dtype in (("m", m, torch.float64), ("v", v, torch.float64), ("k", k, torch.int64)):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != size:
            raise RuntimeError(
                f"gradstab::stabilize_: {name} must be a 1-D {dtype} tensor of {size} elements, "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )
    if found_inf is not None and (found_inf.numel() != 1 or not found_inf.is_floating_point()):
        raise RuntimeError(
            "gradstab::stabilize_: found_inf must be a one-element floating tensor, got "
            f"{found_inf.dtype} of shape {tuple(found_inf.shape)}"
        )


def grad_norms(grads: list[Tensor], device: torch.device) -> Tensor:
    """Per-tensor L2 norms as a float64 ``[T]`` tensor on ``device``.

    Half-precision gradients are reduced in float32 so that their norm cannot overflow at 65504.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device)
    norms: list[Tensor | None] = [None] * len(grads)
    groups: dict[tuple[torch.device, bool], list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype in (torch.float16, torch.bfloat16)), []).append(i)
    for (_, half), idx in groups.items():
        dtype = torch.float32 if half else None
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], 2, dtype=dtype)):
            norms[i] = n
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])


def target_norm(
    m: Tensor, v: Tensor, k: Tensor, gamma1: float, gamma2: float, eps: float, bias_correction: bool
) -> Tensor:
    """The norm a valid gradient is given: m_hat / (sqrt(v_hat) + eps), from the updated state."""
    m_hat, v_hat = m, v
    if bias_correction:
        k_pow = k.clamp(min=1).double()
        m_hat = m / (1 - gamma1**k_pow)
        v_hat = v / (1 - gamma2**k_pow)
    return m_hat / (v_hat.sqrt() + eps)


def step_factors(
    norms: Tensor,
    m: Tensor,
    v: Tensor,
    k: Tensor,
    skip_step: Tensor | bool,
    gamma1: float,
    gamma2: float,
    eps: float,
    bias_correction: bool,
    nonfinite: int,
    spike_guard: float | None,
) -> tuple[Tensor, Tensor]:
    """Updates m, v, k in place for the float64 ``norms`` and returns ``(factor, zero)``.

    ``factor`` (float64) multiplies each gradient; ``zero`` (bool) marks gradients that must become
    exactly zero (``factor`` is 1 there, so that a multiply cannot turn them into NaN).
    """
    finite = torch.isfinite(norms)
    valid = finite & (norms > 0) & ~torch.as_tensor(skip_step, device=norms.device)
    stat_norm = norms.clamp(max=MAX_STAT_NORM)
    if spike_guard is not None:
        v_prev = v / (1 - gamma2 ** k.double()) if bias_correction else v
        bound = spike_guard * v_prev.sqrt()
        stat_norm = torch.where(k > 0, torch.minimum(stat_norm, bound), stat_norm)
    k_new = k + valid.long()
    m_new = torch.where(valid, gamma1 * m + (1 - gamma1) * stat_norm, m)
    v_new = torch.where(valid, gamma2 * v + (1 - gamma2) * stat_norm * stat_norm, v)
    target = target_norm(m_new, v_new, k_new, gamma1, gamma2, eps, bias_correction)
    factor = target / norms.clamp(min=eps)
    factor = torch.where(valid, factor, 1.0)
    zero = ~finite & ~torch.as_tensor(skip_step, device=norms.device)
    if nonfinite != NONFINITE_ZERO:
        zero = torch.zeros_like(zero)
    m.copy_(m_new)
    v.copy_(v_new)
    k.copy_(k_new)
    return factor, zero


def nonfinite_error(bad: list[int], labels: list[str] | None = None) -> FloatingPointError:
    """The error of ``nonfinite="raise"``, naming the gradients whose norm is NaN or Inf."""
    names = ", ".join(labels[i] if labels else f"grads[{i}]" for i in bad)
    return FloatingPointError(
        f"{NONFINITE_MESSAGE} ({names or 'the global norm overflowed'}); nothing was changed"
    )


def _zero_where(grads: list[Tensor], zero: Tensor) -> None:
    """Sets ``grads[i]`` to exactly 0 where ``zero[i]``, even when it holds NaN or Inf."""
    if not grads:
        return
    if zero.device.type == "cpu":
        # Reading a CPU tensor costs no synchronization: only the faulty gradients are touched.
        hits = zero.nonzero().flatten().tolist()
        if hits:
            torch._foreach_zero_([grads[i] for i in hits])
        return
    # NOTE: [zeroing without a host sync]
    # Arithmetic cannot clear NaN (NaN * 0 is NaN), and choosing which tensors to clear would
    # need the mask on the host. Multiplying the integer view of each gradient by 0 or 1 clears
    # or keeps its bits exactly, on the device, at the cost of one more pass over the gradients.
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    views = [g.view(int_dtype[g.element_size()]) for g in grads]
    keep = (~zero).long()
    for dev, idx in _by_device(grads).items():
        keep_dev = keep.to(dev).unbind()
        torch._foreach_mul_([views[i] for i in idx], [keep_dev[i] for i in idx])


def _by_device(grads: list[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.device, []).append(i)
    return groups


@torch.no_grad()
def stabilize_(
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
    """The contract of ``gradstab::stabilize_`` in torch ops; same arguments, same result.

    Unlike the compiled op, ``grads`` may span several devices; the state lives on ``m.device``.
    """
    check_tensors(grads, m, v, k, found_inf, global_norm)
    device = m.device
    norms = grad_norms(grads, device)
    skip_step: Tensor | bool = False
    if found_inf is not None:
        skip_step = found_inf.to(device).reshape(()) > 0
    step_norms = norms.square().sum().sqrt().reshape(1) if global_norm else norms

    if nonfinite == NONFINITE_RAISE and not bool(skip_step):
        finite = torch.isfinite(norms)
        if not bool(finite.all()) or not bool(torch.isfinite(step_norms).all()):
            raise nonfinite_error((~finite).nonzero().flatten().tolist())

    factor, zero = step_factors(
        step_norms, m, v, k, skip_step, gamma1, gamma2, eps, bias_correction, nonfinite, spike_guard
    )
    if global_norm:
        factor = factor.expand(len(grads))
        zero = zero.expand(len(grads))
    for dev, idx in _by_device(grads).items():
        factor_dev = factor.to(dev).unbind()
        torch._foreach_mul_([grads[i] for i in idx], [factor_dev[i] for i in idx])
    if nonfinite == NONFINITE_ZERO:
        _zero_where(grads, zero)
    return norms.float()
