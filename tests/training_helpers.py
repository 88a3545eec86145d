"""Shared pieces of the training-stack tests: small models, data, snapshots, a host-sync counter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device: reading a value, or an output whose size depends on
# the data. Every Python-level read (item, bool, float, int) ends in _local_scalar_dense.
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
}


class SyncCounter(TorchDispatchMode):
    """Records every op in ``SYNC_OPS`` (and ``Tensor.tolist``) run while it is active.

    On the CPU nothing truly waits, but the same Python code on an accelerator would: this is the
    CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def active(self) -> Iterator[SyncCounter]:
        original = Tensor.tolist

        def counted_tolist(t: Tensor):
            self.calls.append("Tensor.tolist")
            return original(t)

        Tensor.tolist = counted_tolist
        try:
            with self:
                yield self
        finally:
            Tensor.tolist = original


def mlp(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small MLP (4 parameters) with weights drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batches(seed: int, steps: int, batch: int = 16) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 13, generator=gen), torch.randn(batch, 3, generator=gen))
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(model(x).float(), y)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _bits(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(a, b, what: str) -> None:
    """``a`` equals ``b`` bit for bit: tensors (NaN included), nested in dicts, lists, numbers."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys differ"
        for key in a:
            assert_same_bits(a[key], b[key], f"{what}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_bits(x, y, f"{what}[{i}]")
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{what}: {type(b).__name__} is not a tensor"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{what}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        )
        assert torch.equal(_bits(a), _bits(b)), f"{what}: tensors differ"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"
