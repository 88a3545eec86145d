"""The CUDA kernel of gradstab::stabilized_adamw_ (csrc/cuda/adamw.cu).

Skipped without a GPU. The CPU tests of StabilizedAdamW (tests/test_adamw.py) run here on CUDA
against ``StabilizedOptimizer(torch.optim.AdamW(...))`` on CUDA; besides, what only the GPU path
has: no host sync with GradScaler's tensors, CUDA graph capture and replay, unaligned data,
mixed dtypes in one call, agreement with the CPU kernel, identical bits on two runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradstab
from gradstab import _ops
from gradstab import functional as F
from tests.conftest import DTYPES
from tests.test_adamw import (
    BACKENDS,
    SHAPES,
    VARIANTS,
    assert_close_rel,
    mixed_groups,
    op_args,
    op_lists,
    run_against_composition,
)
from tests.training_helpers import assert_same_bits, batches, loss_fn, mlp, snapshot

HAS_CUDA_KERNEL = torch.cuda.is_available() and _ops.has_kernel("cuda", "stabilized_adamw_")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a GPU and gradstab built with CUDA"),
]
DEVICE = "cuda"
CHUNK = 1 << 16  # kChunkElems of csrc/cuda/multi_tensor_plan.h
# Around the CUDA chunk and pack edges, besides the CPU test's shapes.
CUDA_SHAPES = [*SHAPES, (CHUNK - 1,), (CHUNK + 1,), (3 * CHUNK + 5,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_composition_over_many_steps(dtype, backend, seed):
    run_against_composition(
        dtype, seed, backend, shapes=CUDA_SHAPES, device=DEVICE, lr=1e-2, weight_decay=0.1
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variants_match_the_composition(variant, dtype, seed):
    run_against_composition(
        dtype, seed, "compiled", steps=30, device=DEVICE, lr=3e-3, **VARIANTS[variant]
    )


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_param_groups_match_the_composition(granularity, seed):
    run_against_composition(
        torch.float32,
        seed,
        "compiled",
        steps=30,
        groups=mixed_groups,
        device=DEVICE,
        granularity=granularity,
    )


def cuda_op_lists(dtype, seed, shapes, amsgrad=False, offset=0):
    """op_lists on the GPU; with ``offset``, every tensor starts ``offset`` elements into a
    larger buffer (data off the 16-byte boundary: the element-by-element path)."""
    params, grads, state = op_lists(dtype, seed, shapes, amsgrad)

    def moved(t: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=DEVICE)
        out = buffer[offset:].view(t.shape)
        out.copy_(t)
        return out

    state = {key: [moved(t) for t in value] for key, value in state.items()}
    state["steps"] = [s.to(DEVICE) for s in state["steps"]]
    return [moved(p) for p in params], [moved(g) for g in grads], state


def run_op(params, grads, state, stab, **kwargs):
    return torch.ops.gradstab.stabilized_adamw_(*op_args(params, grads, state, stab, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cpu_and_cuda_agree(dtype, amsgrad, seed):
    """The same inputs on both devices: the same norms (up to the summation order) and the
    same updates up to rounding; with data off the 16-byte boundary too."""
    shapes = [(0,), (1,), (7,), (1023,), (CHUNK + 3,), (2, 70_001)]
    for offset in (0, 1):
        cpu = op_lists(dtype, seed, shapes, amsgrad)
        gpu = cuda_op_lists(dtype, seed, shapes, amsgrad, offset)
        stab_cpu = F.init_state(cpu[1])
        stab_gpu = F.init_state(gpu[1], device=DEVICE)
        for step in range(3):
            norms_cpu = run_op(*cpu, stab_cpu, amsgrad=amsgrad, maximize=step == 1)
            norms_gpu = run_op(*gpu, stab_gpu, amsgrad=amsgrad, maximize=step == 1)
            where = f"seed={seed} offset={offset} step={step}"
            torch.testing.assert_close(
                norms_gpu.cpu().double(), norms_cpu.double(), rtol=1e-6, atol=0, msg=where
            )
            for a, b in zip(stab_gpu, stab_cpu):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=0, msg=where)
            rel = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
            for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
                for a, b in zip(gpu[2][key], cpu[2][key]):
                    assert_close_rel(a.cpu(), b, rel, f"{where} {key}")
            for a, b in zip(gpu[0], cpu[0]):
                assert_close_rel(a.cpu(), b, rel, f"{where} params", floor=1e-2)
            assert [s.item() for s in gpu[2]["steps"]] == [s.item() for s in cpu[2]["steps"]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_same_norms_give_the_cpu_bits(dtype, amsgrad, seed):
    """Gradients whose norms are exact in any order of summation (small integers times 2^-7):
    the GPU gives the CPU's weights, moments, step counts and stabilizer state bit for bit
    (docs/cuda.md), with a loss scale, maximize, a zeroed NaN gradient, and off the 16-byte
    boundary. The step counts start at 493, where glibc's pow(0.9999, 494) and integer_power
    differ in the last bit of 1 - beta2^step."""
    shapes = [(0,), (1,), (7,), (1023,), (CHUNK + 3,), (2, 70_001)]
    for offset in (0, 1):
        cpu = op_lists(dtype, seed, shapes, amsgrad)
        gpu = cuda_op_lists(dtype, seed, shapes, amsgrad, offset)
        for steps in (cpu[2]["steps"], gpu[2]["steps"]):
            for s in steps:
                s.fill_(493.0)
        stab_cpu = F.init_state(cpu[1])
        stab_gpu = F.init_state(gpu[1], device=DEVICE)
        gen = torch.Generator().manual_seed(seed)
        for step in range(4):
            for g_cpu, g_gpu in zip(cpu[1], gpu[1]):
                ints = torch.randint(-64, 65, g_cpu.shape, generator=gen, dtype=torch.float64)
                exact = (ints * 2.0**-7 * (3.0 if step == 2 else 1.0)).to(dtype)
                g_cpu.copy_(exact)
                g_gpu.copy_(exact)
            if step == 3:
                cpu[1][2].view(-1)[0] = float("nan")
                gpu[1][2].view(-1)[0] = float("nan")
            scale = 3.0 if step == 2 else None  # a loss scale that is not a power of two
            kwargs = {"amsgrad": amsgrad, "maximize": step == 1}
            norms_cpu = run_op(
                *cpu, stab_cpu, grad_scale=None if scale is None else torch.tensor(scale), **kwargs
            )
            norms_gpu = run_op(
                *gpu,
                stab_gpu,
                grad_scale=None if scale is None else torch.tensor(scale, device=DEVICE),
                **kwargs,
            )
            where = f"seed={seed} offset={offset} step={step}"
            assert_same_bits(norms_gpu.cpu().to(norms_cpu.dtype), norms_cpu, f"{where} norms")
            assert_same_bits(list(stab_gpu), list(stab_cpu), f"{where} m, v, k")
            assert_same_bits(gpu[0], cpu[0], f"{where} params")
            assert_same_bits(gpu[2], cpu[2], f"{where} moments and steps")


def test_mixed_dtypes_in_one_call(seed):
    """The op takes float32, float64, float16 and bfloat16 params together (each tensor is
    switched on its own dtype); each comes out as it does alone."""
    shapes = [(5, 3), (CHUNK + 9,), (0,), (1000,)]
    together, alone = [], []
    for dtype in DTYPES:
        together.append(cuda_op_lists(dtype, seed, shapes))
        alone.append(cuda_op_lists(dtype, seed, shapes))
    params = [t for lists in together for t in lists[0]]
    grads = [t for lists in together for t in lists[1]]
    state = {key: [t for lists in together for t in lists[2][key]] for key in together[0][2]}
    stab = F.init_state(grads, device=DEVICE)
    run_op(params, grads, state, stab)
    for i, lists in enumerate(alone):
        part = F.init_state(lists[1], device=DEVICE)
        run_op(*lists, part)
        n = len(shapes)
        for a, b in zip(params[i * n : (i + 1) * n], lists[0]):
            assert_same_bits(a, b, f"{DTYPES[i]} params")
        assert_same_bits(stab.m[i * n : (i + 1) * n], part.m, f"{DTYPES[i]} m")


def test_two_runs_give_identical_bits(seed):
    results = []
    for _ in range(2):
        params, grads, state = cuda_op_lists(torch.bfloat16, seed, CUDA_SHAPES, amsgrad=True)
        stab = F.init_state(grads, "global", device=DEVICE)
        out = [run_op(params, grads, state, stab, amsgrad=True, global_norm=True) for _ in range(3)]
        results.append(out + params + state["exp_avgs"] + list(stab))
    assert_same_bits(results[0], results[1], "two runs")


@pytest.mark.parametrize("how", ["scaler", "user"])
def test_amp_step_without_host_sync(how, seed):
    """GradScaler hands the step grad_scale and found_inf: no host sync, a skipped step leaves
    nothing behind, and the scaled run equals the unscaled one."""
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(seed, 6)]

    def train(scaled: bool, overflow_at: int | None = None, drop: int | None = None):
        model = mlp(seed).to(DEVICE)
        opt = gradstab.StabilizedAdamW(model.parameters(), lr=1e-2, amsgrad=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, enabled=scaled)
        for step, (x, y) in enumerate(data):
            if step == drop:
                continue
            opt.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            if step == overflow_at:
                next(iter(model.parameters())).grad[0, 0] = float("inf")
            if how == "user":
                scaler.unscale_(opt)
            watch = scaled and how == "scaler" and step > 0  # the first step creates the state
            if watch:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
                scaler.update()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return {"weights": snapshot(model), "opt": opt.state_dict()}

    assert_same_bits(train(True), train(False), "scaled vs unscaled")
    assert_same_bits(train(True, overflow_at=3), train(False, drop=3), "skipped vs never seen")


def warm_up() -> None:
    """Loads the kernels outside any capture, as PyTorch advises before capturing."""
    params, grads, state = cuda_op_lists(torch.float32, 0, [(10,)])
    run_op(params, grads, state, F.init_state(grads, device=DEVICE))
    torch.cuda.synchronize()


def test_cuda_graph_capture_and_replay(seed):
    """The op captured once and replayed on new gradients gives the bits of eager calls."""
    shapes = [(70_001,), (33, 17), (0,), (5,), (3 * CHUNK + 3,)]
    static = cuda_op_lists(torch.float32, seed, shapes, amsgrad=True)
    eager = cuda_op_lists(torch.float32, seed, shapes, amsgrad=True)
    static_found_inf = torch.zeros((), device=DEVICE)
    static_stab = F.init_state(static[1], device=DEVICE)
    eager_stab = F.init_state(eager[1], device=DEVICE)
    warm_up()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_norms = run_op(*static, static_stab, amsgrad=True, found_inf=static_found_inf)
    assert not static_stab.k.any(), "capturing must not run the step"
    gen = torch.Generator().manual_seed(seed)
    for step in range(6):
        fresh = [torch.randn(s, generator=gen) * 10.0 ** (step % 3) for s in shapes]
        if step == 2:
            fresh[1][0, 0] = float("nan")
        static_found_inf.fill_(float(step == 4))
        for s, e, f in zip(static[1], eager[1], fresh):
            s.copy_(f)
            e.copy_(f)
        graph.replay()
        eager_norms = run_op(*eager, eager_stab, amsgrad=True, found_inf=static_found_inf)
        where = f"seed={seed} step={step}"
        assert_same_bits(static_norms, eager_norms, where)
        assert_same_bits(static[0], eager[0], f"{where} params")
        assert_same_bits(static[2], eager[2], f"{where} state")
        assert_same_bits(list(static_stab), list(eager_stab), f"{where} stabilizer")
    assert static[2]["steps"][0].item() == 5  # six steps, one skipped


def test_raise_policy_names_the_tensor_and_changes_nothing(seed):
    params, grads, state = cuda_op_lists(torch.float32, seed, [(10,), (CHUNK + 1,)])
    stab = F.init_state(grads, device=DEVICE)
    grads[1][7] = float("inf")
    before = copy.deepcopy([params, state, list(stab)])
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        run_op(params, grads, state, stab, nonfinite=2)
    assert_same_bits([params, state, list(stab)], before, "after a refused step")


def test_opcheck():
    params, grads, state = cuda_op_lists(torch.bfloat16, 0, [(4,), (9, 2), (0,)], amsgrad=True)
    torch.library.opcheck(
        torch.ops.gradstab.stabilized_adamw_.default,
        op_args(
            params,
            grads,
            state,
            F.init_state(grads, device=DEVICE),
            amsgrad=True,
            grad_scale=torch.tensor(8.0, device=DEVICE),
            found_inf=torch.tensor(0.0, device=DEVICE),
        ),
    )


def test_optimizer_on_cuda_keeps_its_state_there(seed):
    model = mlp(seed).to(DEVICE)
    opt = gradstab.StabilizedAdamW(model.parameters())
    x, y = batches(seed, 1)[0]
    loss_fn(model, x.to(DEVICE), y.to(DEVICE)).backward()
    opt.step()
    for state in opt.state.values():
        assert all(t.device.type == "cuda" for t in state.values())
        assert state["step"].dtype == torch.float32
    assert opt.state_dict()["gradstab"]["k"].tolist() == [1, 1, 1, 1]
