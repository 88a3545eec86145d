"""Where DeepSpeed keeps each parameter's averaged gradient between ``engine.backward`` and
``engine.step``: the only module of gradstab that reads DeepSpeed internals.

Tested against DeepSpeed ``TESTED_VERSIONS`` (with torch 2.13.0 on CPU ranks; see
docs/distributed.md). Every layout is checked before it is used (the fragments must tile the
flat partitions exactly as DeepSpeed's own fragment addresses say), and a layout this module does
not know raises ``DeepSpeedLayoutError`` instead of producing wrong norms.

NOTE: [DeepSpeed gradient layouts]
* ZeRO stage 0: the engine all-reduces (averages) every ``p.grad`` at the accumulation boundary
  inside ``engine.backward``; every rank holds the whole averaged gradient. The optimizer is the
  client's (fp32), ``FP16_Optimizer`` (fp16) or ``FP16_UnfusedOptimizer`` (bf16); all of them
  step from ``p.grad``.
* ZeRO stages 1 and 2 (``DeepSpeedZeroOptimizer``): ``p.grad`` is None; the averaged gradient of
  this rank's slice of the flat parameter buffer of param group ``i`` is the list of tensors
  ``optimizer.averaged_gradients[i]``, one per parameter overlapping the slice (in the order of
  ``params_in_partition[i]``) plus zero padding, which ``step()`` flattens into the fp32
  partition. Which part of a parameter a rank holds is DeepSpeed's public tensor-fragment
  mapping ``p._hp_mapping`` (``lp_fragment_address``: where in the parameter;
  ``hp_fragment_address``: where in the rank's slice). We match each fragment to the tensor of
  ``averaged_gradients[i]`` that starts at ``hp_fragment_address.start`` with its ``numel`` and
  scale that tensor in place: what ``step()`` will read. (With bf16 parameters and float32
  gradient accumulation the tensors are views of one flat float32 partition, a
  ``GradPartitionBufferGroup``; the same matching holds.) (DeepSpeed's
  ``safe_get_full_grad``/``safe_set_full_grad`` do the same per parameter with one all-reduce
  and one copy each; the local-gradient API is ZeRO-3 only.)
* ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split into
  ``world`` equal partitions of ``p.partition_numel()`` elements (the last ones zero-padded past
  ``p.ds_numel``); ``optimizer.averaged_gradients[i]`` lists, for sub-group ``i``
  (``optimizer.fp16_groups[i]``), this rank's partition of each parameter's averaged
  gradient: the same tensors ``safe_get_local_grad`` returns (which would add a float32 copy for
  bf16 gradients), scaled in place here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradstab._warn import user_stacklevel

__all__ = ["TESTED_VERSIONS", "DeepSpeedLayoutError", "Fragments", "check_version", "fragments"]

TESTED_VERSIONS = ("0.19.8",)

_warned_versions: set[str] = set()


class DeepSpeedLayoutError(RuntimeError):
    """DeepSpeed keeps the gradients in a way gradstab does not know (or not at this moment)."""


@dataclass
class Fragments:
    """This rank's pieces of the averaged gradients of a DeepSpeed model.

    Attributes:
        keys: the parameter names (``module.named_parameters()``), in the same order on every rank.
        local: per key, this rank's piece of its averaged gradient, a view into what
            ``engine.step()`` will read (flat, possibly empty).
        group: the process group over which the pieces' sums of squares add up to the whole
            gradient's (``None`` with ``sharded=False``: every rank holds whole gradients).
        sharded: whether ``local`` holds pieces (ZeRO 1-3) or whole gradients (ZeRO 0).
        loss_scale: the factor DeepSpeed's loss scaler multiplied the gradients by (1.0 without).
        kind: which layout (for messages and tests): "zero0", "zero1/2" or "zero3".
    """

    keys: list[str]
    local: list[Tensor]
    group: Any
    sharded: bool
    loss_scale: float
    kind: str


def check_version() -> None:
    """Warns once if the installed DeepSpeed is not one of ``TESTED_VERSIONS``."""
    import deepspeed

    version = deepspeed.__version__
    if version not in TESTED_VERSIONS and version not in _warned_versions:
        _warned_versions.add(version)
        warnings.warn(
            f"gradstab: DeepSpeed {version} has not been tested with gradstab (tested: "
            f"{', '.join(TESTED_VERSIONS)}); its gradient layout is checked on every step and "
            "an unknown one raises DeepSpeedLayoutError",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _optimizer_classes() -> dict[str, type]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {
        "zero12": DeepSpeedZeroOptimizer,
        "zero3": DeepSpeedZeroOptimizer_Stage3,
        "fp16": FP16_Optimizer,
        "unfused": FP16_UnfusedOptimizer,
        "bf16": BF16_Optimizer,
    }


def fragments(module: nn.Module, optimizer: Any) -> Fragments:
    """This rank's pieces of the averaged gradients of ``module``, whose DeepSpeed optimizer
    (``engine.optimizer``) is ``optimizer``. Call between ``engine.backward`` at an accumulation
    boundary and ``engine.step``.

    Raises:
        DeepSpeedLayoutError: the optimizer or its gradient layout is not one this module knows,
            or the gradients are not there (outside backward..step).
    """
    classes = _optimizer_classes()
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if isinstance(optimizer, classes["zero3"]):
        return _zero3(named, optimizer)
    if isinstance(optimizer, classes["zero12"]):
        return _zero12(named, optimizer)
    if isinstance(optimizer, classes["bf16"]):
        raise DeepSpeedLayoutError(
            "gradstab: DeepSpeed's BF16_Optimizer (ZeRO stage 1 with bf16 parameters and float32 "
            "gradient accumulation, data_types.grad_accum_dtype='fp32') is not supported; use "
            "ZeRO stage 1 or 2 with the default gradient accumulation dtype, or stage 2 or 3"
        )
    if isinstance(optimizer, (classes["fp16"], classes["unfused"], torch.optim.Optimizer)):
        return _zero0(named, optimizer)
    raise DeepSpeedLayoutError(
        f"gradstab: the DeepSpeed optimizer {type(optimizer).__module__}."
        f"{type(optimizer).__qualname__} keeps its gradients in a way gradstab does not know; "
        "supported: ZeRO stages 0-3 (see docs/distributed.md)"
    )


def _loss_scale(optimizer: Any) -> float:
    # A Python float on every optimizer that has one (no device synchronization).
    scale = getattr(optimizer, "loss_scale", 1.0)
    return float(scale)


def _zero0(named: list[tuple[str, nn.Parameter]], optimizer: Any) -> Fragments:
    keys = [name for name, p in named if p.grad is not None]
    local = [p.grad for _, p in named if p.grad is not None]
    return Fragments(keys, local, None, False, _loss_scale(optimizer), "zero0")


def _same_group(groups: list[Any], what: str) -> Any:
    first = groups[0]
    for g in groups[1:]:
        if g is not first:
            raise DeepSpeedLayoutError(
                f"gradstab: the DeepSpeed {what} partitions its param groups over different "
                "process groups (mixture of experts or expert parallelism), which gradstab does "
                "not support"
            )
    return first


def _no_gradients(kind: str) -> DeepSpeedLayoutError:
    return DeepSpeedLayoutError(
        f"gradstab: the {kind} optimizer holds no averaged gradients now; call "
        "stab.apply(engine) after engine.backward(loss) and before engine.step()"
    )


def _zero12(named: list[tuple[str, nn.Parameter]], optimizer: Any) -> Fragments:
    if getattr(optimizer, "cpu_offload", False):
        raise DeepSpeedLayoutError(
            "gradstab: ZeRO stage 1/2 with offload_optimizer keeps the gradients in pinned CPU "
            "buffers that gradstab does not support; disable offload_optimizer"
        )
    group = _same_group(list(optimizer.real_dp_process_group), "ZeRO stage 1/2 optimizer")
    piece: dict[int, Tensor] = {}
    for i, lp_params in enumerate(optimizer.bit16_groups):
        grads = optimizer.averaged_gradients.get(i)
        if grads is None:
            raise _no_gradients("ZeRO stage 1/2")
        starts: dict[int, Tensor] = {}
        offset = 0
        for t in grads:
            starts.setdefault(offset, t)
            offset += t.numel()
        if offset != int(optimizer.partition_size[i]):
            raise DeepSpeedLayoutError(
                f"gradstab: ZeRO stage 1/2 param group {i}: the averaged gradients hold {offset} "
                f"elements, the partition {int(optimizer.partition_size[i])}; unknown layout"
            )
        for lp in lp_params:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue  # no part of this parameter lies in this rank's partition
            address = mapping.get_hp_fragment_address()
            t = starts.get(int(address.start))
            if t is None or t.numel() != int(address.numel):
                raise DeepSpeedLayoutError(
                    f"gradstab: ZeRO stage 1/2 param group {i}: no averaged-gradient tensor at "
                    f"offset {address.start} with {address.numel} elements for a parameter of "
                    f"shape {tuple(lp.shape)}; unknown layout"
                )
            piece[id(lp)] = t.view(-1)
    return _collect(named, piece, group, _loss_scale(optimizer), "zero1/2")


def _zero3(named: list[tuple[str, nn.Parameter]], optimizer: Any) -> Fragments:
    import torch.distributed as dist

    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "offload_param", False):
        raise DeepSpeedLayoutError(
            "gradstab: ZeRO stage 3 with offload_optimizer/offload_param keeps the gradients in "
            "CPU or NVMe buffers that gradstab does not support; disable offloading"
        )
    group = optimizer.dp_process_group
    rank = dist.get_rank(group=group)
    piece: dict[int, Tensor] = {}
    for i, params in enumerate(optimizer.fp16_groups):
        grads = optimizer.averaged_gradients.get(i)
        if grads is None:
            raise _no_gradients("ZeRO stage 3")
        if len(grads) != len(params):
            raise DeepSpeedLayoutError(
                f"gradstab: ZeRO stage 3 sub-group {i} has {len(params)} parameters but "
                f"{len(grads)} gradient partitions; unknown layout"
            )
        for p, g in zip(params, grads):
            if not p.requires_grad:
                continue
            size = int(p.partition_numel())
            if g.numel() != size:
                raise DeepSpeedLayoutError(
                    f"gradstab: ZeRO stage 3: a gradient partition of {g.numel()} elements for a "
                    f"parameter partitioned in {size}; unknown layout"
                )
            # The last partitions run past the parameter's end: leave their padding out.
            real = max(0, min(size, int(p.ds_numel) - rank * size))
            piece[id(p)] = g.view(-1).narrow(0, 0, real)
    return _collect(named, piece, group, _loss_scale(optimizer), "zero3")


def _collect(
    named: list[tuple[str, nn.Parameter]],
    piece: dict[int, Tensor],
    group: Any,
    loss_scale: float,
    kind: str,
) -> Fragments:
    """Every trainable parameter in ``named`` order (the same on every rank), with its piece
    or an empty tensor where this rank holds none of it."""
    if not piece:
        raise DeepSpeedLayoutError(
            f"gradstab: no parameter of the module has a gradient piece in the {kind} optimizer; "
            "is the engine's module the one passed?"
        )
    some = next(iter(piece.values()))
    empty = some.new_zeros(0)
    keys = [name for name, _ in named]
    local = [piece.get(id(p), empty) for _, p in named]
    known = {id(p) for _, p in named}
    if any(pid not in known for pid in piece):
        raise DeepSpeedLayoutError(
            f"gradstab: the {kind} optimizer holds parameters that the module does not have"
        )
    return Fragments(keys, local, group, True, loss_scale, kind)
