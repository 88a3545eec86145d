"""The compiled op as PyTorch sees it: schema, fake kernel, tracing and dispatch."""

from __future__ import annotations

import pytest
import torch

from gradstab import _ops
from gradstab import functional as F
from tests.conftest import CPU_BACKENDS

pytestmark = pytest.mark.skipif("compiled" not in CPU_BACKENDS, reason="gradstab._C not built")


def op_args(granularity: str, found_inf: bool, spike_guard: float | None):
    grads = [
        torch.randn(5, 3),
        torch.randn(7, dtype=torch.float64),
        torch.randn(0),
        torch.randn(4, 6).t(),
        torch.randn(9).to(torch.bfloat16),
    ]
    state = F.init_state(grads, granularity)
    inf = torch.tensor(0.0) if found_inf else None
    return (
        grads,
        state.m,
        state.v,
        state.k,
        inf,
        0.6,
        0.999,
        1e-12,
        True,
        granularity == "global",
        0,
        spike_guard,
    )


@pytest.mark.parametrize("granularity", ["param", "global"])
@pytest.mark.parametrize("found_inf", [False, True])
@pytest.mark.parametrize("spike_guard", [None, 10.0])
def test_opcheck(granularity, found_inf, spike_guard):
    torch.library.opcheck(
        torch.ops.gradstab.stabilize_.default, op_args(granularity, found_inf, spike_guard)
    )


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = op_args("param", False, None)
        fake_args = tuple(
            [mode.from_tensor(t) for t in a]
            if isinstance(a, list)
            else (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a)
            for a in args
        )
        out = torch.ops.gradstab.stabilize_(*fake_args)
    assert out.shape == (5,) and out.dtype == torch.float64


def test_build_info_names_the_build():
    info = _ops.build_info()
    assert "compiler" in info and "openmp: yes" in info


def test_writes_bump_version_counters():
    """Autograd must see the in-place change of every tensor the op writes."""
    grads = [torch.randn(5), torch.randn(3, 4)]
    state = F.init_state(grads)
    before = [t._version for t in [*grads, *state]]
    F.stabilize_(grads, state, backend="compiled")
    after = [t._version for t in [*grads, *state]]
    assert all(a > b for a, b in zip(after, before))


def test_grads_that_require_grad_are_refused_in_grad_mode():
    grads = [torch.randn(5, requires_grad=True)]
    state = F.init_state(grads)
    with pytest.raises(RuntimeError, match=r"grads\[0\] requires grad"):
        torch.ops.gradstab.stabilize_(
            grads, state.m, state.v, state.k, None, 0.6, 0.999, 1e-12, True, False, 0, None
        )
    assert state.k.item() == 0
    with torch.no_grad():
        F.stabilize_(grads, state, backend="compiled")
    assert state.k.item() == 1
