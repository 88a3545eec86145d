"""``GradientStabilizer``: the stateful, parameter-keyed front end of ``gradstab.functional``."""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gradstab import _ops, _torch_backend, distributed
from gradstab import functional as F
from gradstab._bindings import Bindings
from gradstab._warn import user_stacklevel
from gradstab.integrations import deepspeed as _deepspeed

Key = str | int
_Result = TypeVar("_Result")
ParamsLike = nn.Module | torch.optim.Optimizer | Iterable[Tensor] | Iterable[dict] | Tensor

STATE_DICT_VERSION = 1
_CONFIG_KEYS = (
    "gamma1",
    "gamma2",
    "eps",
    "bias_correction",
    "granularity",
    "nonfinite",
    "spike_guard",
)

__all__ = ["GradientStabilizer", "StabilizerStats"]


@dataclass
class _Entry:
    key: Key
    label: str  # how error messages name the parameter
    param: Tensor


class _Params:
    """Parameters in order: their state keys, the tensors, and how error messages name them.

    Labels are made only when an error needs one: formatting a label (and building an object)
    per parameter per step cost more than the compiled op itself on 400 small tensors.
    """

    def __init__(self, keys: list[Key], tensors: list[Tensor], label: Callable[[int], str]):
        self.keys = keys
        self.tensors = tensors
        self.label = label
        self._ids: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        """``id`` of each tensor (computed once)."""
        if self._ids is None:
            self._ids = list(map(id, self.tensors))
        return self._ids

    def labels(self) -> list[str]:
        return [self.label(i) for i in range(len(self.keys))]

    @staticmethod
    def of_entries(entries: list[_Entry]) -> _Params:
        return _Params(
            [e.key for e in entries], [e.param for e in entries], lambda i: entries[i].label
        )

    def select(self, idx: list[int]) -> _Params:
        """The parameters at positions ``idx``."""
        return _Params(
            [self.keys[i] for i in idx],
            [self.tensors[i] for i in idx],
            lambda j: self.label(idx[j]),
        )


@dataclass
class _StatsPart:
    """What one op call leaves behind for the statistics of a step."""

    norms: Tensor  # float64 [T], the per-gradient norms the state update saw
    m: Tensor  # the state after the step ([T], or [1] for the global norm)
    v: Tensor
    k: Tensor
    k_before: Tensor  # k before the step: where k grew, the step counted a valid update
    found_inf: Tensor | None
    global_norm: bool


def _l2(values: Tensor) -> Tensor:
    """The L2 norm of a float64 vector, scaled by its largest entry so that it does not overflow
    while it is below float64's maximum (the squares of norms past 1.3e154 would)."""
    if values.numel() == 0:
        return values.new_zeros(())
    peak = values.abs().amax()
    scale = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1.0)
    return (values / scale).square().sum().sqrt() * scale


class StabilizerStats:
    """Figures of one ``GradientStabilizer.apply`` step, computed on first access.

    They describe what the kernels did: which gradients counted a valid update is read from the
    state (k grew), not recomputed, and the norms are those the state update saw.

    Attributes (0-d tensors on the gradients' device; reading them does not synchronize):
        norm_before: L2 norm of all stabilized gradients together, before the step (float64: a
            gradient of finite elements can have a norm past float32's 3.4e38).
        norm_after: the same after the step (float64).
        skipped: number of gradients left unscaled because their norm was not finite (zeroed or
            left alone per ``nonfinite``), or all of them on a step ``found_inf`` skipped (int64).

    ``to_dict()`` returns the three as Python numbers with one synchronization.
    """

    def __init__(self, parts: list[_StatsPart], config: dict[str, Any], device: torch.device):
        self._parts = parts
        self._config = config
        self._device = device
        self._values: tuple[Tensor, Tensor, Tensor] | None = None

    def _materialize(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._values is None:
            self._values = self._compute()
            self._parts = []
        return self._values

    def _compute(self) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self._config
        before: list[Tensor] = []
        after: list[Tensor] = []
        skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        for part in self._parts:
            norms = part.norms.double()
            step_norm = _l2(norms).reshape(1) if part.global_norm else norms
            skip = torch.zeros((), dtype=torch.bool, device=norms.device)
            if part.found_inf is not None:
                skip = part.found_inf.to(norms.device).reshape(()) > 0
            counted = part.k > part.k_before  # the kernel counted a valid update
            # Not counted, not skipped, not zero: the kernel found the norm non-finite.
            faulty = ~counted & ~skip & (step_norm != 0)
            target = _torch_backend.target_norm(
                part.m,
                part.v,
                part.k,
                cfg["gamma1"],
                cfg["gamma2"],
                cfg["eps"],
                cfg["bias_correction"],
            )
            factor = target / step_norm.clamp(min=cfg["eps"])
            zeroed = faulty if cfg["nonfinite"] == "zero" else torch.zeros_like(faulty)
            after_norms = torch.where(
                counted, norms * torch.where(counted, factor, 1.0), torch.where(zeroed, 0.0, norms)
            )
            before.append(norms.to(self._device))
            after.append(after_norms.to(self._device))
            left = (skip | faulty).expand(step_norm.shape)
            skipped += (left.sum() * (len(norms) if part.global_norm else 1)).to(self._device)
        if not before:
            zero = torch.zeros((), dtype=torch.float64, device=self._device)
            return zero, zero.clone(), skipped
        return _l2(torch.cat(before)), _l2(torch.cat(after)), skipped

    @property
    def norm_before(self) -> Tensor:
        return self._materialize()[0]

    @property
    def norm_after(self) -> Tensor:
        return self._materialize()[1]

    @property
    def skipped(self) -> Tensor:
        return self._materialize()[2]

    def to_dict(self) -> dict[str, float | int]:
        before, after, skipped = self._materialize()
        values = torch.stack([before.double(), after.double(), skipped.double()]).tolist()
        return {"norm_before": values[0], "norm_after": values[1], "skipped": int(values[2])}

    def __repr__(self) -> str:
        return f"StabilizerStats({self.to_dict()})"


@dataclass
class _DeviceState:
    """Flat per-parameter state of all parameters whose gradients live on one device."""

    keys: list[Key]
    m: Tensor
    v: Tensor
    k: Tensor

    def __post_init__(self) -> None:
        self.position = {key: i for i, key in enumerate(self.keys)}


def _check_key(key: Any) -> Key:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"gradstab: state_dict keys must be str or int, got {key!r}")
    return key


def records_explicit_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Decorates an ``__init__`` so that ``self._explicit_arguments`` holds, before it runs, the
    names of the arguments the caller passed (by position or keyword): the settings a user chose,
    which win over those of a loaded checkpoint. The signature stays ``init``'s."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        self._explicit_arguments = set(signature.bind(self, *args, **kwargs).arguments) - {"self"}
        init(self, *args, **kwargs)

    return wrapper


def _check_state_values(keys: list[Key], m: Tensor, v: Tensor, k: Tensor) -> None:
    """Refuses, naming the first such key, state that no run of GradientStabilizer can reach:
    k < 0, m or v not finite or negative, or m or v nonzero where k = 0 (no valid update yet)."""
    checks = (
        (k < 0, "a negative update count k"),
        (~torch.isfinite(m) | (m < 0), "a first moment m that is negative or not finite"),
        (~torch.isfinite(v) | (v < 0), "a second moment v that is negative or not finite"),
        ((k == 0) & ((m != 0) | (v != 0)), "m or v nonzero while k = 0"),
    )
    for bad, what in checks:
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"gradstab: state_dict holds {what} for {keys[i]!r} (k={int(k[i])}, "
                f"m={float(m[i])!r}, v={float(v[i])!r}){_count_others(int(bad.sum()) - 1)}; "
                "the checkpoint is damaged or was edited, and nothing was loaded"
            )


def _count_others(n: int) -> str:
    return f" and {n} other key(s)" if n else ""


class _Setting:
    """A configuration field of ``GradientStabilizer``: validated when assigned, and, once
    assigned by the user, kept when a checkpoint is loaded (see ``load_state_dict``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._settings[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        obj._configure({self.name: value})
        obj._explicit.add(self.name)


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """A validated configuration with its numbers as floats."""
    F.validate_config(**config)
    out = dict(config)
    for name in ("gamma1", "gamma2", "eps"):
        out[name] = float(out[name])
    if out["spike_guard"] is not None:
        out["spike_guard"] = float(out["spike_guard"])
    return out


class GradientStabilizer:
    """GradientStabilizer (Huang et al., ICML 2026): fix each gradient's norm, keep its direction.

    Call ``apply`` between ``loss.backward()`` and ``optimizer.step()``. Each gradient ``g`` of
    norm n is rescaled in place to the norm ``m_hat / (sqrt(v_hat) + eps)``, where m and v are
    running averages (decays gamma1, gamma2) of the norms seen so far and k counts the valid
    updates (see ``gradstab.functional``).

    Args:
        gamma1: decay of the first moment m of the norm. Default 0.6.
        gamma2: decay of the second moment v of the norm. Default 0.999.
        eps: added to sqrt(v_hat), and the floor of n in the division; in (0, 1). Default 1e-12.
        bias_correction: divide m and v by (1 - gamma^k). Default True.
        granularity: ``"param"`` (default): one norm and one (m, v, k) per parameter;
            ``"global"``: one norm over all gradients, like ``clip_grad_norm_``.
        nonfinite: a gradient whose norm is NaN or Inf is set to zero (``"zero"``, default), left
            alone (``"skip"``), or raises ``FloatingPointError`` before anything changes
            (``"raise"``, which synchronizes with the device). A gradient of finite elements
            has a finite norm, however large (the norms are float64 sums of squares).
        spike_guard: ``None`` (default, the paper's transform) or G > 0: once k > 0 the statistics
            are fed ``min(n, G * sqrt(v_hat_prev))`` so one huge spike cannot inflate v for the
            next ~1/(1 - gamma2) steps.
        backend: ``"auto"`` (default): the compiled kernels where they exist for the gradients'
            device, else torch ops; ``"compiled"``: require the kernels; ``"torch"``: torch ops.

    The seven settings are attributes that can be assigned (validated), e.g.
    ``stab.spike_guard = 10.0``; ``granularity`` only while no statistics exist. A setting passed
    to the constructor or assigned is kept when ``load_state_dict`` loads a checkpoint saved with
    another value (with one warning naming each such setting); the others take the checkpoint's.
    """

    gamma1 = _Setting()
    gamma2 = _Setting()
    eps = _Setting()
    bias_correction = _Setting()
    granularity = _Setting()
    nonfinite = _Setting()
    spike_guard = _Setting()

    @records_explicit_arguments
    def __init__(
        self,
        gamma1: float = 0.6,
        gamma2: float = 0.999,
        eps: float = 1e-12,
        bias_correction: bool = True,
        granularity: str = "param",
        nonfinite: str = "zero",
        spike_guard: float | None = None,
        backend: str = "auto",
    ) -> None:
        self._settings = _normalized(
            {
                "gamma1": gamma1,
                "gamma2": gamma2,
                "eps": eps,
                "bias_correction": bias_correction,
                "granularity": granularity,
                "nonfinite": nonfinite,
                "spike_guard": spike_guard,
            }
        )
        if backend not in F.BACKENDS:
            raise ValueError(f"gradstab: backend must be one of {F.BACKENDS}, got {backend!r}")
        if backend == "compiled" and not _ops.HAS_EXTENSION:
            raise RuntimeError(f"gradstab: backend='compiled' but {_ops.build_info()}")
        # The settings the user chose (see records_explicit_arguments), kept over a checkpoint's.
        self._explicit: set[str] = getattr(self, "_explicit_arguments", set()) & set(_CONFIG_KEYS)
        self._backend_choice = backend
        self._last_device: torch.device | None = None
        self._last_stats: weakref.ref[StabilizerStats] | None = None
        self.reset()

    # ----------------------------------------------------------------------------------------
    # public API

    @property
    def backend(self) -> str:
        """The backend of the last step ("cuda", "cpu" or "torch"), or the one a step would use."""
        if self._last_device is not None:
            return self._backend_for(self._last_device)
        if self._backend_choice == "torch" or not _ops.HAS_EXTENSION:
            return "torch"
        if torch.cuda.is_available() and _ops.has_kernel("cuda"):
            return "cuda"
        return "cpu"

    def config(self) -> dict[str, Any]:
        """The seven settings, by name."""
        return dict(self._settings)

    def reset(self) -> None:
        """Forgets all statistics, as if no step had been taken (the settings stay)."""
        self._finalize_stats()
        self._groups: dict[torch.device, _DeviceState] = {}
        self._global: F.StabilizerState | None = None
        self._pending: dict[Key, tuple[Tensor, Tensor, Tensor]] = {}
        self._pending_unchecked = False  # a loaded state dict waits for its first apply()
        self._pending_strict = False
        self._bindings = Bindings()

    @torch.no_grad()
    def apply(
        self,
        params: ParamsLike,
        *,
        found_inf: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StabilizerStats:
        """Stabilizes the gradients of ``params`` in place; returns the step's figures (lazy).

        Args:
            params: an ``nn.Module`` (state keyed by parameter name, so checkpoints load into a
                fresh process), a ``torch.optim.Optimizer``, an iterable of parameters or of
                param-group dicts, or one tensor (state keyed by position). Parameters without
                a gradient are left alone and keep their state. A ``deepspeed.DeepSpeedEngine``
                (ZeRO stages 0-3, keyed by name): see ``gradstab.integrations.deepspeed``.
            found_inf: optional one-element tensor; > 0 means this step will be skipped (by a
                loss scaler): nothing changes.
            scaler: a ``torch.amp.GradScaler``; with it, the optimizer's gradients are unscaled
                first if the scaler has not done so yet, and a step the scaler will skip leaves
                gradients and statistics untouched.
            optimizer: the optimizer ``scaler`` unscales; defaults to ``params`` when that is an
                optimizer.
        """
        if isinstance(params, nn.Module) and _deepspeed.is_engine(params):
            if scaler is not None or optimizer is not None:
                raise ValueError(
                    "gradstab: apply(engine) takes no scaler or optimizer: DeepSpeed's own loss "
                    "scaler is read from the engine"
                )
            return _deepspeed.apply(self, params, found_inf=found_inf)
        everything = _resolve(params)
        distributed.refuse_fsdp1((everything.label(i), p) for i, p in enumerate(everything.tensors))
        grads = list(map(_grad, everything.tensors))
        with_grad = everything
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            present = [i for i, g in enumerate(grads) if g is not None]
            with_grad = everything.select(present)
            grads = [grads[i] for i in present]
        sharded = _check_grads(grads, with_grad)
        self._check_pending(everything.keys, with_grad)
        self._bind(everything)
        found_inf = self._combined_found_inf(params, found_inf, scaler, optimizer)
        self._finalize_stats()

        if not grads:
            return StabilizerStats([], self.config(), torch.device("cpu"))
        if self.granularity == "global":
            parts = [self._apply_global(grads, with_grad, found_inf)]
        else:
            by_device = _by_device(grads)
            if self.nonfinite == "raise" and len(by_device) > 1:
                self._precheck_finite(grads, with_grad, found_inf)
            parts = [
                self._apply_param(device, grads, with_grad, found_inf, sharded)
                if idx is None
                else self._apply_param(
                    device, [grads[i] for i in idx], with_grad.select(idx), found_inf, sharded
                )
                for device, idx in by_device
            ]
        device = grads[0].device
        self._last_device = device
        stats = StabilizerStats(parts, self.config(), device)
        self._last_stats = weakref.ref(stats)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The statistics and configuration, as CPU tensors (a snapshot, safe to save)."""
        sd: dict[str, Any] = {"version": STATE_DICT_VERSION, "config": self.config()}
        if self.granularity == "global":
            state = self._global
            if state is None and "<global>" in self._pending:
                state = F.StabilizerState(*self._pending["<global>"])
            sd["keys"] = ["<global>"] if state is not None else []
            tensors = [state] if state is not None else []
            sd.update(_cat_state(tensors))
            return sd
        keys: list[Key] = []
        tensors = []
        for group in self._groups.values():
            keys += group.keys
            tensors.append(F.StabilizerState(group.m, group.v, group.k))
        for key, (m, v, k) in self._pending.items():
            keys.append(key)
            tensors.append(F.StabilizerState(m.reshape(1), v.reshape(1), k.reshape(1)))
        sd["keys"] = keys
        sd.update(_cat_state(tensors))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores statistics and settings saved by ``state_dict``.

        Settings: one the user chose (passed to the constructor or assigned, e.g.
        ``stab.spike_guard = 10.0``) is kept, and where the checkpoint holds another value one
        ``UserWarning`` names each such setting with both values; the other settings take the
        checkpoint's values. A ``granularity`` chosen unlike the checkpoint's keeps the choice
        and starts the statistics fresh (the warning says so): per-parameter and global
        statistics do not convert.

        The checkpoint is checked before anything changes: its layout, and its values (k an
        integer >= 0, m and v finite and >= 0, m = v = 0 where k = 0); a bad value is refused
        naming its key. The state is attached to parameters at the next ``apply``. With
        ``strict`` (default), that ``apply`` raises if the checkpoint holds state for a
        parameter the model does not have, or if a parameter with a gradient has none in it.
        Keys saved through ``DistributedDataParallel`` (``module.``) or ``torch.compile``
        (``_orig_mod.``) match the bare model's names.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"gradstab: state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"version", "config", "keys", "m", "v", "k"} - state_dict.keys()
        if missing:
            raise KeyError(
                f"gradstab: state_dict lacks {sorted(missing)}; was it saved by gradstab?"
            )
        if state_dict["version"] != STATE_DICT_VERSION:
            raise ValueError(
                f"gradstab: state_dict version {state_dict['version']} is not supported "
                f"(this gradstab writes version {STATE_DICT_VERSION})"
            )
        config = state_dict["config"]
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"gradstab: state_dict config has unknown entries {sorted(unknown)}")
        saved = _normalized({**self.config(), **config})
        keys = [_check_key(key) for key in state_dict["keys"]]
        m, v, k = state_dict["m"], state_dict["v"], state_dict["k"]
        expected = (("m", m, torch.float64), ("v", v, torch.float64), ("k", k, torch.int64))
        for name, t, dtype in expected:
            if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != (len(keys),):
                raise ValueError(
                    f"gradstab: state_dict['{name}'] must be a {dtype} tensor of shape "
                    f"({len(keys)},), got {t!r:.80}"
                )
        if len(set(keys)) != len(keys):
            raise ValueError("gradstab: state_dict['keys'] has duplicates")
        if saved["granularity"] == "global" and keys not in ([], ["<global>"]):
            raise ValueError(
                "gradstab: state_dict has granularity 'global' but per-parameter keys; "
                "it is not a gradstab checkpoint or it was edited"
            )
        if saved["granularity"] == "param" and "<global>" in keys:
            raise ValueError("gradstab: state_dict has granularity 'param' but a '<global>' entry")
        m, v, k = m.detach().cpu().clone(), v.detach().cpu().clone(), k.detach().cpu().clone()
        _check_state_values(keys, m, v, k)

        kept = {name: self._settings[name] for name in self._explicit}
        overridden = [name for name in _CONFIG_KEYS if name in kept and kept[name] != saved[name]]
        fresh = "granularity" in overridden
        if overridden:
            warnings.warn(
                "gradstab: the checkpoint was saved with other settings than the ones chosen for "
                "this GradientStabilizer; keeping the chosen ones: "
                + ", ".join(
                    f"{name}={kept[name]!r} (checkpoint: {saved[name]!r})" for name in overridden
                )
                + (
                    "; the checkpoint's statistics are for another granularity and do not "
                    "carry over, so they start fresh"
                    if fresh
                    else ""
                ),
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        self.reset()
        self._settings = {**saved, **kept}
        if fresh:
            return
        self._pending = {key: (m[i], v[i], k[i]) for i, key in enumerate(keys)}
        self._pending_unchecked = True
        self._pending_strict = strict and saved["granularity"] == "param"

    def __getstate__(self) -> dict[str, Any]:
        # The weak reference to the last step's figures cannot be pickled: compute them now.
        # The bindings (weak references to the parameters) belong to this process's tensors.
        self._finalize_stats()
        state = self.__dict__.copy()
        del state["_bindings"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bindings = Bindings()

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in _CONFIG_KEYS)
        return f"GradientStabilizer({args}, backend={self.backend!r})"

    # ----------------------------------------------------------------------------------------
    # internals

    def _backend_for(self, device: torch.device) -> str:
        if self._backend_choice == "torch" or not _ops.has_kernel(device.type):
            return "torch"
        return device.type

    def _step_kwargs(self) -> dict[str, Any]:
        return {
            "gamma1": self.gamma1,
            "gamma2": self.gamma2,
            "eps": self.eps,
            "bias_correction": self.bias_correction,
            "granularity": self.granularity,
            "nonfinite": self.nonfinite,
            "spike_guard": self.spike_guard,
            "backend": self._backend_choice,
        }

    def _finalize_stats(self) -> None:
        """Computes the last step's figures if they are still pending: the state they read is
        about to change."""
        stats = self._last_stats() if self._last_stats is not None else None
        if stats is not None:
            stats._materialize()
        self._last_stats = None

    def _combined_found_inf(
        self,
        params: ParamsLike,
        found_inf: Tensor | None,
        scaler: torch.amp.GradScaler | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> Tensor | None:
        if found_inf is not None and not isinstance(found_inf, Tensor):
            raise TypeError(f"gradstab: found_inf must be a tensor, got {type(found_inf).__name__}")
        if scaler is None or not scaler.is_enabled():
            return found_inf
        if optimizer is None:
            if not isinstance(params, torch.optim.Optimizer):
                raise ValueError(
                    "gradstab: apply(scaler=...) needs optimizer=... (the optimizer the scaler "
                    "unscales) unless params is that optimizer"
                )
            optimizer = params
        scaler_inf = _scaler_found_inf(scaler, optimizer)
        if scaler_inf is None:
            return found_inf
        if found_inf is None:
            return scaler_inf
        return found_inf.reshape(()).float() + scaler_inf.to(found_inf.device).reshape(())

    def _configure(self, changes: dict[str, Any]) -> None:
        """Validates and applies new values of settings (the attribute setters)."""
        settings = _normalized({**self._settings, **changes})
        if settings["granularity"] != self._settings["granularity"] and (
            self._groups or self._global is not None or self._pending
        ):
            raise ValueError(
                f"gradstab: granularity cannot change from {self._settings['granularity']!r} to "
                f"{settings['granularity']!r} while statistics exist (per-parameter and global "
                "statistics do not convert); call reset() first"
            )
        self._settings = settings

    def _has_param_state(self, key: Key) -> bool:
        return key in self._pending or any(key in g.position for g in self._groups.values())

    def _bind(self, params: _Params) -> None:
        """Refuses keys that now name other tensors than their state was built for (see
        gradstab/_bindings.py)."""
        self._bindings.check(
            params.keys, params.tensors, params.ids, params.label, self._has_param_state
        )

    def _check_pending(self, all_keys: Collection[Key], with_grad: _Params) -> None:
        """At the first step after ``load_state_dict``: renames checkpoint keys saved through a
        wrapper to the bare names in ``all_keys`` (the parameters given), and with ``strict``
        checks that every key it holds is among them and that every parameter with a gradient
        has state in it."""
        if not self._pending_unchecked:
            return
        all_keys = set(all_keys)
        self._strip_wrapper_prefixes(all_keys)
        if self._pending_strict:
            unknown = [key for key in self._pending if key not in all_keys]
            if unknown:
                raise RuntimeError(
                    "gradstab: the loaded state_dict has state for "
                    f"{', '.join(repr(k) for k in unknown[:10])}"
                    f"{' ...' if len(unknown) > 10 else ''}, which the parameters passed to "
                    "apply() do not have (was it saved from another model, or keyed by position "
                    "while apply() got a module?); load_state_dict(sd, strict=False) ignores this"
                )
            if self._pending:
                missing = [
                    with_grad.label(i)
                    for i, key in enumerate(with_grad.keys)
                    if key not in self._pending
                ]
                if missing:
                    raise RuntimeError(
                        f"gradstab: parameter(s) {', '.join(missing[:10])} have "
                        "gradients but no state in the loaded state_dict; "
                        "load_state_dict(sd, strict=False) starts them fresh"
                    )
        self._pending_strict = False
        self._pending_unchecked = False

    def _strip_wrapper_prefixes(self, all_keys: set[Key]) -> None:
        """Renames pending keys like ``module.fc.weight`` (saved from a model wrapped in
        DistributedDataParallel) or ``_orig_mod.fc.weight`` to ``fc.weight`` where that is a
        parameter given and the bare name has no state of its own."""
        renames = {}
        for key in self._pending:
            if not isinstance(key, str) or key in all_keys:
                continue
            bare = key
            while bare.startswith(_WRAPPER_PREFIXES):
                bare = bare.split(".", 1)[1]
            if bare != key and bare in all_keys and bare not in self._pending:
                renames[key] = bare
        if len(set(renames.values())) < len(renames):
            return  # two saved names for one parameter: let the strict check name them
        for old, new in renames.items():
            self._pending[new] = self._pending.pop(old)

    def _precheck_finite(
        self, grads: list[Tensor], with_grad: _Params, found_inf: Tensor | None
    ) -> None:
        """For ``nonfinite="raise"`` over several devices: raise before any device changes."""
        if found_inf is not None and bool(found_inf.reshape(()) > 0):
            return
        norms = _torch_backend.grad_norms(grads, grads[0].device)
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            raise _torch_backend.nonfinite_error(bad, with_grad.labels())

    def _run(
        self,
        grads: list[Tensor],
        state: F.StabilizerState,
        found_inf: Tensor | None,
        params: _Params,
        local_on_state_device: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The norms, and the found_inf the step obeyed (under FSDP2: agreed by all ranks).
        ``local_on_state_device``: the caller knows that ``grads`` are plain tensors on the
        state's device, so backend "auto" need not check each one again."""
        if found_inf is not None:
            found_inf = found_inf.to(state.m.device)
        kwargs = self._step_kwargs()
        if kwargs["backend"] == "auto" and local_on_state_device:
            kwargs["backend"] = "compiled" if _ops.has_kernel(state.m.device.type) else "torch"
        try:
            return F._stabilize(grads, state, found_inf=found_inf, **kwargs)
        except FloatingPointError as err:
            bad = [int(i) for i in re.findall(r"grads\[(\d+)\]", str(err))]
            raise _torch_backend.nonfinite_error(bad, params.labels()) from None

    def _apply_global(
        self, grads: list[Tensor], with_grad: _Params, found_inf: Tensor | None
    ) -> _StatsPart:
        device = grads[0].device
        state = self._global_state(device)
        k_before = state.k.clone()
        norms, found_inf = self._run(grads, state, found_inf, with_grad)
        return _StatsPart(norms, state.m, state.v, state.k, k_before, _on(found_inf, device), True)

    def _global_state(self, device: torch.device) -> F.StabilizerState:
        """The one (m, v, k) of granularity "global", on ``device`` (created, loaded or moved)."""
        if self._global is None:
            pending = self._pending.pop("<global>", None)
            if pending is not None:
                self._global = F.StabilizerState(*(t.reshape(1).to(device) for t in pending))
            else:
                self._global = F.init_state([], "global", device=device)
        elif self._global.m.device != device:
            self._global = F.StabilizerState(*(t.to(device) for t in self._global))
        return self._global

    def _apply_param(
        self,
        device: torch.device,
        grads: list[Tensor],
        params: _Params,
        found_inf: Tensor | None,
        sharded: bool,
    ) -> _StatsPart:

        def run(state: F.StabilizerState) -> tuple[tuple[Tensor, Tensor | None], Tensor]:
            k_before = state.k.clone()
            return self._run(grads, state, found_inf, params, not sharded), k_before

        ((norms, step_found_inf), k_before), state = self._with_param_state(
            device, params.keys, run
        )
        return _StatsPart(
            norms, state.m, state.v, state.k, k_before, _on(step_found_inf, device), False
        )

    def _with_param_state(
        self,
        device: torch.device,
        keys: list[Key],
        run: Callable[[F.StabilizerState], _Result],
    ) -> tuple[_Result, F.StabilizerState]:
        """Calls ``run`` on the state of ``keys`` (one entry each, in their order, on
        ``device``), keeps what it writes there, and returns its result and that state."""
        n = len(keys)
        group = self._groups.get(device)
        if group is None or (
            group.keys[:n] != keys and any(key not in group.position for key in keys)
        ):
            group = self._rebuild(device, keys)
        if group.keys[:n] == keys:
            # Steady state: the state of exactly these gradients is a prefix of the flat tensors.
            state = F.StabilizerState(group.m[:n], group.v[:n], group.k[:n])
            return run(state), state
        # Some parameters have no gradient this step: work on a gathered copy of the rest.
        idx = torch.tensor([group.position[key] for key in keys], device=device)
        state = F.StabilizerState(group.m[idx], group.v[idx], group.k[idx])
        result = run(state)
        group.m.index_copy_(0, idx, state.m)
        group.v.index_copy_(0, idx, state.v)
        group.k.index_copy_(0, idx, state.k)
        return result, state

    def _rebuild(self, device: torch.device, keys: list[Key]) -> _DeviceState:
        """Re-lays the state of ``device`` so that ``keys`` come first, in order.

        State for a key is taken from wherever it is (this device, another device the parameter
        used to live on, or a loaded checkpoint); new keys start at zero. This runs when the set
        of parameters with gradients changes, not on the steady-state path.
        """
        wanted = set(keys)
        old = self._groups.get(device)
        order = keys + ([key for key in old.keys if key not in wanted] if old else [])
        sources: dict[Key, tuple[Tensor, Tensor, Tensor]] = {}
        for dev, group in list(self._groups.items()):
            moved = [i for i, key in enumerate(group.keys) if key in wanted or dev == device]
            for i in moved:
                sources[group.keys[i]] = (group.m[i], group.v[i], group.k[i])
            if dev != device and moved:
                keep = [i for i in range(len(group.keys)) if i not in set(moved)]
                if keep:
                    idx = torch.tensor(keep, device=dev)
                    self._groups[dev] = _DeviceState(
                        [group.keys[i] for i in keep],
                        group.m[idx],
                        group.v[idx],
                        group.k[idx],
                    )
                else:
                    del self._groups[dev]
        for key in keys:
            if key not in sources and key in self._pending:
                sources[key] = self._pending.pop(key)

        def column(j: int, dtype: torch.dtype) -> Tensor:
            values = [
                sources[key][j].to(device)
                if key in sources
                else torch.zeros((), dtype=dtype, device=device)
                for key in order
            ]
            return torch.stack(values) if values else torch.zeros(0, dtype=dtype, device=device)

        group = _DeviceState(
            order, column(0, torch.float64), column(1, torch.float64), column(2, torch.int64)
        )
        self._groups[device] = group
        return group


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _cat_state(states: Sequence[F.StabilizerState]) -> dict[str, Tensor]:
    def cat(j: int, dtype: torch.dtype) -> Tensor:
        parts = [s[j].detach().to("cpu", copy=True).reshape(-1) for s in states]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    return {"m": cat(0, torch.float64), "v": cat(1, torch.float64), "k": cat(2, torch.int64)}


def _check_grad(e: _Entry) -> None:
    g = e.param.grad
    if g.layout != torch.strided:
        raise ValueError(
            f"gradstab: parameter {e.label} has a {g.layout} gradient; GradientStabilizer "
            "needs dense gradients (use a dense embedding, or densify the gradient first)"
        )
    if g.dtype not in _torch_backend.SUPPORTED_DTYPES:
        raise TypeError(
            f"gradstab: parameter {e.label} has a {g.dtype} gradient; supported: float16, "
            "bfloat16, float32, float64"
        )
    if distributed.is_dtensor(g):
        distributed.check_placements(g, e.label)
        _check_storage(g.to_local(), e.label)
    else:
        _check_storage(g, e.label)


def _check_storage(g: Tensor, label: str) -> None:
    """Refuses a gradient without data: on the meta device, or whose storage was freed (its
    elements would be read from nowhere: torch's own ops crash on it)."""
    if g.is_meta:
        raise ValueError(
            f"gradstab: parameter {label} has a gradient on the meta device, which holds no "
            "values to stabilize; materialize the model first (model.to_empty(device=...) and "
            "initialize it) and take real gradients; nothing was changed"
        )
    if g.numel() > 0 and g.data_ptr() == 0:
        raise ValueError(
            f"gradstab: parameter {label} has a gradient whose storage holds no data (freed or "
            "never allocated), so it cannot be read; nothing was changed"
        )


_grad = operator.attrgetter("grad")
_layout = operator.attrgetter("layout")
_dtype = operator.attrgetter("dtype")
_data_ptr = Tensor.data_ptr
_SUPPORTED_DTYPES = set(_torch_backend.SUPPORTED_DTYPES)


def _check_grads(grads: list[Tensor], params: _Params) -> bool:
    """``_check_grad`` for every gradient, at C speed where they are all fine (nearly always);
    returns whether any is a ``DTensor``. A gradient without data (meta, freed storage) has the
    data pointer 0, as only an empty tensor may."""
    sharded = distributed.has_dtensor(grads)
    if (
        sharded
        or not set(map(_layout, grads)) <= {torch.strided}
        or not set(map(_dtype, grads)) <= _SUPPORTED_DTYPES
    ):
        for i, p in enumerate(params.tensors):
            _check_grad(_Entry(params.keys[i], params.label(i), p))
        return sharded
    if 0 in map(_data_ptr, grads):  # an empty gradient, or one without data
        for i, g in enumerate(grads):
            if g.data_ptr() == 0:
                _check_storage(g, params.label(i))
    return False


def _by_device(grads: list[Tensor]) -> list[tuple[torch.device, list[int] | None]]:
    """The devices of ``grads``, each with the positions of its gradients (None: all of them);
    without a ``torch.device`` per gradient when they share one (0.2 us each)."""
    if F._all_on(grads, grads[0].device):
        return [(grads[0].device, None)]
    positions: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        positions.setdefault(g.device, []).append(i)
    return list(positions.items())


def _resolve(params: ParamsLike) -> _Params:
    """The parameters of ``params`` with their state keys, refusing a tensor given twice."""
    if isinstance(params, nn.Module):
        named = _named_parameters(_unwrap(params))
        keys: list[Key] = [name for name, _ in named]
        resolved = _Params(keys, [p for _, p in named], lambda i: repr(keys[i]))
    elif isinstance(params, torch.optim.Optimizer):
        resolved = _from_groups(params.param_groups)
    elif isinstance(params, Tensor):
        resolved = _Params([0], [params], lambda i: "params[0]")
    elif isinstance(params, Iterable):
        items = list(params)
        types = set(map(type, items))
        if items and all(issubclass(t, dict) for t in types):
            resolved = _from_groups(items)
        elif all(issubclass(t, Tensor) for t in types):
            resolved = _Params(list(range(len(items))), items, lambda i: f"params[{i}]")
        else:
            raise TypeError(
                "gradstab: apply() takes an nn.Module, an Optimizer, or an iterable of tensors or "
                "of param-group dicts; got an iterable mixing "
                f"{sorted({type(x).__name__ for x in items})}"
            )
    else:
        raise TypeError(
            "gradstab: apply() takes an nn.Module, an Optimizer, or an iterable of tensors or "
            f"param-group dicts, got {type(params).__name__}"
        )
    if not isinstance(params, nn.Module):  # named_parameters() already drops repeats
        _refuse_repeats(resolved)
    return resolved


def _refuse_repeats(params: _Params) -> None:
    ids = params.ids
    if len(set(ids)) == len(ids):
        return
    first: dict[int, int] = {}
    for i, pid in enumerate(ids):
        if pid in first:
            raise ValueError(
                f"gradstab: the same tensor appears twice, as {params.label(first[pid])} "
                f"and {params.label(i)}; its gradient would be stabilized twice"
            )
        first[pid] = i


def _named_parameters(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``list(module.named_parameters())``: the same walk (modules once each, a parameter under
    its first name), without hashing each parameter in Python, which cost 0.2 us per parameter,
    more than the compiled op on small tensors. A module that defines its own
    ``named_parameters`` gets it called."""
    if type(module).named_parameters is not nn.Module.named_parameters:
        return list(module.named_parameters())
    named = [
        (f"{prefix}.{name}" if prefix else name, p)
        for prefix, submodule in module.named_modules()
        for name, p in submodule._parameters.items()
        if p is not None
    ]
    ids = list(map(id, [p for _, p in named]))
    if len(set(ids)) < len(ids):  # shared (tied) parameters
        seen: set[int] = set()
        named = [(n, p) for (n, p), i in zip(named, ids) if not (i in seen or seen.add(i))]
    return named


# Prefixes a wrapper adds to parameter names: torch.compile's OptimizedModule, and
# DistributedDataParallel / DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(module)``, ``DistributedDataParallel(module)`` or
    ``DataParallel(module)`` (in any nesting), whose parameter names lack ``_orig_mod.`` and
    ``module.``, so that the state keys (and checkpoints) are the same with and without them."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything compiled
    compiled_type = getattr(eval_frame, "OptimizedModule", None)
    while True:
        if compiled_type is not None and isinstance(module, compiled_type):
            module = module._orig_mod
        elif isinstance(module, _DATA_PARALLEL):
            module = module.module
        else:
            return module


def _from_groups(groups: Sequence[dict]) -> _Params:
    tensors: list[Tensor] = []
    places: list[tuple[int, int]] = []  # (group, index in group) of each tensor, for labels
    for gi, group in enumerate(groups):
        if "params" not in group:
            raise TypeError(f"gradstab: param group {gi} has no 'params' entry")
        group_params = group["params"]
        group_params = [group_params] if isinstance(group_params, Tensor) else list(group_params)
        tensors += group_params
        places += [(gi, pi) for pi in range(len(group_params))]

    def label(i: int) -> str:
        gi, pi = places[i]
        return f"param_groups[{gi}]['params'][{pi}]"

    return _Params(list(range(len(tensors))), tensors, label)


def _scaler_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer
) -> Tensor | None:
    """Unscales ``optimizer``'s gradients if ``scaler`` has not, and returns its found_inf."""
    from torch.amp.grad_scaler import OptState

    opt_state = scaler._per_optimizer_states[id(optimizer)]
    if opt_state["stage"] is OptState.STEPPED:
        raise RuntimeError(
            "gradstab: apply() was called after scaler.step(optimizer) in this iteration; "
            "stabilize before stepping (and call scaler.update() at the end of each iteration)"
        )
    if opt_state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    per_device = list(opt_state["found_inf_per_device"].values())
    if not per_device:
        return None
    total = per_device[0].reshape(())
    for t in per_device[1:]:
        total = total + t.to(total.device).reshape(())
    return total
