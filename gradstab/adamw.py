"""``StabilizedAdamW``: GradientStabilizer fused into the AdamW step.

One ``step()`` is, up to float32 rounding, ``StabilizedOptimizer(torch.optim.AdamW(...)).step()``:
the same weights, Adam moments and stabilizer state. The compiled op
``gradstab::stabilized_adamw_`` reads every gradient once for its norm, updates the stabilizer's
statistics (m, v, k), and then runs AdamW with each gradient multiplied by its factor as it is
read: AdamW's own memory traffic plus one read of the gradients. ``p.grad`` is not written.

Where the op has no kernel (another device type; the global norm over several devices, or over
param groups that differ in amsgrad or maximize), the same step runs in torch ops on temporary
copies of the gradients (see ``_torch_step``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from gradstab import _ops, _torch_backend, distributed
from gradstab import functional as F
from gradstab.optim import STABILIZER_KEY
from gradstab.stabilizer import (
    GradientStabilizer,
    StabilizerStats,
    _check_grad,
    _Entry,
    _Params,
    _StatsPart,
    records_explicit_arguments,
)

__all__ = ["StabilizedAdamW"]

# Settings of the stabilizer: optimizer-wide (the global norm spans every group), so a param
# group may not set them.
_STABILIZER_ARGS = (
    "gamma1",
    "gamma2",
    "stab_eps",
    "bias_correction",
    "granularity",
    "nonfinite",
    "spike_guard",
)
_FUSED_DEVICES = ("cpu", "cuda")
# GradientStabilizer's name of a setting that StabilizedAdamW names differently.
_SETTING_OF = {"stab_eps": "eps"}


@dataclass
class _Bucket:
    """The parameters with gradients that one op call takes: same device, amsgrad, maximize.

    Their order is param-group order; ``group_sizes[j]`` consecutive tensors belong to group
    ``groups[j]``.
    """

    device: torch.device
    amsgrad: bool
    maximize: bool
    entries: list[_Entry] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)

    def add(self, entry: _Entry, group: int, state: dict[str, Any]) -> None:
        self.entries.append(entry)
        if self.groups and self.groups[-1] == group:
            self.group_sizes[-1] += 1
        else:
            self.groups.append(group)
            self.group_sizes.append(1)
        self.params.append(entry.param)
        self.grads.append(entry.param.grad)
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        if self.amsgrad:
            self.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        self.steps.append(state["step"])

    def slices(self) -> Iterable[tuple[int, slice]]:
        """(param group index, the slice of this bucket's lists it owns)."""
        start = 0
        for group, size in zip(self.groups, self.group_sizes):
            yield group, slice(start, start + size)
            start += size


def _check_number(value: Any, name: str, low: float, high: float | None = None) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"gradstab.StabilizedAdamW: {name} must be a number, got {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"gradstab.StabilizedAdamW: {name} must be a float, got {type(value).__name__}"
        )
    if not (math.isfinite(value) and value >= low and (high is None or value < high)):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"gradstab.StabilizedAdamW: {name} must be {bounds}, got {value!r}")


def _check_group(group: dict[str, Any], where: str) -> None:
    """Raises ValueError or TypeError naming the first bad AdamW hyperparameter of ``group``."""
    _check_number(group["lr"], f"{where}lr", 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"gradstab.StabilizedAdamW: {where}betas must be a pair, got {betas!r}")
    _check_number(betas[0], f"{where}betas[0]", 0.0, 1.0)
    _check_number(betas[1], f"{where}betas[1]", 0.0, 1.0)
    _check_number(group["eps"], f"{where}eps", 0.0)
    _check_number(group["weight_decay"], f"{where}weight_decay", 0.0)
    for name in ("amsgrad", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(
                f"gradstab.StabilizedAdamW: {where}{name} must be a bool, got "
                f"{type(group[name]).__name__}"
            )
    shared = [name for name in _STABILIZER_ARGS if name in group]
    if shared:
        raise ValueError(
            f"gradstab.StabilizedAdamW: {where}sets {shared}, which apply to the whole optimizer "
            "(the global norm spans every group); pass them to StabilizedAdamW(...)"
        )


def _check_stab_eps(value: Any) -> None:
    F.validate_eps(value, "gradstab.StabilizedAdamW: stab_eps")


class _StabilizerSetting:
    """A setting of ``StabilizedAdamW``'s ``GradientStabilizer``, read and assigned through it
    (``stab_eps`` is its ``eps``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj._stabilizer, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if self.name == "eps":
            _check_stab_eps(value)
        setattr(obj._stabilizer, self.name, value)


class StabilizedAdamW(torch.optim.Optimizer):
    """AdamW whose gradients are stabilized by GradientStabilizer as the step reads them.

    Each gradient g of norm n is taken at the norm ``m_hat / (sqrt(v_hat) + stab_eps)`` (its
    direction kept; m, v: running moments of the norms with decays gamma1, gamma2; k: valid
    updates) and AdamW steps with it, all in one pass over the parameters (docs/adamw.md). The
    result equals ``StabilizedOptimizer(torch.optim.AdamW(params, lr, betas, eps, weight_decay,
    amsgrad, maximize=maximize), gamma1=..., ...)`` up to float32 rounding, with one
    difference: ``p.grad`` is left as the user computed it (the factor is applied as the step
    reads it).

    Args:
        params: parameters or param-group dicts (each group may set its own ``lr``, ``betas``,
            ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``).
        lr: learning rate. Default 1e-3.
        betas: AdamW's (beta1, beta2), the decays of its moments. Default (0.9, 0.999).
        eps: added to AdamW's denominator. Default 1e-8.
        weight_decay: decoupled weight decay: p <- p * (1 - lr * weight_decay). Default 1e-2.
        amsgrad: use the maximum of past second moments. Default False.
        maximize: ascend instead of descend. Default False.
        gamma1: decay of the stabilizer's first moment m of the norm. Default 0.6.
        gamma2: decay of its second moment v. Default 0.999.
        stab_eps: the stabilizer's eps: added to sqrt(v_hat), and the floor of n. Default 1e-12.
        bias_correction: divide m and v by (1 - gamma^k). Default True.
        granularity: ``"param"`` (default): one norm and one (m, v, k) per parameter;
            ``"global"``: one norm over every gradient, like ``clip_grad_norm_``.
        nonfinite: a gradient whose norm is NaN or Inf: ``"zero"`` (default) AdamW steps with a
            zero gradient (its moments decay, weight decay applies: what the composition does);
            ``"skip"`` AdamW steps with it as it is (NaN reaches the weights); ``"raise"``
            raises ``FloatingPointError`` naming the parameters before anything changes (reads
            the norms on the host).
        spike_guard: ``None`` (default) or G > 0: once k > 0 the statistics are fed
            ``min(n, G * sqrt(v_hat_prev))``.

    With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` hands the step its ``grad_scale``
    and ``found_inf`` (``_step_supports_amp_scaling``): gradients are divided by the scale as
    they are read, and a step with ``found_inf > 0`` changes nothing (no step count, moments,
    weights or statistics), with no host-device synchronization.

    Attributes:
        last_stats: the ``StabilizerStats`` of the last step, or None.
    """

    _step_supports_amp_scaling = True

    @records_explicit_arguments
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        gamma1: float = 0.6,
        gamma2: float = 0.999,
        stab_eps: float = 1e-12,
        bias_correction: bool = True,
        granularity: str = "param",
        nonfinite: str = "zero",
        spike_guard: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        _check_group(defaults, "")
        _check_stab_eps(stab_eps)
        self._stabilizer = GradientStabilizer(
            gamma1=gamma1,
            gamma2=gamma2,
            eps=stab_eps,
            bias_correction=bias_correction,
            granularity=granularity,
            nonfinite=nonfinite,
            spike_guard=spike_guard,
        )
        # The stabilizer settings the user chose win over a loaded checkpoint's (as for
        # GradientStabilizer); the others take the checkpoint's.
        self._stabilizer._explicit = {
            _SETTING_OF.get(name, name)
            for name in self._explicit_arguments
            if name in _STABILIZER_ARGS
        }
        # "auto": the compiled op where it has a kernel; "torch": always the torch ops (tests).
        self._backend = "auto"
        self.last_stats: StabilizerStats | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # configuration

    # The stabilizer's settings: assignable (validated), e.g. ``opt.spike_guard = 10.0``; an
    # assigned value is kept over a checkpoint's by load_state_dict, as one passed to __init__.
    gamma1 = _StabilizerSetting("gamma1")
    gamma2 = _StabilizerSetting("gamma2")
    stab_eps = _StabilizerSetting("eps")
    bias_correction = _StabilizerSetting("bias_correction")
    granularity = _StabilizerSetting("granularity")
    nonfinite = _StabilizerSetting("nonfinite")
    spike_guard = _StabilizerSetting("spike_guard")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group (its parameters take the next positions of the stabilizer's state)."""
        if not isinstance(param_group, dict):
            raise TypeError(
                f"gradstab.StabilizedAdamW: a param group must be a dict, got "
                f"{type(param_group).__name__}"
            )
        _check_group({**self.defaults, **param_group}, f"param_groups[{len(self.param_groups)}] ")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------
    # the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluates ``closure`` (if any, with grad enabled) and takes one StabilizedAdamW step.

        Returns the closure's result. ``grad_scale`` and ``found_inf`` set on the optimizer by
        ``torch.amp.GradScaler.step`` are honoured (see the class docstring).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        stab = self._stabilizer
        entries, group_of, everything = self._entries_with_grad()
        stab._check_pending(everything.keys, _Params.of_entries(entries))
        stab._bind(everything)
        if not entries:
            self.last_stats = None
            return loss
        buckets = self._buckets(entries, group_of)
        if stab.nonfinite == "raise" and len(buckets) > 1 and stab.granularity == "param":
            grads = [e.param.grad for e in entries]
            stab._precheck_finite(grads, _Params.of_entries(entries), found_inf)
        if stab.granularity == "global":
            parts = [self._step_global(buckets, found_inf, grad_scale)]
        else:
            self._lay_out_state(buckets)
            parts = [self._step_param(b, found_inf, grad_scale) for b in buckets]
        self.last_stats = StabilizerStats(parts, stab.config(), entries[0].param.device)
        return loss

    def _entries_with_grad(self) -> tuple[list[_Entry], list[int], _Params]:
        """The parameters with a gradient (keyed by position), their groups, and all the
        parameters."""
        entries: list[_Entry] = []
        group_of: list[int] = []
        tensors: list[Tensor] = []
        places: list[tuple[int, int]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    entry = _Entry(len(tensors), f"param_groups[{gi}]['params'][{pi}]", p)
                    _check_param(entry)
                    entries.append(entry)
                    group_of.append(gi)
                tensors.append(p)
                places.append((gi, pi))

        def label(i: int) -> str:
            return "param_groups[{}]['params'][{}]".format(*places[i])

        return entries, group_of, _Params(list(range(len(tensors))), tensors, label)

    def _buckets(self, entries: list[_Entry], group_of: list[int]) -> list[_Bucket]:
        """Groups the parameters by (device, amsgrad, maximize), creating AdamW state lazily."""
        buckets: dict[tuple[torch.device, bool, bool], _Bucket] = {}
        for entry, gi in zip(entries, group_of):
            p = entry.param
            group = self.param_groups[gi]
            amsgrad, maximize = group["amsgrad"], group["maximize"]
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            key = (p.device, amsgrad, maximize)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(p.device, amsgrad, maximize)
            bucket.add(entry, gi, state)
        return list(buckets.values())

    def _lay_out_state(self, buckets: list[_Bucket]) -> None:
        """With several buckets on a device (amsgrad or maximize differ between groups), puts
        the state of all their parameters in position order first, as one call would: the
        stabilizer's state dict then lists the parameters in the order of the composition's."""
        by_device: dict[torch.device, list[_Entry]] = {}
        for b in buckets:
            by_device.setdefault(b.device, []).extend(b.entries)
        for device, entries in by_device.items():
            if len(entries) > len(next(b for b in buckets if b.device == device).entries):
                entries.sort(key=lambda e: e.key)
                keys = [e.key for e in entries]
                self._stabilizer._with_param_state(device, keys, lambda state: None)

    def _use_kernel(self, device: torch.device) -> bool:
        return self._backend == "auto" and _ops.has_kernel(device.type, "stabilized_adamw_")

    def _step_param(
        self, bucket: _Bucket, found_inf: Tensor | None, grad_scale: Tensor | None
    ) -> _StatsPart:
        device = bucket.device
        found_inf, grad_scale = _on(found_inf, device), _on(grad_scale, device)
        use_kernel = self._use_kernel(device)

        def run(state: F.StabilizerState) -> tuple[Tensor, Tensor]:
            k_before = state.k.clone()
            if use_kernel:
                norms = self._op(bucket, state, found_inf, grad_scale, False)
            else:
                norms = self._torch_step([bucket], state, found_inf, grad_scale, False)
            return norms, k_before

        keys = [e.key for e in bucket.entries]
        (norms, k_before), state = self._stabilizer._with_param_state(device, keys, run)
        return _stats_part(norms, state, k_before, found_inf, False)

    def _step_global(
        self, buckets: list[_Bucket], found_inf: Tensor | None, grad_scale: Tensor | None
    ) -> _StatsPart:
        device = buckets[0].device
        state = self._stabilizer._global_state(device)
        found_inf, grad_scale = _on(found_inf, device), _on(grad_scale, device)
        k_before = state.k.clone()
        if len(buckets) == 1 and self._use_kernel(device):
            norms = self._op(buckets[0], state, found_inf, grad_scale, True)
        else:
            norms = self._torch_step(buckets, state, found_inf, grad_scale, True)
        return _stats_part(norms, state, k_before, found_inf, True)

    def _op(
        self,
        b: _Bucket,
        state: F.StabilizerState,
        found_inf: Tensor | None,
        grad_scale: Tensor | None,
        global_norm: bool,
    ) -> Tensor:
        """One call of the compiled op on a bucket."""
        groups = [self.param_groups[gi] for gi in b.groups]
        stab = self._stabilizer
        try:
            return torch.ops.gradstab.stabilized_adamw_(
                b.params,
                b.grads,
                b.exp_avgs,
                b.exp_avg_sqs,
                b.max_exp_avg_sqs,
                b.steps,
                state.m,
                state.v,
                state.k,
                grad_scale,
                found_inf,
                b.group_sizes,
                [float(g["lr"]) for g in groups],
                [float(g["betas"][0]) for g in groups],
                [float(g["betas"][1]) for g in groups],
                [float(g["weight_decay"]) for g in groups],
                [float(g["eps"]) for g in groups],
                b.amsgrad,
                b.maximize,
                stab.gamma1,
                stab.gamma2,
                stab.eps,
                stab.bias_correction,
                global_norm,
                F.NONFINITE_POLICIES[stab.nonfinite],
                stab.spike_guard,
            )
        except RuntimeError as err:
            if _torch_backend.NONFINITE_MESSAGE not in str(err):
                raise
            bad = [int(i) for i in re.findall(r"grads\[(\d+)\]", str(err).splitlines()[0])]
            raise _torch_backend.nonfinite_error(bad, [e.label for e in b.entries]) from None

    def _torch_step(
        self,
        buckets: list[_Bucket],
        state: F.StabilizerState,
        found_inf: Tensor | None,
        grad_scale: Tensor | None,
        global_norm: bool,
    ) -> Tensor:
        """The step in torch ops, for devices without a kernel and the global norm over several
        devices: the composition StabilizedOptimizer(AdamW) on temporary copies of the
        gradients (unscaled by ``grad_scale`` as GradScaler.unscale_ would, then stabilized),
        which AdamW (torch's fused kernel where the device has one) then consumes."""
        stab = self._stabilizer
        copies: list[Tensor] = []
        for b in buckets:
            if grad_scale is None:
                copies += torch._foreach_mul(b.grads, 1.0)
            else:
                inv_scale = grad_scale.double().reciprocal().float().to(b.device)
                copies += torch._foreach_mul(b.grads, inv_scale)
        try:
            norms = _torch_backend.stabilize_(
                copies,
                state.m,
                state.v,
                state.k,
                found_inf,
                stab.gamma1,
                stab.gamma2,
                stab.eps,
                stab.bias_correction,
                global_norm,
                F.NONFINITE_POLICIES[stab.nonfinite],
                stab.spike_guard,
            )
        except FloatingPointError as err:
            bad = [int(i) for i in re.findall(r"grads\[(\d+)\]", str(err))]
            labels = [e.label for b in buckets for e in b.entries]
            raise _torch_backend.nonfinite_error(bad, labels) from None
        start = 0
        for b in buckets:
            b_copies = copies[start : start + len(b.grads)]
            start += len(b.grads)
            b_found_inf = _on(found_inf, b.device)
            # torch's CPU AdamW(fused=True) mis-updates non-contiguous parameters (torch 2.13).
            fused = b.device.type in _FUSED_DEVICES and all(p.is_contiguous() for p in b.params)
            if not fused and b_found_inf is not None and bool(b_found_inf > 0):
                continue  # no fused kernel to skip on the device: read the flag
            for gi, part in b.slices():
                group = self.param_groups[gi]
                torch_adam(
                    b.params[part],
                    b_copies[part],
                    b.exp_avgs[part],
                    b.exp_avg_sqs[part],
                    b.max_exp_avg_sqs[part] if b.amsgrad else [],
                    b.steps[part],
                    foreach=False,
                    fused=fused,
                    found_inf=b_found_inf if fused else None,
                    decoupled_weight_decay=True,
                    amsgrad=b.amsgrad,
                    beta1=group["betas"][0],
                    beta2=group["betas"][1],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=b.maximize,
                )
        return norms

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The AdamW state (``"state"``, ``"param_groups"``, as torch.optim.AdamW keeps them)
        plus the stabilizer's under ``"gradstab"``: the layout of
        ``StabilizedOptimizer(torch.optim.AdamW(...)).state_dict()``, so a checkpoint of either
        loads into the other, and into a plain AdamW (which ignores ``"gradstab"``)."""
        state_dict = super().state_dict()
        state_dict[STABILIZER_KEY] = self._stabilizer.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict saved by ``state_dict()`` (or by ``StabilizedOptimizer(AdamW)``), or a
        plain ``torch.optim.AdamW`` state dict (the stabilizer then starts fresh).

        Step counts become float32 tensors on their parameter's device. The stabilizer part is
        checked before anything is replaced.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"gradstab: state_dict must be a dict, got {type(state_dict).__name__}")
        stabilizer_state = state_dict.get(STABILIZER_KEY)
        if stabilizer_state is not None:
            GradientStabilizer().load_state_dict(stabilizer_state)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            step = state.get("step")
            if isinstance(step, Tensor) and isinstance(p, Tensor):
                state["step"] = step.to(device=p.device, dtype=torch.float32)
            elif step is not None and isinstance(p, Tensor):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        if stabilizer_state is None:
            self._stabilizer.reset()
        else:
            self._stabilizer.load_state_dict(stabilizer_state)

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "_stabilizer": self._stabilizer,
            "_backend": self._backend,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_stats", None)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def __repr__(self) -> str:
        inner = super().__repr__()
        config = ", ".join(f"{name}={getattr(self, name)!r}" for name in _STABILIZER_ARGS)
        return f"{inner[:-1]}Stabilizer: {config}\n)"


def _stats_part(
    norms: Tensor,
    state: F.StabilizerState,
    k_before: Tensor,
    found_inf: Tensor | None,
    global_norm: bool,
) -> _StatsPart:
    """The figures of a step, computed when read (StabilizerStats), from a copy of the
    statistics it left (the next step changes them in place) and k before it."""
    m, v, k = state.m.clone(), state.v.clone(), state.k.clone()
    return _StatsPart(norms, m, v, k, k_before, found_inf, global_norm)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def _check_param(entry: _Entry) -> None:
    """Layout and dtype of the gradient (torch itself keeps a gradient's dtype and shape those of
    its parameter; the op checks them again)."""
    _check_grad(entry)
    if distributed.is_dtensor(entry.param):
        raise TypeError(
            f"gradstab.StabilizedAdamW: parameter {entry.label} is a DTensor (FSDP2); use "
            "gradstab.StabilizedOptimizer(torch.optim.AdamW(...)), which takes sharded norms"
        )
