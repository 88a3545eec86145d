"""Every backend of ``gradstab.functional.stabilize_`` against the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradstab import functional as F
from tests.conftest import CPU_BACKENDS, DTYPES
from tests.helpers import assert_grads_close, inject_faults, random_grads, to_device
from tests.reference import ReferenceStabilizer

STEPS = 30


def run_against_reference(
    backend: str,
    dtype: torch.dtype,
    seed: int,
    steps: int = STEPS,
    device: str = "cpu",
    **config,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    granularity = config.get("granularity", "param")
    shapes_grads = random_grads(dtype, gen)
    state = F.init_state(shapes_grads, granularity, device=device)
    ref = ReferenceStabilizer(len(shapes_grads), **config)
    for step in range(steps):
        grads = to_device(random_grads(dtype, gen), device)
        faults = inject_faults(grads, gen)
        skip = torch.rand((), generator=gen).item() < 0.1
        use_found_inf = torch.rand((), generator=gen).item() < 0.5
        found_inf = torch.tensor(float(skip), device=device) if use_found_inf else None
        skip = skip and found_inf is not None
        where = f"seed={seed} step={step} faults={faults} found_inf={skip}"
        expected, ref_norms = ref.step(grads, found_inf=skip)
        norms = F.stabilize_(grads, state, found_inf=found_inf, backend=backend, **config)
        assert_grads_close(grads, expected, dtype, where)
        torch.testing.assert_close(
            norms.cpu().double(),
            torch.tensor(ref_norms, dtype=torch.float64),
            rtol=1e-5,
            atol=0,
            equal_nan=True,
            msg=lambda m: f"{where}, norms: {m}",  # noqa: B023
        )
        ref_m = torch.tensor([s.m for s in ref.states], dtype=torch.float64)
        ref_v = torch.tensor([s.v for s in ref.states], dtype=torch.float64)
        ref_k = torch.tensor([s.k for s in ref.states], dtype=torch.int64)
        m, v, k = (t.cpu() for t in state)
        torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=0, msg=f"{where}: m")
        torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=0, msg=f"{where}: v")
        assert torch.equal(k, ref_k), f"{where}: k {k} != {ref_k}"
        assert torch.isfinite(m).all() and torch.isfinite(v).all(), where


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_matches_reference(backend, dtype, granularity, nonfinite, seed):
    run_against_reference(backend, dtype, seed, granularity=granularity, nonfinite=nonfinite)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_spike_guard_matches_reference(backend, dtype, granularity, seed):
    run_against_reference(backend, dtype, seed, granularity=granularity, spike_guard=3.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
def test_other_configs_match_reference(backend, config, seed):
    run_against_reference(backend, torch.float32, seed, **config)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("numel", [0, 1, 2, 3, 15, 16, 17, 1023, 32767, 32768, 32769, 100_003])
def test_sizes_around_chunk_and_lane_edges(backend, numel, seed):
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        g = torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)
        state = F.init_state([g])
        ref = ReferenceStabilizer(1)
        for _ in range(3):
            g = (torch.randn(numel, generator=gen, dtype=torch.float64) * 7).to(dtype)
            expected, _ = ref.step([g])
            F.stabilize_([g], state, backend=backend)
            assert_grads_close([g], expected, dtype, f"seed={seed} numel={numel} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_norms_keep_state_finite(backend, seed):
    """n^2 overflows float32 past 1.8e19; the statistics must stay finite and exact."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 1e30 if backend == "compiled" else 1e17
    g64 = [torch.randn(64, generator=gen, dtype=torch.float64) * magnitude for _ in range(3)]
    grads = [g.float() for g in g64]
    state = F.init_state(grads)
    ref = ReferenceStabilizer(3)
    for _ in range(3):
        expected, _ = ref.step(grads)
        F.stabilize_(grads, state, backend=backend)
        assert torch.isfinite(state.m).all() and torch.isfinite(state.v).all()
        assert_grads_close(grads, expected, torch.float32, f"seed={seed}")
        grads = [g.float() * 1.5 for g in g64]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_found_inf_changes_nothing(backend, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = random_grads(torch.float32, gen)
    state = F.init_state(grads, granularity)
    F.stabilize_(grads, state, backend=backend, granularity=granularity)
    grads = random_grads(torch.float32, gen)
    grads[2].view(-1)[0] = float("inf")
    before = [g.clone() for g in grads]
    state_before = [t.clone() for t in state]
    F.stabilize_(
        grads, state, found_inf=torch.tensor(1.0), backend=backend, granularity=granularity
    )
    for a, b in zip(grads, before):
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    for a, b in zip(state, state_before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_nonfinite_policies(backend, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    state = F.init_state(grads)
    F.stabilize_(grads, state, backend=backend)
    state_before = [t.clone() for t in state]
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    grads[0][3] = float("nan")
    grads[1][7] = float("-inf")
    bad = [g.clone() for g in grads[:2]]
    F.stabilize_(grads, state, backend=backend, nonfinite=nonfinite)
    for g, b in zip(grads[:2], bad):
        if nonfinite == "zero":
            assert torch.equal(g, torch.zeros_like(g)), "a non-finite gradient must become 0"
        else:
            assert torch.equal(g.nan_to_num(), b.nan_to_num()) and torch.equal(g.isnan(), b.isnan())
    assert torch.equal(state.k[:2], state_before[2][:2]), "non-finite norms must not count"
    assert torch.equal(state.m[:2], state_before[0][:2])
    assert state.k[2].item() == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_raise_policy_changes_nothing(backend, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(40, generator=gen) for _ in range(4)]
    state = F.init_state(grads, granularity)
    F.stabilize_(grads, state, backend=backend, granularity=granularity)
    grads = [torch.randn(40, generator=gen) for _ in range(4)]
    grads[2][5] = float("nan")
    before = [g.clone() for g in grads]
    state_before = [t.clone() for t in state]
    with pytest.raises(FloatingPointError, match=r"grads\[2\]"):
        F.stabilize_(grads, state, backend=backend, granularity=granularity, nonfinite="raise")
    for a, b in zip(grads, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    for a, b in zip(state, state_before):
        assert torch.equal(a, b)
    # A step the scaler skips does not raise: nothing would change anyway.
    F.stabilize_(
        grads,
        state,
        backend=backend,
        granularity=granularity,
        nonfinite="raise",
        found_inf=torch.tensor(1.0),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_runs_give_identical_bits(backend, dtype, seed):
    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        grads0 = random_grads(dtype, gen, shapes=[(70_001,), (33, 1001), (5,)])
        state = F.init_state(grads0)
        out = []
        for _ in range(5):
            grads = random_grads(dtype, gen, shapes=[(70_001,), (33, 1001), (5,)])
            inject_faults(grads, gen)
            out.append(F.stabilize_(grads, state, backend=backend))
            out += grads
        return out + list(state)

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.skipif("compiled" not in CPU_BACKENDS, reason="gradstab._C not built")
def test_compiled_bits_do_not_depend_on_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = random_grads(torch.float32, gen, shapes=[(300_001,), (1000, 77), (3,)] * 3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            gs = [g.clone() for g in grads]
            state = F.init_state(gs)
            norms = F.stabilize_(gs, state, backend="compiled")
            results.append([norms, *gs, *state])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree_with_each_other(backend, seed):
    """The torch backend and the compiled op give the same result (to rounding), step by step."""
    gen = torch.Generator().manual_seed(seed)
    grads = random_grads(torch.float32, gen)
    states = {b: F.init_state(grads) for b in ("torch", backend)}
    for _ in range(10):
        grads = random_grads(torch.float32, gen)
        inject_faults(grads, gen)
        outs = {}
        for b, state in states.items():
            gs = [g.clone() for g in grads]
            F.stabilize_(gs, state, backend=b, spike_guard=5.0)
            outs[b] = gs
        for a, b in itertools.zip_longest(outs["torch"], outs[backend]):
            torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-30, equal_nan=True)


def magnitude_bound(gamma1: float, gamma2: float, k: int) -> float:
    """sqrt(sum_i a_i^2 / b_i): by Cauchy-Schwarz, m_hat / sqrt(v_hat) can never exceed it."""
    a = [(1 - gamma1) * gamma1 ** (k - i) / (1 - gamma1**k) for i in range(1, k + 1)]
    b = [(1 - gamma2) * gamma2 ** (k - i) / (1 - gamma2**k) for i in range(1, k + 1)]
    return sum(x * x / y for x, y in zip(a, b)) ** 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_norm_is_bounded_whatever_the_spike(backend, seed):
    """The README's claim: the stabilized norm stays below a constant of the gammas."""
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(100, generator=gen)]
    state = F.init_state(g)
    for k in range(1, 60):
        scale = 10 ** (torch.rand((), generator=gen).item() * 12 - 6)
        g = [torch.randn(100, generator=gen, dtype=torch.float64) * scale]
        F.stabilize_(g, state, backend=backend)
        assert g[0].norm().item() <= magnitude_bound(0.6, 0.999, k) * (1 + 1e-12)
    assert magnitude_bound(0.6, 0.999, 100_000) == pytest.approx(15.8, abs=0.05)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spike_guard", [None, 2.0])
@pytest.mark.parametrize(
    "counts",
    [[5] * 7, [0, 1, 2, 3, 4, 5, 6], [0, 3, 7, 40, 41, 900, 12_345]],
    ids=["equal", "spread_in_table", "spread_beyond_table"],
)
def test_unequal_counts_match_reference(backend, spike_guard, counts, seed):
    """Tensors whose counts k differ (after zero or non-finite gradients, or a loaded state):
    the compiled CPU op takes gamma^k from a table for the counts in use (NOTE: [power table]),
    and falls back to pow when they are too far apart."""
    gen = torch.Generator().manual_seed(seed)
    n = len(counts)
    ref = ReferenceStabilizer(n, spike_guard=spike_guard)
    for s, k in zip(ref.states, counts):
        s.k = k
        s.m = 0.0 if k == 0 else float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.5
        s.v = 0.0 if k == 0 else s.m**2 * 1.5
    state = F.StabilizerState(
        torch.tensor([s.m for s in ref.states], dtype=torch.float64),
        torch.tensor([s.v for s in ref.states], dtype=torch.float64),
        torch.tensor(counts, dtype=torch.int64),
    )
    for step in range(4):
        grads = [torch.randn(33, generator=gen) * (1 + 9 * (i == step)) for i in range(n)]
        if step == 2:
            grads[1].zero_()  # its count falls behind the others
        expected, _ = ref.step(grads)
        F.stabilize_(grads, state, backend=backend, spike_guard=spike_guard)
        where = f"seed={seed} step={step} counts={counts}"
        assert_grads_close(grads, expected, torch.float32, where)
        assert state.k.tolist() == [s.k for s in ref.states], where
        ref_m = torch.tensor([s.m for s in ref.states], dtype=torch.float64)
        torch.testing.assert_close(state.m, ref_m, rtol=1e-5, atol=0, msg=f"{where}: m")
