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


Groups = dict[tuple[torch.device, torch.dtype, torch.layout], list[int]]


def group_grads(grads: list[Tensor]) -> Groups:
    """Indices of ``grads`` by (device, dtype, layout), in order of first appearance."""
    groups: Groups = {}
    for i, g in enumerate(grads):
        key = (g.device, g.dtype, g.layout)
        members = groups.get(key)
        if members is None:
            groups[key] = [i]
        else:
            members.append(i)
    return groups


def check_tensors(
    grads: list[Tensor],
    m: Tensor,
    v: Tensor,
    k: Tensor,
    found_inf: Tensor | None,
    global_norm: bool,
    groups: Groups | None = None,
) -> None:
    """The checks of csrc/stabilize_args.cpp, for the torch backend.

    ``groups``: ``group_grads(grads)``, if the caller has it.
    """
    groups = group_grads(grads) if groups is None else groups
    bad = [
        idx[0]
        for (_, dtype, layout), idx in groups.items()
        if layout != torch.strided or dtype not in SUPPORTED_DTYPES
    ]
    if bad:
        i = min(bad)
        g = grads[i]
        if g.layout != torch.strided:
            raise RuntimeError(
                f"gradstab::stabilize_: grads[{i}] has layout {g.layout}; only dense (strided) "
                "gradients are supported"
            )
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


# NOTE: [half-precision norms on the CPU]
# A float32 norm of a float16/bfloat16 tensor (so that it cannot overflow at 65504 or lose digits
# to a 16-bit result) makes torch convert the whole tensor to a float32 temporary first. On the CPU
# that temporary is fresh memory, page faults included: 8x the time of the norm itself (and still
# up to 3x with 1 MiB pieces, whenever malloc hands their pages back in between). So the 16-bit
# gradients are converted piece by piece into one float32 buffer, reused batch after batch, and
# the pieces' squares are added in a fixed order. Measured on llama-bf16 (docs/benchmarks.md).
HALF_NORM_PIECE = 1 << 20  # elements
HALF_NORM_BUFFER = 1 << 22  # elements (16 MiB)


def _half_norms_cpu(grads: list[Tensor]) -> Tensor:
    """float32-accumulated norms of float16/bfloat16 CPU tensors, as float64 ``[len(grads)]``."""
    pieces: list[Tensor] = []
    owners: list[int] = []
    for i, g in enumerate(grads):
        # (A large strided view is first copied, in 16 bits, to be cut.)
        parts = g.reshape(-1).split(HALF_NORM_PIECE) if g.numel() > HALF_NORM_PIECE else (g,)
        pieces.extend(parts)
        owners.extend([i] * len(parts))
    buffer = torch.empty(min(HALF_NORM_BUFFER, sum(p.numel() for p in pieces)), dtype=torch.float32)
    norms: list[Tensor] = []
    batch: list[Tensor] = []
    views: list[Tensor] = []
    used = 0
    for piece in [*pieces, None]:
        if batch and (piece is None or used + piece.numel() > buffer.numel()):
            torch._foreach_copy_(views, batch)
            norms.extend(torch._foreach_norm(views))
            batch, views, used = [], [], 0
        if piece is not None:
            views.append(buffer[used : used + piece.numel()].view(piece.shape))
            batch.append(piece)
            used += piece.numel()
    piece_norms = torch.stack(norms).double()
    if len(pieces) == len(grads):
        return piece_norms
    sumsq = torch.zeros(len(grads), dtype=torch.float64)
    return sumsq.index_add_(0, torch.tensor(owners), piece_norms.square()).sqrt()


def _members(grads: list[Tensor], groups: Groups, idx: list[int]) -> list[Tensor]:
    return grads if len(groups) == 1 else [grads[i] for i in idx]


# NOTE: [norms beyond float32]
# The contract's norm is that of the gradient's exact values with a float64 sum of squares, as the
# compiled kernels take it: finite whenever every element is finite (unless the squares of a
# float64 gradient add up past 1.8e308). torch reduces a float32 gradient (and a float16/bfloat16
# one given a float32 accumulator) in float32, whose squares overflow past 1.8e19 and flush to
# zero below 1e-23: a finite gradient would read Inf (and be zeroed), a tiny one 0 (and be left
# out of the statistics). On an accelerator, _foreach_norm(dtype=float64) accumulates in float64
# as it reads the gradient: one pass, no copy. On the CPU that call converts each tensor to a
# float64 copy first (16x the time of the float32 norm), so the float32 norms come first and only
# the tensors whose float32 norm is not finite, or so small that subnormal squares may have
# distorted it (TINY_NORM), are reduced again in float64; reading the norms there costs no sync.
# An all-zero gradient (a layer that took no part) is exact in float32: one max-abs pass tells it
# from a tiny one.
TINY_NORM = 2.0**-40  # above it, flushed squares cost < 2^-30 relative for up to 2^40 elements


def _redo_in_float64(members: list[Tensor], norms32: Tensor) -> Tensor:
    """float64 ``[len(members)]`` norms of CPU tensors from their float32-accumulated norms
    ``norms32`` (float64 holding float32 values): see NOTE: [norms beyond float32]."""
    suspect = torch.isinf(norms32) | (norms32 <= TINY_NORM)
    if not bool(suspect.any()):
        return norms32
    redo = [i for i in suspect.nonzero().flatten().tolist() if members[i].numel() > 0]
    zeros = [i for i in redo if norms32[i] == 0]
    if zeros:
        peaks = torch._foreach_norm([members[i] for i in zeros], float("inf"))
        all_zero = {i for i, peak in zip(zeros, peaks) if peak == 0}
        redo = [i for i in redo if i not in all_zero]
    if not redo:
        return norms32
    exact = torch._foreach_norm([members[i] for i in redo], 2, dtype=torch.float64)
    norms = norms32.clone()
    norms[torch.tensor(redo)] = torch.stack(exact)
    return norms


def grad_norms(grads: list[Tensor], device: torch.device, groups: Groups | None = None) -> Tensor:
    """Per-tensor L2 norms as a float64 ``[T]`` tensor on ``device``: the norms of a float64 sum
    of squares, whatever the gradients' dtype (see NOTE: [norms beyond float32]).

    ``groups``: ``group_grads(grads)``, if the caller has it.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device)
    groups = group_grads(grads) if groups is None else groups
    parts = []
    for (dev, dtype, _), idx in groups.items():
        members = _members(grads, groups, idx)
        if dev.type != "cpu" or dtype == torch.float64:
            norms = torch.stack(torch._foreach_norm(members, 2, dtype=torch.float64))
        elif dtype in (torch.float16, torch.bfloat16):
            norms = _redo_in_float64(members, _half_norms_cpu(members))
        else:
            norms = _redo_in_float64(members, torch.stack(torch._foreach_norm(members)).double())
        parts.append(norms.to(device=device))
    if len(groups) == 1:
        return parts[0]
    out = torch.empty(len(grads), dtype=torch.float64, device=device)
    for idx, norms in zip(groups.values(), parts):
        out[torch.tensor(idx, device=device)] = norms
    return out


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


def _per_group(values: Tensor, groups: Groups, idx: list[int], dev: torch.device, dtype) -> Tensor:
    """The entries ``idx`` of the ``[T]`` tensor ``values``, on ``dev`` as ``dtype``."""
    if len(groups) > 1:
        values = values[torch.tensor(idx, device=values.device)]
    return values.to(device=dev, dtype=dtype)


def _scale_(grads: list[Tensor], factor: Tensor, groups: Groups) -> None:
    """``grads[i] *= factor[i]``; the factor is rounded to float32 unless the grad is float64."""
    for (dev, dtype, _), idx in groups.items():
        f_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        torch._foreach_mul_(
            _members(grads, groups, idx), _per_group(factor, groups, idx, dev, f_dtype).unbind()
        )


def _zero_where(grads: list[Tensor], zero: Tensor, groups: Groups) -> None:
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
    keep = (~zero).long()
    for (dev, _, _), idx in groups.items():
        views = [g.view(int_dtype[g.element_size()]) for g in _members(grads, groups, idx)]
        torch._foreach_mul_(views, _per_group(keep, groups, idx, dev, torch.int64).unbind())


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
    groups = group_grads(grads)
    check_tensors(grads, m, v, k, found_inf, global_norm, groups)
    norms = grad_norms(grads, m.device, groups)
    skip_step: Tensor | bool = False
    if found_inf is not None:
        skip_step = found_inf.to(m.device).reshape(()) > 0
    finish_step(
        grads, groups, norms, skip_step, m, v, k,
        gamma1, gamma2, eps, bias_correction, global_norm, nonfinite, spike_guard,
    )  # fmt: skip
    return norms


def finish_step(
    grads: list[Tensor],
    groups: Groups,
    norms: Tensor,
    skip_step: Tensor | bool,
    m: Tensor,
    v: Tensor,
    k: Tensor,
    gamma1: float,
    gamma2: float,
    eps: float,
    bias_correction: bool,
    global_norm: bool,
    nonfinite: int,
    spike_guard: float | None,
) -> None:
    """Everything after the norms: the raise check, the state update and the rescale.

    ``norms``: the float64 ``[T]`` norms of ``grads`` (for sharded gradients, of the whole
    tensors); ``groups``: ``group_grads(grads)``.
    """
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
    _scale_(grads, factor, groups)
    if nonfinite == NONFINITE_ZERO:
        _zero_where(grads, zero, groups)
