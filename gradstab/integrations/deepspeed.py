"""GradientStabilizer under DeepSpeed: ZeRO stages 0-3, fp32, bf16 and fp16.

::

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)  # gradient_clipping 0
    stab = gradstab.GradientStabilizer()
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        stab.apply(engine)        # a no-op except at a gradient accumulation boundary
        engine.step()
    engine.save_checkpoint(ckpt, client_state={CLIENT_STATE_KEY: stab.state_dict()})
    _, client = engine.load_checkpoint(ckpt)
    stab.load_state_dict(client[CLIENT_STATE_KEY])

NOTE: [whole-parameter norms under ZeRO]
Under ZeRO 1-3 a rank holds a piece (a fragment) of some parameters' averaged gradients and
nothing of the others (see NOTE: [DeepSpeed gradient layouts] in ``_deepspeed_layout``). As for
FSDP2 (NOTE: [whole-parameter norms from shards] in ``gradstab.distributed``), each rank reduces
its pieces to a float64 vector of per-parameter sums of squares (0 for a parameter it holds
nothing of), and one ``all_reduce`` of that vector over the data-parallel group gives every rank
the same whole-parameter norms; the state update, done redundantly on every rank, keeps the
statistics identical, and each rank scales its own pieces in place. Under ZeRO 0 every rank
holds the whole averaged gradients and nothing is communicated.

With fp16 the gradients carry DeepSpeed's loss scale S: the statistics are fed the unscaled norm
n/S and the scaled gradient is multiplied by the same factor (DeepSpeed divides by S in its
step). DeepSpeed skips the step when a gradient is not finite; the whole norms show that on every
rank without another collective, and such a step leaves gradients and statistics untouched.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradstab import _torch_backend, distributed
from gradstab._warn import user_stacklevel
from gradstab.integrations import _deepspeed_layout as layout
from gradstab.integrations._deepspeed_layout import TESTED_VERSIONS, DeepSpeedLayoutError

__all__ = [
    "CLIENT_STATE_KEY",
    "TESTED_VERSIONS",
    "DeepSpeedLayoutError",
    "PreStepHook",
    "apply",
    "install_pre_step_hook",
    "is_engine",
    "stabilize_fragments",
    "trainer_hook",
]

CLIENT_STATE_KEY = "gradstab"
"""The key of the stabilizer's ``state_dict()`` in DeepSpeed's checkpoint ``client_state``."""

_warned: weakref.WeakSet = weakref.WeakSet()


def is_engine(obj: object) -> bool:
    """Whether ``obj`` is a ``deepspeed.DeepSpeedEngine`` (without importing DeepSpeed)."""
    ds = sys.modules.get("deepspeed")
    engine_type = getattr(ds, "DeepSpeedEngine", None)
    return engine_type is not None and isinstance(obj, engine_type)


def apply(stab: Any, engine: Any, found_inf: Tensor | None = None) -> Any:
    """``stab.apply(engine)``: stabilizes the averaged gradients of a ``DeepSpeedEngine``.

    Call it after ``engine.backward(loss)`` and before ``engine.step()``, on every rank. At a
    micro-step that is not a gradient accumulation boundary it does nothing (the gradients are
    not complete yet) and returns empty statistics; at the boundary it stabilizes the
    accumulated gradients once.

    Args:
        stab: the ``GradientStabilizer``.
        engine: the ``deepspeed.DeepSpeedEngine``.
        found_inf: optional one-element tensor; > 0 on any rank skips the step on all of them.

    Raises:
        DeepSpeedLayoutError: a configuration gradstab does not support (pipeline parallelism,
            offloading, mixture of experts, unmanaged gradient accumulation, BF16_Optimizer), or
            a gradient layout it does not know.
    """
    _check_engine(engine)
    if not engine.is_gradient_accumulation_boundary():
        return _empty_stats(stab)
    return stabilize_fragments(stab, engine.module, engine.optimizer, found_inf=found_inf)


def _check_engine(engine: Any) -> None:
    layout.check_version()
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        raise DeepSpeedLayoutError(
            "gradstab: DeepSpeed's PipelineEngine runs backward and step inside train_batch(); "
            "gradstab supports DeepSpeedEngine (ZeRO stages 0-3) without pipeline parallelism"
        )
    if getattr(engine, "has_moe_layers", False):
        raise DeepSpeedLayoutError(
            "gradstab: DeepSpeed mixture-of-experts layers reduce expert gradients over "
            "their own process groups, which gradstab does not support"
        )
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        raise DeepSpeedLayoutError(
            "gradstab: with managed_gradient_accumulation=false DeepSpeed reduces the gradients "
            "inside engine.step(), after apply() could see them; use the default (managed) mode"
        )
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None or getattr(
        engine.optimizer, "torch_autocast_gradscaler", None
    ):
        raise DeepSpeedLayoutError(
            "gradstab: DeepSpeed's torch_autocast with a GradScaler is not supported; use the "
            "fp16 or bf16 sections of the DeepSpeed config"
        )
    warn_if_clipping(engine, engine.gradient_clipping())


def warn_if_clipping(owner: Any, clipping: Any) -> None:
    """Warns once per ``owner`` when DeepSpeed's ``gradient_clipping`` is on."""
    if isinstance(clipping, (int, float)) and clipping > 0 and owner not in _warned:
        _warned.add(owner)
        warnings.warn(
            f"gradstab: DeepSpeed clips gradients to gradient_clipping={clipping} after the "
            "stabilizer runs, on top of it; GradientStabilizer replaces clipping, so set "
            '"gradient_clipping": 0.0 in the DeepSpeed config (or max_grad_norm=0.0 for the '
            "HuggingFace Trainer).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _empty_stats(stab: Any) -> Any:
    from gradstab.stabilizer import StabilizerStats

    return StabilizerStats([], stab.config(), torch.device("cpu"))


@torch.no_grad()
def stabilize_fragments(
    stab: Any, module: nn.Module, optimizer: Any, found_inf: Tensor | None = None
) -> Any:
    """Stabilizes the gradients that ``optimizer`` (a DeepSpeed engine's ``engine.optimizer``)
    holds for ``module`` (``engine.module``); see NOTE: [whole-parameter norms under ZeRO].

    Returns the step's ``StabilizerStats``. Every rank of the data-parallel group must call it.
    """
    from gradstab.stabilizer import StabilizerStats, _Params, _StatsPart

    frag = layout.fragments(module, optimizer)
    keys, local = frag.keys, frag.local
    if found_inf is not None and not isinstance(found_inf, Tensor):
        raise TypeError(f"gradstab: found_inf must be a tensor, got {type(found_inf).__name__}")
    if not frag.sharded and frag.loss_scale == 1.0:
        # ZeRO 0 without a loss scale: whole gradients in p.grad, as without DeepSpeed (the
        # compiled kernels, no communication).
        return stab.apply(module, found_inf=found_inf)
    params = _Params(list(keys), list(local), lambda i: repr(keys[i]))
    stab._check_pending(keys, params)
    # The keys stand for the module's parameters (as under apply(module)), not for the pieces,
    # which DeepSpeed may allocate anew at each step.
    by_name = dict(module.named_parameters())
    stab._bind(_Params(list(keys), [by_name[key] for key in keys], params.label))
    stab._finalize_stats()
    if not local:
        return _empty_stats(stab)
    device = local[0].device
    cfg = stab._step_kwargs()
    global_norm = cfg["granularity"] == "global"
    groups = [(frag.group,) if frag.sharded else ()] * len(local)
    fp16 = any(t.dtype == torch.float16 for t in local) or frag.loss_scale != 1.0

    def run(state: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        k_before = state.k.clone()
        _torch_backend.check_tensors(local, state.m, state.v, state.k, found_inf, global_norm)
        flag = None if found_inf is None else found_inf.to(device)
        sq, found = distributed.whole_sq_norms(local, groups, device, flag)
        norms = sq.sqrt()
        if frag.loss_scale != 1.0:
            norms = norms / frag.loss_scale
        if fp16:
            # DeepSpeed's loss scaler skips a step with a non-finite gradient anywhere: the
            # whole norms, the same on every rank, say so without another collective.
            overflow = (~torch.isfinite(sq)).any().reshape(1).double()
            found = overflow if found is None else found + overflow
        skip_step: Tensor | bool = False if found is None else found.reshape(()) > 0
        try:
            _torch_backend.finish_step(
                local, _torch_backend.group_grads(local), norms, skip_step, state.m, state.v,
                state.k, cfg["gamma1"], cfg["gamma2"], cfg["eps"], cfg["bias_correction"],
                global_norm, _NONFINITE[cfg["nonfinite"]], cfg["spike_guard"],
            )  # fmt: skip
        except FloatingPointError as err:
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise _torch_backend.nonfinite_error(bad, params.labels()) from err
        return norms, found, k_before

    if global_norm:
        state = stab._global_state(device)
        norms, found, k_before = run(state)
    else:
        (norms, found, k_before), state = stab._with_param_state(device, list(keys), run)
    stab._last_device = device
    part = _StatsPart(norms, state.m, state.v, state.k, k_before, found, global_norm)
    stats = StabilizerStats([part], stab.config(), device)
    stab._last_stats = weakref.ref(stats)
    return stats


_NONFINITE = {
    "zero": _torch_backend.NONFINITE_ZERO,
    "skip": _torch_backend.NONFINITE_SKIP,
    "raise": _torch_backend.NONFINITE_RAISE,
}


class PreStepHook:
    """Runs ``callback()`` right before every ``step()`` of a DeepSpeed engine's optimizer;
    ``remove()`` restores the optimizer's own ``step``.

    The HuggingFace Trainer (through accelerate) calls ``engine.backward`` and ``engine.step``
    together inside its ``training_step``, so no Trainer event falls between them; DeepSpeed
    calls ``engine.optimizer.step()`` only at a gradient accumulation boundary, once the
    gradients are reduced, which is where the stabilizer must run.
    """

    def __init__(self, optimizer: Any, callback: Callable[[], None]) -> None:
        if getattr(optimizer.step, "_gradstab_pre_step", False):
            raise RuntimeError(
                "gradstab: the DeepSpeed optimizer already stabilizes before its step (a second "
                "GradientStabilizerCallback?); install one"
            )
        self._optimizer = optimizer
        # An instance attribute already there (torch's LR schedulers wrap step so) is restored
        # by remove(); otherwise the class's step shows through again.
        self._previous = vars(optimizer).get("step")
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            callback()
            return original(*args, **kwargs)

        step._gradstab_pre_step = True  # type: ignore[attr-defined]
        optimizer.step = step

    def remove(self) -> None:
        if self._optimizer is None:
            return
        if self._previous is None:
            vars(self._optimizer).pop("step", None)
        else:
            self._optimizer.step = self._previous
        self._optimizer = None


def install_pre_step_hook(
    stab: Any, module: nn.Module, optimizer: Any, on_stats: Callable[[Any], None] | None = None
) -> PreStepHook:
    """Makes ``optimizer`` (a DeepSpeed engine's ``engine.optimizer``) stabilize the gradients
    of ``module`` (``engine.module``) with ``stab`` before each of its steps; ``on_stats``
    receives each step's ``StabilizerStats``. For training loops that never return between
    ``engine.backward`` and ``engine.step`` (the HuggingFace Trainer)."""
    layout.check_version()

    def before_step() -> None:
        stats = stabilize_fragments(stab, module, optimizer)
        if on_stats is not None:
            on_stats(stats)

    return PreStepHook(optimizer, before_step)


def trainer_hook(
    stab: Any, model: nn.Module, optimizer: Any, args: Any, on_stats: Callable[[Any], None]
) -> PreStepHook | None:
    """For ``GradientStabilizerCallback.on_train_begin``: when the Trainer runs DeepSpeed
    (``TrainingArguments(deepspeed=...)``), a hook that stabilizes before DeepSpeed's optimizer
    steps; None otherwise.

    ``model`` and ``optimizer`` are what the Trainer passes to callbacks: its model (the engine's
    module) and accelerate's ``DeepSpeedOptimizerWrapper`` around the engine's optimizer.
    """
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None:
        return None
    ds_optimizer = getattr(optimizer, "optimizer", None)
    if ds_optimizer is None or model is None:
        raise DeepSpeedLayoutError(
            "gradstab: the Trainer runs DeepSpeed but passed the callback no DeepSpeed optimizer "
            f"(got {type(optimizer).__name__}); is this a transformers/accelerate version "
            "gradstab does not know?"
        )
    if not (args.max_grad_norm is not None and args.max_grad_norm > 0):
        # (with max_grad_norm > 0 the callback has warned already: it becomes gradient_clipping)
        warn_if_clipping(ds_optimizer, ds_config.config.get("gradient_clipping"))
    return install_pre_step_hook(stab, model, ds_optimizer, on_stats)
