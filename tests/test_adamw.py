"""``StabilizedAdamW`` against the composition ``StabilizedOptimizer(torch.optim.AdamW(...))``.

Both optimizers get the same gradients, step after step, with spikes, NaN/Inf, zero gradients and
parameters without gradients, and must keep the same weights, Adam moments, step counts and
stabilizer state (up to float32 rounding), while ``p.grad`` stays as the user computed it.

The reference composition uses torch's default AdamW (one tensor at a time) for float32/float64
and ``fused=True`` for float16/bfloat16 parameters: like the op, the fused kernel computes in
float32 and rounds once, where the default rounds every intermediate to 16 bits.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradstab
from gradstab import _ops, bench
from gradstab import functional as F
from tests.conftest import DTYPES
from tests.training_helpers import (
    SyncCounter,
    assert_same_bits,
    batches,
    loss_fn,
    mlp,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_KERNEL = _ops.has_kernel("cpu", "stabilized_adamw_")
BACKENDS = ["torch"] + (["compiled"] if HAS_KERNEL else [])
STEPS = 50
# Shapes: empty, tiny, odd, primes, over the one-visit limit and over several chunks.
SHAPES = [(0,), (1,), (7, 13), (1023,), (97, 3), (70_001,), (3, 5, 11), (101, 1009)]
# How far the two optimizers may drift apart over the steps, relative to the largest value of
# each tensor (see assert_optimizers_close): float32/float64 a few hundred ulps, 16-bit weights
# a few of their ulps (torch's kernels contract some operations into fused multiply-adds,
# which the op never does).
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 8 * 2.0**-10,
    torch.bfloat16: 8 * 2.0**-7,
}
STABILIZER_ARGS = ("gamma1", "gamma2", "bias_correction", "granularity", "nonfinite", "spike_guard")


def make_params(dtype: torch.dtype, seed: int, shapes=SHAPES, device="cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(device, dtype))
        for s in shapes
    ]


def set_grads(params_list, dtype, gen, step: int, faults: bool = True) -> list[str]:
    """The same fresh gradients on each parameter list (each its own copy); returns the faults."""
    shapes = [p.shape for p in params_list[0]]
    grads = []
    for s in shapes:
        scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)
        grads.append((torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype))
    done = []
    nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]

    def pick() -> int:
        return nonempty[int(torch.randint(len(nonempty), (), generator=gen))]

    if faults:
        if step % 9 == 4:
            i = pick()
            grads[i].view(-1)[0] = float("nan")
            done.append(f"nan@{i}")
        if step % 11 == 6:
            i = pick()
            grads[i].view(-1)[-1] = float("-inf")
            done.append(f"inf@{i}")
        if step % 7 == 2:
            i = pick()
            grads[i].mul_(1e4 if dtype != torch.float16 else 30.0)
            done.append(f"spike@{i}")
        if step % 8 == 5:
            i = pick()
            grads[i].zero_()
            done.append(f"zero@{i}")
        if step % 5 == 1:
            i = pick()
            grads[i] = None
            done.append(f"none@{i}")
    for params in params_list:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.device, copy=True)
    return done


def composition(
    params, dtype, groups=None, backend="compiled", **kwargs
) -> gradstab.StabilizedOptimizer:
    """``StabilizedOptimizer(torch.optim.AdamW(...))`` with StabilizedAdamW's arguments; its
    stabilizer on the backend that computes norms like ours (compiled: the CPU op; torch: the
    torch ops, which sum float16/bfloat16 squares in float32)."""
    stab = {name: kwargs.pop(name) for name in STABILIZER_ARGS if name in kwargs}
    stab["backend"] = "auto" if backend == "compiled" else "torch"
    if "stab_eps" in kwargs:
        stab["eps"] = kwargs.pop("stab_eps")
    fused = dtype in (torch.float16, torch.bfloat16)
    inner = torch.optim.AdamW(groups(params) if groups else params, fused=fused, **kwargs)
    return gradstab.StabilizedOptimizer(inner, **stab)


def fused_adamw(params, dtype, groups=None, backend="compiled", **kwargs):
    opt = gradstab.StabilizedAdamW(groups(params) if groups else params, **kwargs)
    if backend == "torch":
        opt._backend = "torch"
    return opt


def assert_close_rel(actual, expected, rel: float, what: str, floor: float = 0.0) -> None:
    """Equal up to ``rel`` times the largest finite value of ``expected`` (or ``floor``, if
    larger); NaN where it is NaN."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = e[torch.isfinite(e)]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, floor)
    torch.testing.assert_close(
        a, e, rtol=0, atol=max(rel * scale, 1e-30), equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def assert_optimizers_close(ours, params_a, ref, params_b, dtype, where: str) -> None:
    """Weights, Adam state and stabilizer state agree. Errors are measured against the scale of
    what makes them: a weight's against its size or a step (lr), a first moment's against the
    gradients (sqrt of the second moment), a second moment's against at least a few of the
    smallest subnormals of the dtype (float16 moments live there)."""
    rel = TOLERANCE[dtype]
    finfo = torch.finfo(dtype)
    subnormals = 16 * finfo.smallest_normal * finfo.eps / rel
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        sa, sb = ours.state.get(pa, {}), ref.optimizer.state.get(pb, {})
        assert sa.keys() == sb.keys(), f"{where} param {i}: state keys {sa.keys()} {sb.keys()}"
        lr = max(g["lr"] for g in ref.optimizer.param_groups)
        assert_close_rel(pa, pb, rel, f"{where} param {i}", floor=lr)
        if not sb:
            continue
        assert sa["step"].item() == sb["step"].item(), f"{where} param {i} step"
        second = sb["exp_avg_sq"].double().nan_to_num(0, 0, 0)
        grad_scale = second.sqrt().max().item() if second.numel() else 0.0
        assert_close_rel(sa["exp_avg"], sb["exp_avg"], rel, f"{where} param {i}", grad_scale)
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in sb:
                assert_close_rel(sa[key], sb[key], rel, f"{where} param {i} {key}", subnormals)
    stab_a = ours.state_dict()["gradstab"]
    stab_b = ref.stabilizer.state_dict()
    assert stab_a["keys"] == stab_b["keys"], where
    assert torch.equal(stab_a["k"], stab_b["k"]), f"{where}: k {stab_a['k']} {stab_b['k']}"
    for key in ("m", "v"):  # (the torch ops sum float32 squares in float32, in their order)
        torch.testing.assert_close(stab_a[key], stab_b[key], rtol=1e-5, atol=0, msg=where)


def run_against_composition(
    dtype,
    seed,
    backend,
    steps=STEPS,
    shapes=SHAPES,
    groups=None,
    faults=True,
    device="cpu",
    **kwargs,
):
    params_a = make_params(dtype, seed, shapes, device)
    params_b = make_params(dtype, seed, shapes, device)
    ours = fused_adamw(params_a, dtype, groups, backend, **kwargs)
    ref = composition(params_b, dtype, groups, backend, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        done = set_grads([params_a, params_b], dtype, gen, step, faults)
        user_grads = [None if p.grad is None else p.grad.clone() for p in params_a]
        ours.step()
        ref.step()
        where = f"seed={seed} step={step} faults={done}"
        for p, g in zip(params_a, user_grads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert_same_bits(p.grad, g, f"{where}: p.grad was written")
        if step % 10 == 9 or step == steps - 1:
            assert_optimizers_close(ours, params_a, ref, params_b, dtype, where)
    return ours, ref


# --------------------------------------------------------------------------------------------
# the step against the composition


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_composition_over_many_steps(dtype, backend, seed):
    run_against_composition(dtype, seed, backend, lr=1e-2, weight_decay=0.1)


VARIANTS = {
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True, "weight_decay": 0.0},
    "no_weight_decay": {"weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6},
    "small_beta1": {"betas": (0.3, 0.9)},  # torch's other lerp formula (weight >= 0.5)
    "global": {"granularity": "global"},
    "spike_guard": {"spike_guard": 3.0, "gamma1": 0.9, "gamma2": 0.99},
    "no_bias_correction": {"bias_correction": False, "stab_eps": 1e-3},
    "skip_nonfinite": {"nonfinite": "skip"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variants_match_the_composition(variant, dtype, backend, seed):
    run_against_composition(dtype, seed, backend, steps=30, lr=3e-3, **VARIANTS[variant])


def mixed_groups(params):
    """Four groups: own lr, weight decay, betas, eps; amsgrad and maximize differ too."""
    return [
        {"params": params[:2], "lr": 0.03, "weight_decay": 0.0},
        {"params": params[2:4], "lr": 1e-3, "betas": (0.5, 0.9), "eps": 1e-5},
        {"params": params[4:6], "amsgrad": True, "weight_decay": 0.3},
        {"params": params[6:], "maximize": True, "lr": 2e-3},
    ]


def uniform_groups(params):
    """Groups that differ only in lr, weight decay, betas and eps: one op call for all."""
    return [
        {"params": params[:3], "lr": 0.03, "weight_decay": 0.0},
        {"params": params[3:5], "lr": 1e-3, "betas": (0.5, 0.9), "eps": 1e-5},
        {"params": params[5:], "weight_decay": 0.3},
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
@pytest.mark.parametrize("groups", [uniform_groups, mixed_groups], ids=["uniform", "mixed"])
def test_param_groups_match_the_composition(groups, granularity, backend, seed):
    """Groups with their own hyperparameters; with amsgrad or maximize differing the step is
    split in several calls (param) or runs in torch ops (global)."""
    run_against_composition(
        torch.float32, seed, backend, steps=30, groups=groups, granularity=granularity
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params(backend, seed):
    """A transposed parameter (dense, permuted strides) and a strided slice (not dense): the
    op works on copies laid out like the parameter. (torch's own CPU AdamW(fused=True) gets
    both wrong in torch 2.13, so the reference here is the default AdamW.)"""
    gen = torch.Generator().manual_seed(seed)

    def make():
        g = torch.Generator().manual_seed(seed)
        return [
            nn.Parameter(torch.randn(9, 70_001, generator=g).t()),
            nn.Parameter(torch.randn(40, 26, generator=g)[:, ::3]),
            nn.Parameter(torch.randn(5, generator=g)),
        ]

    params_a, params_b = make(), make()
    ours = fused_adamw(params_a, torch.float32, backend=backend, amsgrad=True)
    ref = composition(params_b, torch.float32, backend=backend, amsgrad=True)
    for step in range(8):
        set_grads([params_a, params_b], torch.float32, gen, step)
        if step % 2 and params_a[0].grad is not None:  # laid out like the parameter, or not
            params_a[0].grad = params_a[0].grad.t().contiguous().t()
        ours.step()
        ref.step()
        assert_optimizers_close(ours, params_a, ref, params_b, torch.float32, f"step={step}")
    assert not params_a[0].is_contiguous() and not params_a[1].is_contiguous()


def test_default_and_foreach_inner_agree_up_to_rounding(seed):
    """The composition with torch's default, foreach and fused AdamW: all within float32
    rounding of the op (they differ from each other in the same way)."""
    for inner_kwargs in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        params_a = make_params(torch.float32, seed)
        params_b = make_params(torch.float32, seed)
        ours = gradstab.StabilizedAdamW(params_a, lr=1e-2)
        ref = gradstab.StabilizedOptimizer(torch.optim.AdamW(params_b, lr=1e-2, **inner_kwargs))
        gen = torch.Generator().manual_seed(seed)
        for step in range(20):
            set_grads([params_a, params_b], torch.float32, gen, step)
            ours.step()
            ref.step()
        assert_optimizers_close(ours, params_a, ref, params_b, torch.float32, str(inner_kwargs))


def test_zeroed_gradient_is_a_zero_gradient_step(seed):
    """nonfinite="zero": the parameter takes an AdamW step with a zero gradient (step count
    +1, moments decay, weight decay applies), like the composition; k does not count it."""
    p = nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(seed)))
    opt = gradstab.StabilizedAdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.randn(50)
    opt.step()
    before = p.detach().clone()
    m_before = opt.state[p]["exp_avg"].clone()
    p.grad = torch.full((50,), float("nan"))
    opt.step()
    state = opt.state[p]
    assert state["step"].item() == 2
    assert opt.state_dict()["gradstab"]["k"].tolist() == [1]
    torch.testing.assert_close(state["exp_avg"], m_before * 0.9, rtol=1e-6, atol=1e-9)
    expected = before * (1 - 0.1 * 0.5)
    denom = state["exp_avg_sq"].sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8
    expected = expected - 0.1 / (1 - 0.9**2) * state["exp_avg"] / denom
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert torch.isnan(p.grad).all(), "the user's gradient is left as it was"
    assert opt.last_stats.to_dict()["skipped"] == 1


def test_no_gradient_no_step(seed):
    """A parameter without a gradient is left alone: no AdamW step, no state, k unchanged."""
    params = make_params(torch.float32, seed, [(5,), (6,)])
    opt = gradstab.StabilizedAdamW(params, lr=0.1)
    params[0].grad = torch.randn(5)
    opt.step()
    assert params[1] not in opt.state
    before = params[0].detach().clone()
    params[0].grad = None
    params[1].grad = torch.randn(6)
    opt.step()
    assert torch.equal(params[0].detach(), before)
    assert opt.state[params[0]]["step"].item() == 1
    assert opt.state_dict()["gradstab"]["k"].tolist() == [1, 1]
    params[1].grad = None
    opt.step()
    assert opt.last_stats is None


# --------------------------------------------------------------------------------------------
# the compiled op


pytest_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="gradstab._C not built")


def op_lists(dtype, seed, shapes, amsgrad=False):
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dtype) for s in shapes]
    state = {
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params] if amsgrad else [],
        "steps": [torch.zeros((), dtype=torch.float32) for _ in params],
    }
    return params, grads, state


def op_args(params, grads, state, stab_state, *, amsgrad=False, maximize=False, grad_scale=None,
            found_inf=None, global_norm=False, nonfinite=0, groups=None):  # fmt: skip
    groups = groups or [len(params)]
    n = len(groups)
    return (
        params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
        state["steps"], stab_state.m, stab_state.v, stab_state.k, grad_scale, found_inf,
        groups, [1e-2] * n, [0.9] * n, [0.999] * n, [1e-2] * n, [1e-8] * n, amsgrad, maximize,
        0.6, 0.999, 1e-12, True, global_norm, nonfinite, None,
    )  # fmt: skip


@pytest_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_norms_are_the_stabilize_op_norms(dtype, seed):
    """The norm pass sums in the order of the stabilize_ op: the same norms, bit for bit, so
    both ops feed the statistics the same values."""
    shapes = [(0,), (1,), (33,), (40_000,), (70_001,), (2, 100_003)]
    params, grads, state = op_lists(dtype, seed, shapes)
    stab_state = F.init_state(grads)
    norms = torch.ops.gradstab.stabilized_adamw_(*op_args(params, grads, state, stab_state))
    copies = [g.clone() for g in grads]
    ref_state = F.init_state(copies)
    expected = F.stabilize_(copies, ref_state, backend="compiled")
    assert_same_bits(norms, expected, "norms")
    assert_same_bits(list(stab_state), list(ref_state), "m, v, k")


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(-1).view(torch.uint8).tolist()


ISA_WORKER = """
import json, sys, torch
from gradstab import _ops, functional as F
from tests.test_adamw import op_args, op_lists, bits
seed = int(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
out = {"isa": _ops._C.cpu_kernel_info()["isa"], "tensors": []}
# Every length up to 40 (all vector tails), the one-visit limit, several chunks.
shapes = [(n,) for n in range(41)] + [(65_536,), (65_537,), (3, 70_001)]
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for amsgrad, maximize, global_norm in ((False, False, False), (True, True, True)):
        params, grads, state = op_lists(dtype, seed, shapes, amsgrad)
        grads[7][3] = float("nan")  # zeroed: AdamW sees a zero gradient
        stab = F.init_state(grads, "global" if global_norm else "param")
        for _ in range(3):
            norms = torch.ops.gradstab.stabilized_adamw_(*op_args(
                params, grads, state, stab, amsgrad=amsgrad, maximize=maximize,
                global_norm=global_norm, groups=[20, len(params) - 20]))
            out["tensors"].append(bits(norms))
        for t in params + state["exp_avgs"] + state["exp_avg_sqs"] + state["max_exp_avg_sqs"]:
            out["tensors"].append(bits(t))
        out["tensors"] += [bits(t) for t in stab]
print(json.dumps(out))
"""


def run_worker(isa: str, seed: int, threads: int) -> dict:
    env = dict(os.environ, GRADSTAB_CPU_ISA=isa)
    out = subprocess.run(
        [sys.executable, "-c", ISA_WORKER, str(seed), str(threads)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest_kernel
def test_every_instruction_set_and_thread_count_gives_the_same_bits(seed):
    """The AVX2 and AVX-512 loops run adamw_element like the generic loop (NOTE: [one formula,
    three instruction sets]); the work split over threads changes no bit."""
    generic = run_worker("generic", seed, 1)
    assert generic["isa"] == "generic"
    best = _ops._C.cpu_kernel_info()["isa"]
    runs = [("generic", 3)] + [(isa, t) for isa in ("avx2", "avx512") for t in (1, 2)]
    compared = []
    for isa, threads in runs:
        other = run_worker(isa, seed, threads)
        if other["isa"] != isa:  # this CPU lacks it (GRADSTAB_CPU_ISA only lowers the choice)
            continue
        compared.append(isa)
        assert len(other["tensors"]) == len(generic["tensors"])
        for i, (a, b) in enumerate(zip(generic["tensors"], other["tensors"])):
            assert a == b, f"{isa} with {threads} threads differs from generic in result {i}"
    assert best == "generic" or best in compared


@pytest_kernel
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck(found_inf):
    params, grads, state = op_lists(torch.float32, 0, [(5, 3), (0,), (7,)])
    torch.library.opcheck(
        torch.ops.gradstab.stabilized_adamw_.default,
        op_args(params, grads, state, F.init_state(grads), found_inf=torch.tensor(found_inf)),
    )
    params, grads, state = op_lists(torch.bfloat16, 1, [(4,), (9, 2)], amsgrad=True)
    torch.library.opcheck(
        torch.ops.gradstab.stabilized_adamw_.default,
        op_args(params, grads, state, F.init_state(grads, "global"), amsgrad=True, maximize=True,
                grad_scale=torch.tensor(8.0), found_inf=torch.tensor(found_inf),
                global_norm=True),
    )  # fmt: skip


@pytest_kernel
def test_op_bumps_version_counters_and_refuses_grad_mode(seed):
    """Autograd must see the in-place writes (NOTE: [no autograd for stabilize_]), and a param
    that requires grad may only be stepped under no_grad, as torch's optimizers do."""
    params, grads, state = op_lists(torch.float32, seed, [(5, 3), (7,)], amsgrad=True)
    stab_state = F.init_state(grads)
    written = [*params, *state["exp_avgs"], *state["exp_avg_sqs"], *state["max_exp_avg_sqs"],
               *state["steps"], *stab_state]  # fmt: skip
    before = [t._version for t in written]
    torch.ops.gradstab.stabilized_adamw_(*op_args(params, grads, state, stab_state, amsgrad=True))
    assert all(t._version > b for t, b in zip(written, before))

    params[1].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"params\[1\] requires grad"):
        torch.ops.gradstab.stabilized_adamw_(
            *op_args(params, grads, state, stab_state, amsgrad=True)
        )
    assert stab_state.k.tolist() == [1, 1]
    with torch.no_grad():
        torch.ops.gradstab.stabilized_adamw_(
            *op_args(params, grads, state, stab_state, amsgrad=True)
        )
    assert stab_state.k.tolist() == [2, 2]


@pytest_kernel
def test_op_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        params, grads, state = op_lists(torch.float32, 0, [(5,), (2, 2)])
        args = op_args(params, grads, state, F.init_state(grads))
        fake = tuple(
            [mode.from_tensor(t) for t in a]
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a)
            for a in args
        )
        out = torch.ops.gradstab.stabilized_adamw_(*fake)
    assert out.shape == (2,) and out.dtype == torch.float64


@pytest_kernel
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.__setitem__(1, a[1][:1]), r"grads has 1 tensors, expected 2"),
        (lambda a: a[1].__setitem__(1, a[1][1].double()), r"grads\[1\] has dtype Double but "),
        (lambda a: a[1].__setitem__(0, a[1][0][:2]), r"grads\[0\] has shape \[2\] but params"),
        (lambda a: a[5].__setitem__(1, torch.zeros((), dtype=torch.float64)), r"state_steps\[1\]"),
        (lambda a: a.__setitem__(4, [torch.zeros(3)]), r"max_exp_avg_sqs \(no amsgrad\) has 1"),
        (lambda a: a.__setitem__(6, torch.zeros(3, dtype=torch.float64)), r"m must be a contig"),
        (lambda a: a.__setitem__(11, [3]), r"group_sizes add up to more than the 2"),
        (lambda a: a.__setitem__(12, [0.1, 0.2]), r"lr has 2 entries but group_sizes has 1"),
        (lambda a: a.__setitem__(13, [1.0]), r"beta1\[0\] must be in \[0, 1\)"),
        (lambda a: a.__setitem__(15, [-1.0]), r"weight_decay\[0\] must be >= 0"),
        (lambda a: a.__setitem__(21, 0.0), r"stab_eps must be a finite number > 0"),
        (lambda a: a.__setitem__(10, torch.zeros(2)), r"found_inf must be a one-element"),
        (lambda a: a[0].__setitem__(0, torch.zeros(1).expand(5)), r"params\[0\] has elements"),
    ],
)
def test_op_bad_arguments_are_named_and_change_nothing(change, message):
    params, grads, state = op_lists(torch.float32, 0, [(5,), (3,)])
    args = list(op_args(params, grads, state, F.init_state(grads)))
    args = [list(a) if isinstance(a, list) else a for a in args]
    before = copy.deepcopy(args)
    change(args)
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.gradstab.stabilized_adamw_(*args)
    for a, b in zip(args, before):
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and a.shape == b.shape:
            assert_same_bits(a, b, "after a refused call")


# --------------------------------------------------------------------------------------------
# the optimizer around it


def test_is_a_real_optimizer_with_the_documented_defaults():
    p = [nn.Parameter(torch.randn(3))]
    opt = gradstab.StabilizedAdamW(p)
    assert isinstance(opt, torch.optim.Optimizer)
    assert "StabilizedAdamW" in gradstab.__all__
    assert opt.defaults == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "amsgrad": False,
        "maximize": False,
    }
    assert (opt.gamma1, opt.gamma2, opt.stab_eps, opt.bias_correction) == (0.6, 0.999, 1e-12, True)
    assert (opt.granularity, opt.nonfinite, opt.spike_guard) == ("param", "zero", None)
    assert opt._step_supports_amp_scaling
    assert "gamma1=0.6" in repr(opt) and "lr: 0.001" in repr(opt)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, r"lr must be >= 0"),
        ({"lr": "fast"}, TypeError, r"lr must be a float"),
        ({"betas": (0.9,)}, TypeError, r"betas must be a pair"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0.0, 1.0\)"),
        ({"eps": -1e-8}, ValueError, r"eps must be >= 0"),
        ({"weight_decay": float("nan")}, ValueError, r"weight_decay must be >= 0"),
        ({"amsgrad": 1}, TypeError, r"amsgrad must be a bool"),
        ({"gamma1": 1.0}, ValueError, r"gamma1"),
        ({"gamma2": -0.1}, ValueError, r"gamma2"),
        ({"stab_eps": 0.0}, ValueError, r"stab_eps must be in \(0, 1\)"),
        ({"stab_eps": 1e300}, ValueError, r"stab_eps must be in \(0, 1\)"),
        ({"granularity": "tensor"}, ValueError, r"granularity"),
        ({"nonfinite": "ignore"}, ValueError, r"nonfinite"),
        ({"spike_guard": -1.0}, ValueError, r"spike_guard"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        gradstab.StabilizedAdamW([nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_groups_and_gradients_are_named_and_change_nothing(seed):
    params = make_params(torch.float32, seed, [(4,), (3,)])
    opt = gradstab.StabilizedAdamW(params[:1])
    with pytest.raises(ValueError, match=r"param_groups\[1\] lr must be >= 0"):
        opt.add_param_group({"params": params[1:], "lr": -2.0})
    with pytest.raises(ValueError, match=r"param_groups\[1\] sets \['gamma1'\]"):
        opt.add_param_group({"params": params[1:], "gamma1": 0.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:], "lr": 0.5})
    params[0].grad = torch.randn(4).to_sparse()
    params[1].grad = torch.randn(3)
    before = snapshot_params(params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] has a .*sparse"):
        opt.step()
    assert_same_bits(snapshot_params(params), before, "after a refused step")
    assert opt.state_dict()["state"] == {}


def snapshot_params(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_raise_names_the_parameter_and_changes_nothing(backend, seed):
    params = make_params(torch.float32, seed, [(4,), (70_001,), (3,)])
    opt = fused_adamw(
        [{"params": params[:2]}, {"params": params[2:], "maximize": True}],
        torch.float32,
        backend=backend,
        nonfinite="raise",
    )
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    weights = snapshot_params(params)
    params[1].grad[5] = float("inf")
    params[2].grad[0] = float("nan")
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    assert "param_groups[0]['params'][1]" in str(info.value)
    assert "param_groups[1]['params'][0]" in str(info.value)
    assert_same_bits(snapshot_params(params), weights, "weights")
    assert_same_bits(opt.state_dict(), before, "state")


def test_step_closure_and_zero_grad(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2)
    x, y = batches(seed, 1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_last_stats_are_the_steps_figures(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=0.0)
    loss_fn(model, *batches(seed, 1)[0]).backward()
    before = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    copies = [p.grad.clone() for p in model.parameters()]
    F.stabilize_(copies, F.init_state(copies))
    after = torch.sqrt(sum(g.double().square().sum() for g in copies))
    opt.step()
    figures = opt.last_stats.to_dict()
    assert figures["norm_before"] == pytest.approx(before.item(), rel=1e-5)
    assert figures["norm_after"] == pytest.approx(after.item(), rel=1e-5)
    assert figures["skipped"] == 0


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ],
    ids=["step", "onecycle", "cosine"],
)
def test_lr_schedulers(make_scheduler, seed):
    model_a, model_b = mlp(seed), mlp(seed)
    groups_a = [
        {"params": list(model_a.parameters())[:2], "weight_decay": 0.0},
        {"params": list(model_a.parameters())[2:], "lr": 0.05},
    ]
    groups_b = [
        {"params": list(model_b.parameters())[:2], "weight_decay": 0.0},
        {"params": list(model_b.parameters())[2:], "lr": 0.05},
    ]
    ours = gradstab.StabilizedAdamW(groups_a, lr=0.1)
    ref = gradstab.StabilizedOptimizer(torch.optim.AdamW(groups_b, lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched_a, sched_b = make_scheduler(ours), make_scheduler(ref)
        for x, y in batches(seed, 8):
            for model, opt in ((model_a, ours), (model_b, ref)):
                opt.zero_grad()
                loss_fn(model, x, y).backward()
                opt.step()
            sched_a.step()
            sched_b.step()
            assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert_close_rel(a, b, 2e-5, name)


def test_add_param_group_takes_the_next_positions(seed):
    params_a = make_params(torch.float32, seed, [(4,), (5,), (70_001,)])
    params_b = make_params(torch.float32, seed, [(4,), (5,), (70_001,)])
    ours = gradstab.StabilizedAdamW(params_a[:1], lr=0.01)
    ref = gradstab.StabilizedOptimizer(torch.optim.AdamW(params_b[:1], lr=0.01))
    gen = torch.Generator().manual_seed(seed)
    for step in range(8):
        if step == 3:
            ours.add_param_group({"params": params_a[1:], "lr": 0.03, "amsgrad": True})
            ref.add_param_group({"params": params_b[1:], "lr": 0.03, "amsgrad": True})
        set_grads([params_a, params_b], torch.float32, gen, step, faults=False)
        ours.step()
        ref.step()
    assert ours.state_dict()["gradstab"]["keys"] == [0, 1, 2]
    assert ours.state_dict()["gradstab"]["k"].tolist() == [8, 5, 5]
    assert_optimizers_close(ours, params_a, ref, params_b, torch.float32, "after add_param_group")


# --------------------------------------------------------------------------------------------
# checkpoints


def train(opt, model, data, spike_at=()) -> None:
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if step in spike_at:
            for p in model.parameters():
                p.grad.mul_(1e4)
        opt.step()


def test_state_dict_round_trip_continues_bit_for_bit(seed):
    data = batches(seed, 10)
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2, amsgrad=True, spike_guard=5.0)
    train(opt, model, data, spike_at=(2,))

    resumed = mlp(seed)
    opt_a = gradstab.StabilizedAdamW(resumed.parameters(), lr=1e-2, amsgrad=True, spike_guard=5.0)
    train(opt_a, resumed, data[:4], spike_at=(2,))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert set(saved["opt"]) == {"state", "param_groups", "gradstab"}
    assert set(saved["opt"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}

    fresh = mlp(seed + 1)
    fresh.load_state_dict(saved["model"])
    opt_b = gradstab.StabilizedAdamW(fresh.parameters(), lr=0.5, amsgrad=True)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.spike_guard == 5.0 and opt_b.param_groups[0]["lr"] == 1e-2
    train(opt_b, fresh, data[4:])
    assert_same_bits(snapshot(fresh), snapshot(model), "weights")
    assert_same_bits(opt_b.state_dict(), opt.state_dict(), "optimizer + stabilizer")


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path, seed):
    worker = [sys.executable, str(ROOT / "tests" / "adamw_resume_worker.py")]
    full, half, resumed = tmp_path / "full.pt", tmp_path / "half.pt", tmp_path / "resumed.pt"
    for args in (
        ["--start", "0", "--stop", "14", "--out", str(full)],
        ["--start", "0", "--stop", "6", "--out", str(half)],
        ["--start", "6", "--stop", "14", "--resume", str(half), "--out", str(resumed)],
    ):
        subprocess.run([*worker, "--seed", str(seed), *args], cwd=ROOT, check=True)
    a, b = torch.load(full), torch.load(resumed)
    assert_same_bits(a, b, "uninterrupted vs resumed")
    assert b["opt"]["gradstab"]["k"].min().item() > 0


def test_checkpoints_move_between_the_composition_and_the_fused_optimizer(seed):
    """The state dicts share one layout: a StabilizedOptimizer(AdamW) checkpoint continues in
    StabilizedAdamW (and the other way round), and a plain AdamW loads either."""
    data = batches(seed, 8)
    model_a, model_b = mlp(seed), mlp(seed)
    ref = gradstab.StabilizedOptimizer(torch.optim.AdamW(model_a.parameters(), lr=1e-2))
    train(ref, model_a, data[:4])
    ours = gradstab.StabilizedAdamW(model_b.parameters(), lr=1e-2)
    model_b.load_state_dict(model_a.state_dict())
    # (A live optimizer's state dict holds its very tensors, and load_state_dict keeps tensors
    # that need no cast: copy, as a checkpoint on disk would.)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert all(s["step"].dtype == torch.float32 for s in ours.state.values())
    train(ref, model_a, data[4:])
    train(ours, model_b, data[4:])
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert_close_rel(b, a, 2e-5, name)
    back = gradstab.StabilizedOptimizer(torch.optim.AdamW(mlp(seed).parameters(), lr=1e-2))
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert_same_bits(back.stabilizer.state_dict(), ours.state_dict()["gradstab"], "stabilizer")
    plain = torch.optim.AdamW(mlp(seed).parameters(), lr=1e-2)
    plain.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert_same_bits(plain.state_dict()["state"], ours.state_dict()["state"], "adam state")
    # A plain AdamW checkpoint loads too; the stabilizer starts fresh.
    ours.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert ours.state_dict()["gradstab"]["keys"] == []


def test_bad_state_dict_is_refused_before_anything_changes(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2)
    train(opt, model, batches(seed, 3))
    good = opt.state_dict()
    before = copy.deepcopy(good)
    bad = copy.deepcopy(good)
    bad["gradstab"]["config"]["gamma2"] = 1.5
    bad["state"][0]["exp_avg"].fill_(123.0)
    with pytest.raises(ValueError, match="gamma2"):
        opt.load_state_dict(bad)
    assert_same_bits(opt.state_dict(), before, "after a refused load")
    mismatched = copy.deepcopy(good)
    mismatched["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError):
        opt.load_state_dict(mismatched)
    assert_same_bits(opt.state_dict(), before, "after a refused load")
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([good])


def test_pickle_and_deepcopy(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2, spike_guard=4.0)
    train(opt, model, batches(seed, 2))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, gradstab.StabilizedAdamW)
        assert clone.spike_guard == 4.0
        assert_same_bits(clone.state_dict(), opt.state_dict(), "clone")


# --------------------------------------------------------------------------------------------
# AMP (GradScaler on the CPU)

INIT_SCALE = 2.0**12


def amp_run(data, seed, *, scaled, who="scaler", overflow_at=None, backend="compiled"):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2, amsgrad=True)
    opt._backend = "torch" if backend == "torch" else "auto"
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=scaled)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == overflow_at:
            next(iter(model.parameters())).grad[0, 0] = float("inf")
        if who == "user":
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return {"weights": snapshot(model), "opt": opt.state_dict()}, scaler


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["scaler", "user"])
def test_scaled_fp32_run_equals_unscaled_bit_for_bit(who, backend, seed):
    data = batches(seed, 8)
    data[4] = (data[4][0] * 30.0, data[4][1])  # a loss spike
    scaled, _ = amp_run(data, seed, scaled=True, who=who, backend=backend)
    plain, _ = amp_run(data, seed, scaled=False, who=who, backend=backend)
    assert_same_bits(scaled, plain, "scaled vs unscaled")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["scaler", "user"])
@pytest.mark.parametrize("overflow_at", [0, 3])
def test_skipped_overflow_step_leaves_no_trace(overflow_at, who, backend, seed):
    data = batches(seed, 7)
    skipped, scaler = amp_run(data, seed, scaled=True, who=who, overflow_at=overflow_at,
                              backend=backend)  # fmt: skip
    never_seen = data[:overflow_at] + data[overflow_at + 1 :]
    reference, _ = amp_run(never_seen, seed, scaled=False, backend=backend)
    assert_same_bits(skipped, reference, "run with a skipped step vs run without that batch")
    assert scaler.get_scale() == INIT_SCALE / 2, "the scaler did skip the step"


def test_no_host_sync_in_the_amp_step(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    counter = SyncCounter()
    for step, (x, y) in enumerate(batches(seed, 5)):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == 3:
            next(iter(model.parameters())).grad[0, 0] = float("inf")
        if step == 0:  # the first step creates the state
            scaler.step(opt)
            scaler.update()
            continue
        with counter.active():
            scaler.step(opt)
            scaler.update()
    assert counter.calls == [], counter.calls
    assert opt.state_dict()["gradstab"]["k"].tolist() == [4, 4, 4, 4]  # 5 steps, 1 skipped
    assert all(s["step"].item() == 4 for s in opt.state.values())


def test_fp16_autocast_counts_only_the_steps_taken(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    taken = 0
    for x, y in batches(seed, 12):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(torch.nn.functional.mse_loss(out.float(), y)).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        taken += scaler.get_scale() >= scale
    assert 0 < taken < 12, "the test needs both skipped and taken steps"
    assert opt.state_dict()["gradstab"]["k"].tolist() == [taken] * 4
    assert all(s["step"].item() == taken for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the benchmark preset

TINY_ADAMW = bench.Preset(
    "tiny-adamw-test",
    "cpu",
    "a few odd shapes, for the tests",
    lambda: [(3, 5), (7,), (0,), (70_001,), (33, 17)],
    torch.float32,
    kind="adamw",
    make_workload=bench.adamw_workload,
)


@pytest.fixture
def tiny_adamw_preset():
    bench.register_preset(TINY_ADAMW)
    yield TINY_ADAMW
    del bench.PRESETS["cpu"][TINY_ADAMW.name]


def test_bench_adamw_presets_are_the_models():
    for device, name in (("cpu", "gpt2-small"), ("cuda", "llama-1b"), ("cuda", "llama-7b")):
        preset = bench.PRESETS[device][f"{name}-adamw"]
        assert preset.kind == "adamw"
        assert preset.shapes() == bench.PRESETS[device][name].shapes()
        assert preset.dtype == bench.PRESETS[device][name].dtype


def test_bench_adamw_implementations_take_the_same_step(tiny_adamw_preset):
    """From the same parameters and gradients: the composition and StabilizedAdamW agree,
    plain AdamW and clipping do something else."""
    device = torch.device("cpu")
    params = {}
    for name, impl in bench.IMPLEMENTATIONS.items():
        if "adamw" not in impl.kinds or impl.unavailable(device) is not None:
            continue
        w = tiny_adamw_preset.build(device)
        assert w.floor_bytes == 8 * sum(g.numel() * 4 for g in w.tensors)
        step = impl.setup(w, device)
        w.restore()
        step()
        params[name] = [p.clone() for p in w.params]
    assert set(params) >= {"adamw_fused", "adamw_foreach_clip", "stabilized_optimizer"}
    if "stabilized_adamw" in params:
        for a, b in zip(params["stabilized_adamw"], params["stabilized_optimizer"]):
            assert_close_rel(a, b, 1e-6, "StabilizedAdamW vs the composition")
    differs = [
        not torch.allclose(a, b)
        for a, b in zip(params["adamw_fused"], params["stabilized_optimizer"])
    ]
    assert any(differs)


def test_bench_adamw_table_and_records(tiny_adamw_preset):
    runs, info = bench.run("cpu", ["tiny-adamw-test"], None, repeats=2)
    (pr,) = runs
    expected = {"adamw_fused", "adamw_foreach_clip", "stabilized_optimizer", "stabilized_adamw"}
    assert set(pr.results) == expected | {bench.FLOOR}
    rows = {r["implementation"]: r for r in bench.records(runs, info)}
    assert rows["adamw_fused"]["reference"] == "adamw_fused"
    assert rows["adamw_fused"]["vs_reference"] == 1.0
    assert rows["adamw_foreach_clip"]["baseline_speedup"] == 1.0
    table = bench.markdown(runs, info, 2)
    assert "| preset | implementation | median ms | vs AdamW(fused) |" in table
    assert "| tiny-adamw-test | stabilized_adamw |" in table
