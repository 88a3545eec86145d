"""The CUDA kernel of gradstab::stabilize_ (csrc/cuda/) against the float64 reference.

Skipped without a GPU. Besides the contract tests of the CPU kernel this checks what only the GPU
path has: CUDA graph capture and replay, no host sync, the number of launches, very long lists,
a tensor of more than 2^31 elements, a second device, unaligned data, and agreement with the CPU:
from the same norms, the CPU's bits (docs/cuda.md; the CPU half of that is
tests/test_cuda_shared_math.py), and a state that moves between the devices.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradstab
from gradstab import _ops
from gradstab import functional as F
from tests.conftest import DTYPES, RTOL
from tests.helpers import assert_grads_close, inject_faults, random_grads, to_device
from tests.reference import ReferenceStabilizer
from tests.test_contract import run_against_reference

HAS_CUDA_KERNEL = torch.cuda.is_available() and _ops.has_kernel("cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a GPU and gradstab built with CUDA"),
]
DEVICE = "cuda"
CHUNK = 1 << 16  # kChunkElems of csrc/cuda/multi_tensor_plan.h


def stabilize(grads, state, **kwargs):
    return F.stabilize_(grads, state, backend="compiled", **kwargs)


def check_against_reference(grads, state, ref, where, found_inf=None, **config):
    """One step of the op and of the reference on the same grads; compares everything."""
    expected, ref_norms = ref.step(grads, found_inf=bool(found_inf is not None and found_inf > 0))
    norms = stabilize(grads, state, found_inf=found_inf, **config)
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_grads_close([g], [e], g.dtype, f"{where} grads[{i}] {g.dtype}")
    torch.testing.assert_close(
        norms.cpu().double(),
        torch.tensor(ref_norms, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
        equal_nan=True,
        msg=lambda m: f"{where}, norms: {m}",
    )
    m, v, k = (t.cpu() for t in state)
    ref_m = torch.tensor([s.m for s in ref.states], dtype=torch.float64)
    ref_v = torch.tensor([s.v for s in ref.states], dtype=torch.float64)
    torch.testing.assert_close(m, ref_m, rtol=1e-9, atol=0, msg=lambda e: f"{where}, m: {e}")
    torch.testing.assert_close(v, ref_v, rtol=1e-9, atol=0, msg=lambda e: f"{where}, v: {e}")
    assert k.tolist() == [s.k for s in ref.states], where
    return norms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_matches_reference(dtype, granularity, nonfinite, seed):
    run_against_reference(
        "compiled", dtype, seed, device=DEVICE, granularity=granularity, nonfinite=nonfinite
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_spike_guard_matches_reference(dtype, granularity, seed):
    run_against_reference(
        "compiled", dtype, seed, device=DEVICE, granularity=granularity, spike_guard=3.0
    )


@pytest.mark.parametrize(
    "config",
    [
        {"gamma1": 0.0, "gamma2": 0.0},
        {"gamma1": 0.9, "gamma2": 0.99, "bias_correction": False},
        {"eps": 1e-3},
        {"gamma1": 0.999999, "gamma2": 0.999999, "spike_guard": 1.0},
    ],
    ids=["gammas0", "no_bias_correction", "large_eps", "extreme_gammas"],
)
def test_other_configs_match_reference(config, seed):
    run_against_reference("compiled", torch.float32, seed, device=DEVICE, **config)


EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 2047, 2048, 2049, 8191, 8193]
EDGE_SIZES += [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 1_000_003]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_sizes_and_alignments(dtype, offset, seed):
    """Vector widths, unroll batches, chunk edges; data starting off a 16-byte boundary."""
    gen = torch.Generator().manual_seed(seed)

    def make(numel: int) -> torch.Tensor:
        base = torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 7
        return base.to(dtype).to(DEVICE)[offset:]  # dense, data_ptr shifted by `offset` elements

    grads = [make(n) for n in EDGE_SIZES]
    state = F.init_state(grads, device=DEVICE)
    ref = ReferenceStabilizer(len(grads))
    for step in range(3):
        grads = [make(n) for n in EDGE_SIZES]
        check_against_reference(grads, state, ref, f"seed={seed} step={step}")


def test_mixed_dtypes_in_one_list(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (1000,), (0,), (70_001,), (33, 17), (1,)]

    def make() -> list[torch.Tensor]:
        grads = []
        for i, shape in enumerate(shapes):
            dtype = DTYPES[i % len(DTYPES)]
            g = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
            grads.append(g.to(dtype).to(DEVICE))
        return grads

    for granularity in ("param", "global"):
        state = F.init_state(make(), granularity, device=DEVICE)
        ref = ReferenceStabilizer(len(shapes), granularity=granularity)
        for step in range(4):
            grads = make()
            inject_faults(grads, gen)
            check_against_reference(
                grads, state, ref, f"seed={seed} {granularity} step={step}", granularity=granularity
            )


def test_huge_norms_keep_state_finite(seed):
    """n^2 overflows float32 past 1.8e19: the norms are summed in float64."""
    gen = torch.Generator().manual_seed(seed)
    g64 = [torch.randn(64, generator=gen, dtype=torch.float64) * 1e30 for _ in range(3)]
    grads = [g.float().to(DEVICE) for g in g64]
    state = F.init_state(grads, device=DEVICE)
    ref = ReferenceStabilizer(3)
    for step in range(3):
        check_against_reference(grads, state, ref, f"seed={seed} step={step}")
        grads = [(g * 1.5).float().to(DEVICE) for g in g64]


def test_five_thousand_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (5000,), generator=gen).tolist()
    sizes[::97] = [0] * len(sizes[::97])
    sizes[5] = 3 * CHUNK + 11

    def make() -> list[torch.Tensor]:
        flat = torch.randn(sum(sizes), generator=gen).to(DEVICE) * 2
        return [t.clone() for t in flat.split(sizes)]

    for granularity in ("param", "global"):
        state = F.init_state(make(), granularity, device=DEVICE)
        ref = ReferenceStabilizer(len(sizes), granularity=granularity)
        for step in range(2):
            grads = make()
            inject_faults(grads, gen)
            check_against_reference(
                grads, state, ref, f"seed={seed} {granularity} step={step}", granularity=granularity
            )


def test_two_runs_give_identical_bits(seed):
    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        shapes = [(70_001,), (33, 1001), (5,), (3 * CHUNK + 1,)]
        out = []
        for dtype in DTYPES:
            state = F.init_state(random_grads(dtype, gen, shapes=shapes), device=DEVICE)
            for _ in range(4):
                grads = to_device(random_grads(dtype, gen, shapes=shapes), DEVICE)
                inject_faults(grads, gen)
                out.append(stabilize(grads, state))
                out += grads
            out += list(state)
        return [t.cpu() for t in out]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_bits_do_not_depend_on_alignment(seed):
    """NOTE: [thread order of a chunk]: 16-byte loads and element loads add in the same order."""
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        values = (torch.randn(3 * CHUNK + 77, generator=gen, dtype=torch.float64) * 5).to(dtype)
        results = []
        for offset in (0, 1):
            base = torch.zeros(values.numel() + offset, dtype=dtype, device=DEVICE)
            g = base[offset:]
            g.copy_(values.to(DEVICE))
            state = F.init_state([g], device=DEVICE)
            norms = stabilize([g], state)
            results.append([norms.cpu(), g.cpu(), *(t.cpu() for t in state)])
        for a, b in zip(*results):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_and_cuda_agree(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(70_001,), (33, 1001), (5,), (0,), (257, 3)]
    cpu_state = F.init_state(random_grads(dtype, gen, shapes=shapes))
    cuda_state = F.init_state(random_grads(dtype, gen, shapes=shapes), device=DEVICE)
    for step in range(6):
        grads = random_grads(dtype, gen, shapes=shapes)
        inject_faults(grads, gen)
        on_cuda = to_device(grads, DEVICE)
        cpu_norms = stabilize(grads, cpu_state, spike_guard=5.0)
        cuda_norms = stabilize(on_cuda, cuda_state, spike_guard=5.0)
        where = f"seed={seed} step={step}"
        torch.testing.assert_close(
            cuda_norms.cpu().double(), cpu_norms.double(), rtol=1e-6, atol=0, equal_nan=True
        )
        assert_grads_close([g.cpu() for g in on_cuda], [g.double() for g in grads], dtype, where)
        for a, b in zip(cuda_state, cpu_state):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=0, msg=where)


def exact_grads(sizes, dtype, gen) -> list[torch.Tensor]:
    """Small integers times 2^-7: every square and partial sum is exact in float64, so the
    norms are the same whatever the order of summation (the CPU's or the GPU's)."""
    return [
        (torch.randint(-64, 65, (n,), generator=gen, dtype=torch.float64) * 2.0**-7).to(dtype)
        for n in sizes
    ]


def unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the GPU, one element past a 16-byte boundary."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEVICE)
    base[1:] = t.reshape(-1).to(DEVICE)
    return base[1:].view(t.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"gamma1": 0.999999, "gamma2": 0.999999, "spike_guard": 3.0},
        {"granularity": "global", "gamma2": 0.9999, "spike_guard": 2.0},
        {"nonfinite": "skip", "bias_correction": False, "eps": 1e-3},
    ],
    ids=["defaults", "spike_guard", "global", "skip"],
)
def test_same_norms_give_the_cpu_bits(dtype, config, seed):
    """From the same norms the GPU computes the CPU's bits: m, v, k, the factors and so the
    gradients, with faults and a skipped step, aligned or not. The counts start where glibc's
    pow and integer_power differ (0.999999^2104, ^2148, 0.9999^494, ^2258)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 1023, CHUNK + 3, 3 * CHUNK + 5, 0, 33]
    granularity = config.get("granularity", "param")
    counts = [2103, 2147, 493, 2257, 0, 5, 10**6] if granularity == "param" else [2257]
    cpu_state = F.init_state(exact_grads(sizes, dtype, gen), granularity)
    cpu_state.k.copy_(torch.tensor(counts))
    cpu_state.m.copy_(torch.rand(len(counts), generator=gen, dtype=torch.float64) * 3)
    cpu_state.v.copy_(torch.rand(len(counts), generator=gen, dtype=torch.float64) * 9)
    cuda_state = F.StabilizerState(*(t.to(DEVICE) for t in cpu_state))
    for step in range(8):
        grads = exact_grads(sizes, dtype, gen)
        if step == 2:
            grads[1][3] = float("nan")
        if step == 3:
            grads[2][5] = float("-inf")
        if step == 5:
            grads[6].zero_()
        on_cuda = [unaligned_copy(g) if step % 2 else g.to(DEVICE) for g in grads]
        found_inf = torch.tensor(float(step == 4))
        cpu_norms = stabilize(grads, cpu_state, found_inf=found_inf, **config)
        cuda_norms = stabilize(on_cuda, cuda_state, found_inf=found_inf.to(DEVICE), **config)
        where = f"seed={seed} step={step}"
        assert torch.equal(bits(cuda_norms.cpu().to(cpu_norms.dtype)), bits(cpu_norms)), where
        for i, (a, b) in enumerate(zip(on_cuda, grads)):
            assert torch.equal(bits(a), bits(b)), f"{where} grads[{i}]"
        for a, b in zip(cuda_state, cpu_state):
            assert torch.equal(bits(a), bits(b)), f"{where} state"


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_state_moves_between_devices(granularity, seed):
    """m, v, k saved on a CUDA run load on the CPU, and back; from the same norms both then
    compute the same bits."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 70_001, 1, 300]
    config = {"granularity": granularity, "spike_guard": 4.0}
    params_cuda = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in sizes]
    params_cpu = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]

    def give(grads: list[torch.Tensor]) -> None:
        for params in (params_cuda, params_cpu):
            for p, g in zip(params, grads):
                p.grad = g.to(p.device, copy=True)

    def assert_same(a, b, where: str) -> None:
        for i, (p, q) in enumerate(zip(a[0], b[0])):
            assert torch.equal(bits(p.grad), bits(q.grad)), f"{where} grads[{i}]"
        sd_a, sd_b = a[1].state_dict(), b[1].state_dict()
        assert sd_a["keys"] == sd_b["keys"], where
        for key in ("m", "v", "k"):
            assert torch.equal(bits(sd_a[key]), bits(sd_b[key])), f"{where} {key}"

    on_cuda = gradstab.GradientStabilizer(**config)
    for _ in range(3):
        give(exact_grads(sizes, torch.float32, gen))
        on_cuda.apply(params_cuda)
    on_cpu = gradstab.GradientStabilizer(**config)
    on_cpu.load_state_dict(on_cuda.state_dict())
    # Saved on CUDA, going on on the CPU; then saved on the CPU, going on on CUDA.
    for where, cuda_run in (("to the CPU", on_cuda), ("back to CUDA", None)):
        if cuda_run is None:
            cuda_run = gradstab.GradientStabilizer(**config)
            cuda_run.load_state_dict(on_cpu.state_dict())
        for step in range(3):
            give(exact_grads(sizes, torch.float32, gen))
            cuda_run.apply(params_cuda)
            on_cpu.apply(params_cpu)
            assert_same((params_cuda, cuda_run), (params_cpu, on_cpu), f"{where}, step {step}")


@pytest.mark.parametrize("inf_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_found_inf_is_read_on_the_device_without_sync(inf_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [g.to(DEVICE) for g in random_grads(torch.float32, gen, noncontiguous=False)]
    state = F.init_state(grads, device=DEVICE)
    stabilize(grads, state)  # warm-up: first-use allocations may synchronize
    state_before = [t.clone() for t in state]
    before = [g.clone() for g in grads]
    found_inf = torch.ones((), dtype=inf_dtype, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stabilize(grads, state, found_inf=found_inf)
        stabilize(grads, state, found_inf=found_inf, spike_guard=2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(grads, before):
        assert torch.equal(a, b)
    for a, b in zip(state, state_before):
        assert torch.equal(a, b)

    found_inf.zero_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stabilize(grads, state, found_inf=found_inf)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counted = torch.tensor([g.numel() > 0 for g in grads], device=DEVICE)
    assert torch.equal(state.k, state_before[2] + counted)


def test_two_kernels_and_one_copy_per_step():
    grads = [torch.randn(n, device=DEVICE) for n in [10, 100_000, 3, 7, 1 << 16] * 400]
    state = F.init_state(grads, device=DEVICE)
    stabilize(grads, state)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        stabilize(grads, state)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if "memcpy" not in n.lower() and "memset" not in n.lower()]
    copies = [n for n in names if "memcpy" in n.lower()]
    assert len(kernels) == 2, names
    assert len(copies) == 1, names


def graph_test_layout(gen: torch.Generator) -> list[torch.Tensor]:
    """Several dtypes and sizes, an empty tensor, a strided (non-dense) view, unaligned data."""
    return to_device(
        [
            torch.randn(70_001, generator=gen),
            torch.randn(33, 17, generator=gen).bfloat16(),
            torch.randn(0, generator=gen),
            torch.randn(5, generator=gen).half(),
            torch.randn(3 * CHUNK + 3, generator=gen),
            torch.randn(257, 6, generator=gen, dtype=torch.float64)[:, ::2],
            torch.randn(1001, generator=gen)[1:],
        ],
        DEVICE,
    )


def warm_up() -> None:
    """Loads the kernels outside any capture, as PyTorch advises before capturing."""
    grads = [torch.randn(10, device=DEVICE)]
    stabilize(grads, F.init_state(grads, device=DEVICE))
    torch.cuda.synchronize()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_cuda_graph_capture_and_replay(granularity, seed):
    """Captured once, replayed on new gradients: the same bits as eager calls, state advancing."""
    gen = torch.Generator().manual_seed(seed)
    static_grads = graph_test_layout(gen)
    static_found_inf = torch.zeros((), device=DEVICE)
    config = {"granularity": granularity, "spike_guard": 4.0}
    graph_state = F.init_state(static_grads, granularity, device=DEVICE)
    eager_state = F.init_state(static_grads, granularity, device=DEVICE)
    warm_up()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_norms = stabilize(static_grads, graph_state, found_inf=static_found_inf, **config)
    assert not graph_state.k.any(), "capturing must not run the step"

    ref = ReferenceStabilizer(len(static_grads), **config)
    for step in range(8):
        fresh = [
            (torch.randn(g.shape, generator=gen) * 10.0 ** (step % 3)).to(g.dtype)
            for g in static_grads
        ]
        inject_faults(fresh, gen)
        skip = step == 4
        for s, f in zip(static_grads, fresh):
            s.copy_(f)
        static_found_inf.fill_(float(skip))
        eager_grads = [f.to(DEVICE) for f in fresh]
        expected, _ = ref.step(fresh, found_inf=skip)

        graph.replay()
        eager_norms = stabilize(eager_grads, eager_state, found_inf=static_found_inf, **config)
        where = f"seed={seed} step={step}"
        assert torch.equal(bits(static_norms), bits(eager_norms)), where
        for i, (a, b, e) in enumerate(zip(static_grads, eager_grads, expected)):
            assert torch.equal(bits(a), bits(b)), f"{where} grads[{i}]"
            assert_grads_close([a.cpu()], [e], a.dtype, f"{where} grads[{i}]")
        for a, b in zip(graph_state, eager_state):
            assert torch.equal(a, b), where
        assert graph_state.k.tolist() == [s.k for s in ref.states], where

    del graph  # the buffer it owned is handed back at the next call
    torch.cuda.synchronize()
    stabilize(static_grads, graph_state, **config)


def test_graph_capture_twice_and_raise_refused():
    grads = [torch.randn(1000, device=DEVICE) for _ in range(3)]
    state = F.init_state(grads, device=DEVICE)
    warm_up()
    graphs = []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stabilize(grads, state)
        graphs.append(graph)
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    assert state.k.tolist() == [2, 2, 2]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"), torch.cuda.graph(graph):
        torch.ops.gradstab.stabilize_(
            grads, state.m, state.v, state.k, None, 0.6, 0.999, 1e-12, True, False, 2, None
        )


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_raise_policy_changes_nothing(granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(40, generator=gen).to(DEVICE) for _ in range(4)]
    state = F.init_state(grads, granularity, device=DEVICE)
    stabilize(grads, state, granularity=granularity)
    grads = [torch.randn(40, generator=gen).to(DEVICE) for _ in range(4)]
    grads[2][5] = float("nan")
    before = [g.clone() for g in grads]
    state_before = [t.clone() for t in state]
    with pytest.raises(FloatingPointError, match=r"grads\[2\]"):
        stabilize(grads, state, granularity=granularity, nonfinite="raise")
    for a, b in zip(grads, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    for a, b in zip(state, state_before):
        assert torch.equal(a, b)
    stabilize(
        grads,
        state,
        granularity=granularity,
        nonfinite="raise",
        found_inf=torch.ones((), device=DEVICE),
    )
    grads[2][5] = 1.0
    ref_norms = [g.double().norm().item() for g in grads]
    norms = stabilize(grads, state, granularity=granularity, nonfinite="raise")
    torch.testing.assert_close(
        norms.cpu().double(), torch.tensor(ref_norms, dtype=torch.float64), rtol=1e-6, atol=0
    )
    assert int(state.k[0]) == 2


def test_global_norm_overflow_raises():
    # Each tensor's n^2 = 1e308 is finite in float64; their sum is not.
    grads = [torch.full((1,), 1e154, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    state = F.init_state(grads, "global", device=DEVICE)
    with pytest.raises(FloatingPointError, match="global norm overflowed"):
        stabilize(grads, state, granularity="global", nonfinite="raise")


@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_nonfinite_policies(nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(50, generator=gen).to(DEVICE) for _ in range(3)]
    state = F.init_state(grads, device=DEVICE)
    stabilize(grads, state)
    state_before = [t.clone() for t in state]
    grads = [torch.randn(50, generator=gen).to(DEVICE) for _ in range(3)]
    grads[0][3] = float("nan")
    grads[1][7] = float("-inf")
    bad = [g.clone() for g in grads[:2]]
    stabilize(grads, state, nonfinite=nonfinite)
    for g, b in zip(grads[:2], bad):
        if nonfinite == "zero":
            assert torch.equal(g, torch.zeros_like(g))
        else:
            assert torch.equal(g.nan_to_num(), b.nan_to_num()) and torch.equal(g.isnan(), b.isnan())
    assert torch.equal(state.k[:2], state_before[2][:2])
    assert int(state.k[2]) == 2


def test_empty_list_and_empty_tensors():
    for granularity in ("param", "global"):
        state = F.init_state([], granularity, device=DEVICE)
        norms = stabilize([], state, granularity=granularity)
        assert norms.shape == (0,) and norms.device == state.m.device
        assert state.k.tolist() == ([] if granularity == "param" else [0])
        grads = [torch.empty(0, device=DEVICE), torch.empty(3, 0, device=DEVICE)]
        state = F.init_state(grads, granularity, device=DEVICE)
        norms = stabilize(grads, state, granularity=granularity)
        assert norms.tolist() == [0.0, 0.0] and not state.k.any()


@pytest.mark.parametrize("granularity", ["param", "global"])
@pytest.mark.parametrize("found_inf", [False, True])
@pytest.mark.parametrize("spike_guard", [None, 10.0])
def test_opcheck(granularity, found_inf, spike_guard):
    grads = [
        torch.randn(5, 3, device=DEVICE),
        torch.randn(7, dtype=torch.float64, device=DEVICE),
        torch.randn(0, device=DEVICE),
        torch.randn(4, 6, device=DEVICE).t(),
        torch.randn(9, device=DEVICE).to(torch.bfloat16),
        torch.randn(70_000, device=DEVICE).half(),
    ]
    state = F.init_state(grads, granularity, device=DEVICE)
    args = (grads, state.m, state.v, state.k)
    args += (torch.zeros((), device=DEVICE) if found_inf else None,)
    args += (0.6, 0.999, 1e-12, True, granularity == "global", 0, spike_guard)
    torch.library.opcheck(torch.ops.gradstab.stabilize_.default, args)


def test_errors_name_the_culprit():
    grads = [torch.randn(3, device=DEVICE), torch.randn(3)]
    state = F.init_state(grads, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        torch.ops.gradstab.stabilize_(
            grads, state.m, state.v, state.k, None, 0.6, 0.999, 1e-12, True, False, 0, None
        )


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_grads_on_another_device_index(seed):
    gen = torch.Generator().manual_seed(seed)
    device = "cuda:1"
    grads = [g.to(device) for g in random_grads(torch.float32, gen, noncontiguous=False)]
    state = F.init_state(grads, device=device)
    ref = ReferenceStabilizer(len(grads))
    with torch.cuda.device(0):
        for step in range(3):
            grads = [g.to(device) for g in random_grads(torch.float32, gen, noncontiguous=False)]
            check_against_reference(grads, state, ref, f"seed={seed} step={step}")


def test_build_info_reports_cuda():
    info = _ops.build_info()
    assert "cuda: 1" in info and "not built" not in info, info


@pytest.mark.slow
def test_bfloat16_tensor_of_more_than_2_31_elements():
    """64-bit offsets: a bf16 gradient of 2^31 + 3 * 2^16 + 123 elements (4.3 GB)."""
    numel = 2**31 + 3 * CHUNK + 123
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    g = torch.empty(numel, dtype=torch.bfloat16, device=DEVICE)
    piece = 1 << 28
    for begin in range(0, numel, piece):
        end = min(begin + piece, numel)
        g[begin:end] = torch.randn(end - begin, generator=gen, device=DEVICE).bfloat16()
    g[2**31 + 5] = 300.0  # beyond int32 indexing
    g[-1] = -200.0
    before = g.clone()

    def chunked_norm(t: torch.Tensor) -> float:
        total = 0.0
        for begin in range(0, numel, piece):
            total += t[begin : begin + piece].double().square().sum().item()
        return math.sqrt(total)

    n = chunked_norm(before)
    state = F.init_state([g], device=DEVICE)
    norms = stabilize([g], state)
    torch.testing.assert_close(norms.cpu().double(), torch.tensor([n], dtype=torch.float64))
    # First step: m_hat = n, v_hat = n^2, so the factor is (n / (n + eps)) / n.
    factor = torch.tensor((n / (n + 1e-12)) / n, dtype=torch.float32, device=DEVICE)
    for begin in range(0, numel, piece):
        end = min(begin + piece, numel)
        expected = (before[begin:end].float() * factor).bfloat16()
        torch.testing.assert_close(g[begin:end], expected, rtol=RTOL[torch.bfloat16], atol=0)
    assert g[2**31 + 5].item() == pytest.approx(300.0 / n, rel=1e-2)
    assert g[-1].item() == pytest.approx(-200.0 / n, rel=1e-2)
    assert state.k.tolist() == [1]
    torch.testing.assert_close(state.m.cpu(), torch.tensor([n], dtype=torch.float64) * 0.4)
