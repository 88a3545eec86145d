"""The CPU half of "the device computes the CPU's bits from the same norms" (docs/cuda.md).

The CUDA kernels run the state update of csrc/stabilize_math.h, the bias corrections of
csrc/integer_power.h and the AdamW update of csrc/adamw_math.h, compiled by nvcc with no
contraction (-fmad=false, checked by ``make cuda-check``). Here the same headers are compiled by
the host compiler in a CUDA-free translation unit (tests/shared_math_harness.cpp), driven with
norms, and every bit it gives is compared with the CPU kernels' (which use a power table, vector
loops and a fused one-visit path of their own). The device half (the CUDA kernels against the
CPU kernels from the same norms) is in tests/test_cuda.py and tests/test_cuda_adamw.py.

Norms are made exact: a one-element gradient x has the norm sqrt(x * x) in any summation order,
and gradients of small integers times a power of two have an exact sum of squares.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradstab import _ops
from gradstab import functional as F
from tests import harness

pytestmark = pytest.mark.skipif(
    harness.CXX is None or not _ops.has_kernel("cpu", "stabilized_adamw_"),
    reason="needs a C++ compiler and the CPU kernels",
)
NONFINITE = F.NONFINITE_POLICIES


@pytest.fixture(scope="module")
def shared_math(tmp_path_factory):
    return harness.build("shared_math_harness.cpp", tmp_path_factory.mktemp("shared_math"))


def hexes(values) -> str:
    return " ".join(float(x).hex() for x in values)


def spike_guard_token(spike_guard: float | None) -> str:
    return "nan" if spike_guard is None else float(spike_guard).hex()


def config_tokens(gamma1, gamma2, eps, bias_correction, spike_guard, nonfinite) -> str:
    return (
        f"{hexes([gamma1, gamma2, eps])} {int(bias_correction)} "
        f"{spike_guard_token(spike_guard)} {NONFINITE[nonfinite]}"
    )


def random_value(rng: random.Random) -> float:
    """A gradient value: log-uniform magnitudes, with zeros, NaN, Inf, huge and tiny ones."""
    roll = rng.random()
    if roll < 0.05:
        return 0.0
    if roll < 0.08:
        return math.nan
    if roll < 0.11:
        return rng.choice([math.inf, -math.inf])
    if roll < 0.14:
        return rng.choice([1e151, 1e-160])  # fed clamped to 1e150 (kMaxStatNorm); below eps
    return rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-3, 3)


def same_bits(a: float, b: float) -> bool:
    """Equal to the last bit (any NaN equals any NaN: payloads are not compared)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a.hex() == b.hex()


CONFIGS = {
    "default": {},
    "spike_guard": {"gamma1": 0.9, "gamma2": 0.99, "spike_guard": 3.0},
    "no_bias_correction": {"bias_correction": False, "eps": 1e-3},
    "extreme_gammas": {"gamma1": 0.999999, "gamma2": 0.999999, "spike_guard": 1.0},
    "gammas_near_1": {"gamma1": 0.9999, "gamma2": 0.999999},
    "gammas0": {"gamma1": 0.0, "gamma2": 0.0},
    "skip_nonfinite": {"nonfinite": "skip", "spike_guard": 10.0},
    "global": {"granularity": "global"},
    "global_spike_guard": {"granularity": "global", "spike_guard": 2.0, "gamma2": 0.9999},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_update_matches_the_cpu_kernel(name, shared_math, seed):
    """m, v, k and the rescaled gradients of the CPU op, bit for bit, over many steps, from
    counts of 0 to 2^40 (the power table's fast path and its fallback)."""
    config = {
        "gamma1": 0.6,
        "gamma2": 0.999,
        "eps": 1e-12,
        "bias_correction": True,
        "spike_guard": None,
        "nonfinite": "zero",
        "granularity": "param",
        **CONFIGS[name],
    }
    granularity = config.pop("granularity")
    rng = random.Random(seed)
    num_grads = 9
    slots = 1 if granularity == "global" else num_grads
    # From a fresh state, and from counts where glibc's pow and integer_power differ in the
    # last bit of 1 - gamma^k (at k + 1, or at k for spike_guard: 0.999999^2104, ^2148 and
    # 0.9999^494, ^2258), so that a kernel that used pow could not pass.
    counts = [0, 1, 5, 2103, 2147, 493, 2**40, 2257, 10**6]
    if granularity == "global":
        counts = [2257]
    m = [rng.uniform(0, 10) if counts[s] else 0.0 for s in range(slots)]
    v = [rng.uniform(0, 100) if counts[s] else 0.0 for s in range(slots)]
    state = F.StabilizerState(
        torch.tensor(m, dtype=torch.float64),
        torch.tensor(v, dtype=torch.float64),
        torch.tensor(counts, dtype=torch.int64),
    )
    steps = 25
    values = [[random_value(rng) for _ in range(num_grads)] for _ in range(steps)]
    skipped = [rng.random() < 0.1 for _ in range(steps)]
    norms = []
    for row in values:
        squares = [x * x for x in row]  # the CPU kernel's float64 sums, in its order
        if granularity == "global":
            total = 0.0
            for s in squares:
                total += s
            norms.append([math.sqrt(total)])
        else:
            norms.append([math.sqrt(s) for s in squares])
    stdin = (
        f"stabilize {config_tokens(**config)} {slots} "
        + " ".join(f"{hexes([m[s], v[s]])} {counts[s]}" for s in range(slots))
        + f" {steps} "
        + " ".join(f"{int(skip)} {hexes(row)}" for skip, row in zip(skipped, norms))
    )
    expected = [line.split() for line in harness.run(shared_math, stdin=stdin).splitlines()]
    assert len(expected) == steps * slots

    for step, (row, skip) in enumerate(zip(values, skipped)):
        grads = [torch.tensor([x], dtype=torch.float64) for x in row]
        found_inf = torch.tensor(float(skip)) if skip or step % 2 else None
        op_norms = torch.ops.gradstab.stabilize_(
            grads, *state, found_inf, config["gamma1"], config["gamma2"], config["eps"],
            config["bias_correction"], granularity == "global", NONFINITE[config["nonfinite"]],
            config["spike_guard"],
        )  # fmt: skip
        where = f"seed={seed} {name} step={step}"
        per_tensor = torch.tensor([math.sqrt(x * x) for x in row], dtype=op_norms.dtype)
        torch.testing.assert_close(op_norms, per_tensor, rtol=0, atol=0, equal_nan=True, msg=where)
        for s in range(slots):
            m_hex, v_hex, k, _, _ = expected[step * slots + s]
            assert same_bits(state.m[s].item(), float.fromhex(m_hex)), f"{where} m[{s}]"
            assert same_bits(state.v[s].item(), float.fromhex(v_hex)), f"{where} v[{s}]"
            assert state.k[s].item() == int(k), f"{where} k[{s}]"
        for i, (x, g) in enumerate(zip(row, grads)):
            _, _, _, action, factor_hex = expected[step * slots + (0 if slots == 1 else i)]
            factor = float.fromhex(factor_hex)
            want = {0: x, 1: x * factor, 2: 0.0}[int(action)]
            assert same_bits(g.item(), want), f"{where} grads[{i}]: {g.item()!r} != {want!r}"


def exact_grad(
    numel: int, dtype: torch.dtype, rng: random.Random, loss_scale: int
) -> tuple[torch.Tensor, float]:
    """Small integers times 2^-7 (times a small integer loss scale): every square and every
    partial sum is exact in float64, so the norm is the same in any summation order. Returns the
    gradient and sqrt(sum of squares)."""
    ints = [rng.randint(-64, 64) * loss_scale for _ in range(numel)]
    unit = 2.0**-7
    grad = torch.tensor(ints, dtype=torch.float64).mul_(unit).to(dtype)
    return grad, math.sqrt(float(sum(i * i for i in ints)) * unit * unit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"amsgrad": True, "grad_scale": 3.0},
        {"maximize": True, "betas": (0.3, 0.95), "spike_guard": 2.0},
        {"grad_scale": 1024.0, "betas": (0.9, 0.9999), "gamma2": 0.9999, "weight_decay": 0.0},
    ],
    ids=["default", "amsgrad_scaled", "maximize_small_beta1", "pow2_scale"],
)
def test_adamw_step_matches_the_cpu_kernel(dtype, variant, shared_math, seed):
    """One stabilized_adamw_ step from any state: stabilizer state, step counts (up to 2^24),
    weights and moments of the CPU op, bit for bit."""
    rng = random.Random(seed)
    amsgrad = variant.get("amsgrad", False)
    maximize = variant.get("maximize", False)
    beta1, beta2 = variant.get("betas", (0.9, 0.999))
    lr, weight_decay, adam_eps = 1e-2, variant.get("weight_decay", 0.1), 1e-8
    gamma1, gamma2 = variant.get("gamma1", 0.6), variant.get("gamma2", 0.999)
    spike_guard = variant.get("spike_guard")
    scale = variant.get("grad_scale")
    inv_scale = 1.0 if scale is None else torch.tensor(1.0 / scale, dtype=torch.float32).item()
    sizes = [1, 7, 33, 300, 1000, 5]
    # The gradients as a GradScaler leaves them: times the loss scale.
    grads, norms = zip(*(exact_grad(n, dtype, rng, int(scale or 1)) for n in sizes))
    grads = list(grads)
    norms = list(norms)
    grads[4].view(-1)[3] = math.nan  # zeroed by nonfinite="zero": AdamW sees zeros
    norms[4] = math.nan
    grads[5].zero_()  # norm 0: the state is left alone, AdamW takes the gradient as it is
    norms[5] = 0.0

    def rand(n, low, high):
        return torch.tensor([rng.uniform(low, high) for _ in range(n)], dtype=torch.float64)

    params = [rand(n, -1, 1).to(dtype) for n in sizes]
    exp_avgs = [rand(n, -0.1, 0.1).to(dtype) for n in sizes]
    exp_avg_sqs = [rand(n, 0, 0.01).to(dtype) for n in sizes]
    max_exp_avg_sqs = [(e + rand(n, 0, 0.01).to(dtype)) for e, n in zip(exp_avg_sqs, sizes)]
    # Fresh, large, and where pow and integer_power differ (0.9999^494 and ^2258: the new
    # counts of 493 and 2257).
    counts = [0, 1, 493, 2257, 2**24 - 1, 77]
    steps = [torch.tensor(float(c), dtype=torch.float32) for c in counts]
    m = [rng.uniform(0, 10) if c else 0.0 for c in counts]
    v = [rng.uniform(0, 100) if c else 0.0 for c in counts]
    stab = F.StabilizerState(
        torch.tensor(m, dtype=torch.float64),
        torch.tensor(v, dtype=torch.float64),
        torch.tensor(counts, dtype=torch.int64),
    )

    stdin = [
        f"adamw {64 if dtype == torch.float64 else 32} {int(amsgrad)} {int(maximize)}",
        config_tokens(gamma1, gamma2, 1e-12, True, spike_guard, "zero"),
        hexes([lr, beta1, beta2, weight_decay, adam_eps, inv_scale]),
        str(len(sizes)),
    ]
    for t, n in enumerate(sizes):
        stdin.append(f"{hexes([m[t], v[t]])} {counts[t]} {hexes([counts[t], norms[t]])} {n}")
        for i in range(n):
            stdin.append(
                hexes(
                    [
                        params[t][i].item(),
                        grads[t][i].item(),
                        exp_avgs[t][i].item(),
                        exp_avg_sqs[t][i].item(),
                        max_exp_avg_sqs[t][i].item(),
                    ]
                )
            )
    lines = iter(harness.run(shared_math, stdin="\n".join(stdin)).splitlines())

    torch.ops.gradstab.stabilized_adamw_(
        params, grads, exp_avgs, exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [], steps, *stab,
        None if scale is None else torch.tensor(scale), torch.tensor(0.0), [len(sizes)], [lr],
        [beta1], [beta2], [weight_decay], [adam_eps], amsgrad, maximize, gamma1, gamma2, 1e-12,
        True, False, NONFINITE["zero"], spike_guard,
    )  # fmt: skip
    for t, n in enumerate(sizes):
        where = f"seed={seed} tensor {t}"
        m_hex, v_hex, k, step_hex = next(lines).split()
        assert same_bits(stab.m[t].item(), float.fromhex(m_hex)), f"{where}: m"
        assert same_bits(stab.v[t].item(), float.fromhex(v_hex)), f"{where}: v"
        assert stab.k[t].item() == int(k), f"{where}: k"
        assert steps[t].item() == float.fromhex(step_hex), f"{where}: step"
        for i in range(n):
            want = [float.fromhex(x) for x in next(lines).split()]
            got = [params[t][i].item(), exp_avgs[t][i].item(), exp_avg_sqs[t][i].item()]
            if amsgrad:
                got.append(max_exp_avg_sqs[t][i].item())
            for what, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, want):
                assert same_bits(a, b), f"{where} element {i}: {what} {a!r} != {b!r}"
