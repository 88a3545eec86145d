"""``GradientStabilizer``: the stateful, parameter-keyed front end of ``gradstab.functional``."""

from __future__ import annotations

import operator
import re
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gradstab import _ops, _torch_backend, distributed
from gradstab import functional as F
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

    norms: Tensor  # float32 [T], per-gradient norms before scaling
    m: Tensor  # the state after the step ([T], or [1] for the global norm)
    v: Tensor
    k: Tensor
    found_inf: Tensor | None
    global_norm: bool


class StabilizerStats:
    """Figures of one ``GradientStabilizer.apply`` step, computed on first access.

    Attributes (0-d tensors on the gradients' device; reading them does not synchronize):
        norm_before: L2 norm of all stabilized gradients together, before the step (float32).
        norm_after: the same after the step (float32).
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
        before_sq = torch.zeros((), dtype=torch.float64, device=self._device)
        after_sq = torch.zeros((), dtype=torch.float64, device=self._device)
        skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        for part in self._parts:
            norms = part.norms.double()
            step_norm = norms.square().sum().sqrt().reshape(1) if part.global_norm else norms
            skip = torch.zeros((), dtype=torch.bool, device=norms.device)
            if part.found_inf is not None:
                skip = part.found_inf.to(norms.device).reshape(()) > 0
            finite = torch.isfinite(step_norm)
            valid = finite & (step_norm > 0) & ~skip
            target = _torch_backend.target_norm(
                part.m,
                part.v,
                part.k,
                cfg["gamma1"],
                cfg["gamma2"],
                cfg["eps"],
                cfg["bias_correction"],
            )
            untouched = 0.0 if cfg["nonfinite"] == "zero" else 1.0
            factor = torch.where(
                valid,
                target / step_norm.clamp(min=cfg["eps"]),
                torch.where(~finite & ~skip, untouched, 1.0),
            )
            count = torch.where(skip | ~finite, 1, 0).expand(norms.shape)
            before_sq += norms.square().sum().to(self._device)
            after = torch.where(factor == 0, 0.0, norms * factor)  # inf * 0 would read NaN
            after_sq += after.square().sum().to(self._device)
            skipped += count.sum().to(self._device)
        return before_sq.sqrt().float(), after_sq.sqrt().float(), skipped

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


class GradientStabilizer:
    """GradientStabilizer (Huang et al., ICML 2026): fix each gradient's norm, keep its direction.

    Call ``apply`` between ``loss.backward()`` and ``optimizer.step()``. Each gradient ``g`` of
    norm n is rescaled in place to the norm ``m_hat / (sqrt(v_hat) + eps)``, where m and v are
    running averages (decays gamma1, gamma2) of the norms seen so far and k counts the valid
    updates (see ``gradstab.functional``).

    Args:
        gamma1: decay of the first moment m of the norm. Default 0.6.
        gamma2: decay of the second moment v of the norm. Default 0.999.
        eps: added to sqrt(v_hat), and the floor of n in the division. Default 1e-12.
        bias_correction: divide m and v by (1 - gamma^k). Default True.
        granularity: ``"param"`` (default): one norm and one (m, v, k) per parameter;
            ``"global"``: one norm over all gradients, like ``clip_grad_norm_``.
        nonfinite: a gradient whose norm is NaN or Inf is set to zero (``"zero"``, default), left
            alone (``"skip"``), or raises ``FloatingPointError`` before anything changes
            (``"raise"``, which synchronizes with the device).
        spike_guard: ``None`` (default, the paper's transform) or G > 0: once k > 0 the statistics
            are fed ``min(n, G * sqrt(v_hat_prev))`` so one huge spike cannot inflate v for the
            next ~1/(1 - gamma2) steps.
        backend: ``"auto"`` (default): the compiled kernels where they exist for the gradients'
            device, else torch ops; ``"compiled"``: require the kernels; ``"torch"``: torch ops.
    """

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
        F.validate_config(gamma1, gamma2, eps, bias_correction, granularity, nonfinite, spike_guard)
        if backend not in F.BACKENDS:
            raise ValueError(f"gradstab: backend must be one of {F.BACKENDS}, got {backend!r}")
        if backend == "compiled" and not _ops.HAS_EXTENSION:
            raise RuntimeError(f"gradstab: backend='compiled' but {_ops.build_info()}")
        self.gamma1 = float(gamma1)
        self.gamma2 = float(gamma2)
        self.eps = float(eps)
        self.bias_correction = bias_correction
        self.granularity = granularity
        self.nonfinite = nonfinite
        self.spike_guard = None if spike_guard is None else float(spike_guard)
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
        return {name: getattr(self, name) for name in _CONFIG_KEYS}

    def reset(self) -> None:
        """Forgets all statistics, as if no step had been taken."""
        self._finalize_stats()
        self._groups: dict[torch.device, _DeviceState] = {}
        self._global: F.StabilizerState | None = None
        self._pending: dict[Key, tuple[Tensor, Tensor, Tensor]] = {}
        self._pending_strict = False

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
        found_inf = self._combined_found_inf(params, found_inf, scaler, optimizer)
        grads = [p.grad for p in everything.tensors]
        present = [i for i, g in enumerate(grads) if g is not None]
        with_grad = everything
        if len(present) < len(grads):
            with_grad = everything.select(present)
            grads = [grads[i] for i in present]
        sharded = _check_grads(grads, with_grad)
        self._check_pending(everything.keys, with_grad)
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
        """Restores statistics and configuration saved by ``state_dict``.

        The state is attached to parameters at the next ``apply``. With ``strict`` (default),
        that ``apply`` raises if the checkpoint holds state for a parameter the model does not
        have, or if a parameter with a gradient has none in the checkpoint.
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
        merged = {**self.config(), **config}
        F.validate_config(**merged)
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
        if merged["granularity"] == "global" and keys not in ([], ["<global>"]):
            raise ValueError(
                "gradstab: state_dict has granularity 'global' but per-parameter keys; "
                "it is not a gradstab checkpoint or it was edited"
            )
        if merged["granularity"] == "param" and "<global>" in keys:
            raise ValueError("gradstab: state_dict has granularity 'param' but a '<global>' entry")

        self.reset()
        for name in _CONFIG_KEYS:
            setattr(self, name, merged[name])
        m, v, k = m.detach().cpu().clone(), v.detach().cpu().clone(), k.detach().cpu().clone()
        self._pending = {key: (m[i], v[i], k[i]) for i, key in enumerate(keys)}
        self._pending_strict = strict and merged["granularity"] == "param"

    def __getstate__(self) -> dict[str, Any]:
        # The weak reference to the last step's figures cannot be pickled: compute them now.
        self._finalize_stats()
        return self.__dict__.copy()

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

    def _check_pending(self, all_keys: Collection[Key], with_grad: _Params) -> None:
        """With a strictly loaded state dict pending: every key it holds is among ``all_keys``
        (the parameters given) and every parameter with a gradient has state in it."""
        if not self._pending_strict:
            return
        all_keys = set(all_keys)
        unknown = [key for key in self._pending if key not in all_keys]
        if unknown:
            raise RuntimeError(
                "gradstab: the loaded state_dict has state for "
                f"{', '.join(repr(k) for k in unknown[:10])}"
                f"{' ...' if len(unknown) > 10 else ''}, which the parameters passed to apply() "
                "do not have (was it saved from another model, or keyed by position while "
                "apply() got a module?); load_state_dict(sd, strict=False) ignores this"
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
        norms, found_inf = self._run(grads, state, found_inf, with_grad)
        return _StatsPart(norms, state.m, state.v, state.k, _on(found_inf, device), True)

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
        (norms, found_inf), state = self._with_param_state(
            device,
            params.keys,
            lambda state: self._run(grads, state, found_inf, params, not sharded),
        )
        return _StatsPart(norms, state.m, state.v, state.k, _on(found_inf, device), False)

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


_layout = operator.attrgetter("layout")
_dtype = operator.attrgetter("dtype")
_SUPPORTED_DTYPES = set(_torch_backend.SUPPORTED_DTYPES)


def _check_grads(grads: list[Tensor], params: _Params) -> bool:
    """``_check_grad`` for every gradient, at C speed where they are all fine (nearly always);
    returns whether any is a ``DTensor``."""
    sharded = distributed.has_dtensor(grads)
    if (
        not sharded
        and set(map(_layout, grads)) <= {torch.strided}
        and set(map(_dtype, grads)) <= _SUPPORTED_DTYPES
    ):
        return False
    for i, p in enumerate(params.tensors):
        _check_grad(_Entry(params.keys[i], params.label(i), p))
    return sharded


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
        named = _named_parameters(_unwrap_compiled(params))
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
    ids = list(map(id, params.tensors))
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


def _unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(module)``, whose parameter names lack "_orig_mod.", so
    that the state keys (and checkpoints) are the same with and without compilation."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything compiled
    compiled_type = getattr(eval_frame, "OptimizedModule", None)
    while compiled_type is not None and isinstance(module, compiled_type):
        module = module._orig_mod
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
