"""GradientStabilizer on sharded gradients: ``DTensor`` grads of FSDP2 (``fully_shard``) and TP.

Under DDP every rank holds the whole, already averaged gradient, and gradstab needs nothing
special. Under FSDP2 each rank holds one shard of each gradient, as a ``DTensor`` whose
placements say how the whole tensor is split over a ``DeviceMesh``. A norm taken per shard would
rescale each piece of a parameter by a different factor and break the gradient's direction, so
this module computes the norm of every whole parameter from its shards.

NOTE: [whole-parameter norms from shards]
The sum of squares of a tensor is the sum of the sums of squares of disjoint pieces of it. Each
rank reduces its local shards (``_torch_backend.grad_norms``: float64 sums of squares) to a
float64 vector ``s`` of per-tensor sums of squares, and ``s`` is summed over the process groups
of the mesh dimensions where a tensor is *sharded*: one ``all_reduce`` per such group, over all
the tensors sharded across it, not one per tensor. Mesh dimensions where a tensor is replicated
are left out, since summing identical copies would count them twice. After the sum every rank
holds the same norms (an all-reduce gives every rank the same bits), so the state update, done
redundantly on every rank, keeps the replicated statistics identical with no further
communication; every rank then scales its own shards by the same factor. A ``found_inf`` flag
rides in the same all-reduce, so a step that one rank's loss scaler skips is skipped by all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradstab import _torch_backend

__all__ = ["has_dtensor", "is_dtensor", "refuse_fsdp1", "stabilize_"]

_AVAILABLE = torch.distributed.is_available()
if _AVAILABLE:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

FSDP1_MESSAGE = (
    "gradstab: {label} belongs to a FullyShardedDataParallel (FSDP1) module: its gradient is a "
    "slice of a flattened, sharded buffer, so neither its norm nor a per-parameter state can be "
    "taken from it. gradstab supports FSDP2 (torch.distributed.fsdp.fully_shard), whose "
    "gradients are DTensors; see docs/distributed.md"
)


# isinstance() against a Tensor subclass costs ~0.1 us; these checks run on every gradient of
# every step, so plain tensors are let through by their exact type first (5x cheaper).


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return type(t) is not Tensor and _AVAILABLE and isinstance(t, DTensor)


def has_dtensor(grads: Sequence[Tensor]) -> bool:
    """Whether any of ``grads`` is a ``DTensor`` (then ``stabilize_`` of this module must run)."""
    types = set(map(type, grads))
    types.discard(Tensor)
    return bool(types) and _AVAILABLE and any(issubclass(t, DTensor) for t in types)


def check_placements(grad: Tensor, label: str) -> None:
    """Refuses a ``DTensor`` gradient whose norm cannot be taken from its local shards."""
    _reduce_groups(grad, label)


def refuse_fsdp1(named_params: Iterable[tuple[str, Tensor]]) -> None:
    """Raises ``TypeError`` if a parameter belongs to an FSDP1 ``FullyShardedDataParallel``.

    ``named_params`` yields (label for the error message, parameter). FSDP1 marks both its
    ``FlatParameter`` and the original parameters it flattened.
    """
    if not (_AVAILABLE and dist.is_initialized()):
        return  # FSDP1 cannot be built without a process group
    for label, p in named_params:
        if getattr(p, "_fsdp_flattened", False):
            raise TypeError(FSDP1_MESSAGE.format(label=label))


def _is_strided_shard(placement: object) -> bool:
    return isinstance(placement, _StridedShard)


# id(mesh) -> (mesh, per mesh dimension its process group, or None for a dimension of one rank).
# Meshes are few and live as long as the model; get_group() costs ~2 us, too much per tensor.
_MESH_GROUPS: dict[int, tuple[Any, tuple[Any, ...]]] = {}


def _mesh_groups(mesh: Any) -> tuple[Any, ...]:
    entry = _MESH_GROUPS.get(id(mesh))
    if entry is None or entry[0] is not mesh:
        groups = tuple(mesh.get_group(d) if mesh.size(d) > 1 else None for d in range(mesh.ndim))
        entry = _MESH_GROUPS[id(mesh)] = (mesh, groups)
    return entry[1]


def _reduce_groups(grad: Tensor, label: str) -> tuple:
    """The process groups over which the local sums of squares of ``grad`` must be summed.

    ``Partial`` placements (pending sums, as tensor parallelism can leave them) hold summands of
    the gradient, not pieces of it, and are refused (``ValueError`` naming ``label``).
    """
    if not isinstance(grad, DTensor):
        return ()  # a plain tensor is the whole gradient on every rank (DDP, or not sharded)
    mesh_groups = _mesh_groups(grad.device_mesh)
    groups = []
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() or _is_strided_shard(placement):
            if mesh_groups[dim] is not None:
                groups.append(mesh_groups[dim])
        elif placement.is_partial():
            raise ValueError(
                f"gradstab: the gradient of {label} is a DTensor with a Partial placement on "
                f"mesh dimension {dim} ({grad.placements}): its norm cannot be taken before the "
                "pending reduction; redistribute it to Shard or Replicate placements before "
                "apply()"
            )
        else:
            raise ValueError(
                f"gradstab: the gradient of {label} is a DTensor with placement {placement} on "
                f"mesh dimension {dim}, which gradstab does not know how to reduce"
            )
    return tuple(groups)


def _local_sq_norms(local: list[Tensor], device: torch.device) -> Tensor:
    """float64 ``[T]`` sums of squares of ``local`` on ``device`` (as the torch backend takes
    them: see NOTE: [norms beyond float32] in gradstab/_torch_backend.py)."""
    return _torch_backend.grad_norms(local, device).square()


def whole_sq_norms(
    local: list[Tensor], groups: list[tuple], device: torch.device, found_inf: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Sums of squares of the whole tensors whose local pieces are ``local``, and the found_inf
    flag of every rank that shares them.

    Args:
        local: the local shards (plain tensors).
        groups: per tensor, the process groups it is sharded over (``()``: not sharded).
        device: where the float64 result lives (the state's device).
        found_inf: this rank's flag (> 0: skip this step), or None.

    Returns:
        ``(sq, found)``: float64 ``[T]`` sums of squares on ``device``; a float64 one-element
        tensor that is > 0 if any rank sharing the tensors passed ``found_inf > 0`` (None if
        ``found_inf`` is None).
    """
    sq = _local_sq_norms(local, device)
    found = None if found_inf is None else (found_inf.to(device).reshape(1) > 0).double()
    # One all-reduce per process group, over the tensors sharded across it. A tensor sharded
    # over several mesh dimensions is summed over each of their groups in turn, which sums it
    # over their product. Every rank builds this dict from the same list of gradients, so all
    # ranks issue the same collectives in the same order.
    tensors_of: dict[Any, list[int]] = {}
    for i, tensor_groups in enumerate(groups):
        for group in tensor_groups:
            tensors_of.setdefault(group, []).append(i)
    for group, idx in tensors_of.items():
        everything = len(idx) == len(local)
        index = None if everything else torch.tensor(idx, device=device)
        parts = [sq if everything else sq.index_select(0, index)]
        if found is not None:
            parts.append(found)
        buffer = torch.cat(parts)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        sq = buffer[: len(idx)] if everything else sq.index_copy(0, index, buffer[: len(idx)])
        if found is not None:
            found = buffer[len(idx) :]
    return sq, found


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
) -> tuple[Tensor, Tensor | None]:
    """``gradstab::stabilize_`` for gradients that may be ``DTensor`` s; same arguments.

    Every rank that holds a piece of these gradients must call it, with its pieces in the same
    order (see NOTE: [whole-parameter norms from shards]). Plain tensors in ``grads`` count as
    whole on every rank.

    Returns:
        ``(norms, found_inf)``: the float64 ``[T]`` norms of the whole gradients before scaling,
        and the found_inf flag this step obeyed (> 0 if any rank sharing the gradients passed
        ``found_inf > 0``; None if none was passed).
    """
    groups = [_reduce_groups(g, f"grads[{i}]") for i, g in enumerate(grads)]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    _torch_backend.check_tensors(local, m, v, k, found_inf, global_norm)
    device = m.device
    sq, found = whole_sq_norms(local, groups, device, found_inf)
    norms = sq.sqrt()
    skip_step: Tensor | bool = False if found is None else found.reshape(()) > 0
    # The norms are the same on every rank, so under nonfinite="raise" every rank raises (none is
    # left waiting in a collective).
    _torch_backend.finish_step(
        local, _torch_backend.group_grads(local), norms, skip_step, m, v, k,
        gamma1, gamma2, eps, bias_correction, global_norm, nonfinite, spike_guard,
    )  # fmt: skip
    return norms, found
