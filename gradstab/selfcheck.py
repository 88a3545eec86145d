"""``python -m gradstab check``: the compiled ops on this machine's device against a float64
reference of the contract, in well under 30 seconds. Run it on a new GPU (or after a new install)
before trusting a long training run.

    python -m gradstab check [--device cuda|cpu|cuda:N] [--quick] [--seed N]

What it runs, on fresh random data every time (the seed is printed, ``--seed`` replays it):

- ``gradstab::stabilize_`` (through ``gradstab.functional.stabilize_``) against
  ``gradstab.reference.ReferenceStabilizer``, for float32, float64, float16 and bfloat16
  gradients of odd shapes (empty, one element, primes, more than one CUDA chunk) in every layout
  the op takes (dense, strided, permuted, off a 16-byte boundary), with NaN, Inf, all-zero and
  1e4x gradients, steps skipped by ``found_inf``, ``spike_guard``, the global norm and
  ``nonfinite="skip"``: gradients, norms, m, v and k;
- ``nonfinite="raise"``: refuses a NaN gradient and changes nothing;
- ``StabilizedAdamW`` (``gradstab::stabilized_adamw_``) against the composition
  ``StabilizedOptimizer(torch.optim.AdamW(...))`` for every dtype, with gradients missing,
  non-finite and spiking, amsgrad, maximize, spike_guard and the global norm;
- the same inputs twice give the same bits;
- on CUDA: a CUDA graph of each op captured once and replayed gives the bits of eager calls, and
  from the same norms the device computes the CPU's bits (docs/cuda.md): the state, the factors,
  the gradients, the AdamW weights and moments.

Each row of the table is one check and dtype, with the worst error found (relative to the
largest value of each tensor; see ``_relative_error``) and the tolerance it must stay within. The
exit status is 0 when every row passes, 1 when one fails, 2 when the compiled ops cannot run on
the device.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import gradstab
from gradstab import _ops
from gradstab import functional as F
from gradstab.reference import ReferenceStabilizer

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The relative error a correct kernel can make in a gradient of each dtype: its rounding of
# the scaled value plus the factor's (the test suite's tolerances: tests/conftest.py RTOL).
GRAD_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 3e-6,
    torch.float16: 1.5e-3,
    torch.bfloat16: 1e-2,
}
# Norms are float64 sums of squares in an order of the kernel's (docs/cuda.md bounds the
# difference); the state is float64 from them.
NORM_TOLERANCE = 1e-6
STATE_TOLERANCE = 1e-9
# StabilizedAdamW against the composition: a few hundred float32 ulps, a few 16-bit ulps of
# the weights (torch's AdamW contracts some operations into fused multiply-adds; ours never).
ADAMW_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 8 * 2.0**-10,
    torch.bfloat16: 8 * 2.0**-7,
}
CUDA_CHUNK = 1 << 16  # kChunkElems of csrc/cuda/multi_tensor_plan.h
LAYOUTS = ("dense", "strided", "permuted", "misaligned")
STABILIZER_CONFIGS = {
    "defaults": {},
    "spike_guard": {"spike_guard": 3.0},
    "global": {"granularity": "global"},
    "global+spike_guard": {
        "granularity": "global",
        "spike_guard": 2.0,
        "gamma1": 0.9,
        "gamma2": 0.99,
    },
    "skip": {"nonfinite": "skip"},
}


@dataclass
class Row:
    """One line of the table: the worst error of one measured quantity of a check."""

    check: str
    dtype: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # False for NaN: a failure to measure


class Measure:
    """The worst error of each quantity of one check; ``rows()`` makes one row of the worst."""

    def __init__(self, check: str, dtype: str) -> None:
        self.check = check
        self.dtype = dtype
        self.worst: dict[str, tuple[float, float]] = {}

    def add(self, what: str, error: float, tolerance: float) -> None:
        old = self.worst.get(what, (0.0, tolerance))[0]
        self.worst[what] = (max(old, error) if not math.isnan(error) else math.nan, tolerance)

    def rows(self) -> list[Row]:
        """One row: the first quantity that failed, or the one closest to its tolerance."""
        if not self.worst:
            return [Row(self.check, self.dtype, math.nan, 0.0, "nothing measured")]
        failed = [w for w, (e, t) in self.worst.items() if not e <= t]

        def closeness(what: str) -> float:
            error, tolerance = self.worst[what]
            return error / tolerance if tolerance > 0 else 0.0

        what = failed[0] if failed else max(self.worst, key=closeness)
        error, tolerance = self.worst[what]
        note = what
        if failed:
            note = ", ".join(failed) + " out of tolerance"
        return [Row(self.check, self.dtype, error, tolerance, note)]


def _relative_error(
    actual: Sequence[Tensor], expected: Sequence[Tensor], floor: float = 0.0
) -> float:
    """The largest |a - e| / max(max |e|, floor, smallest normal of a's dtype) over the finite
    entries e of each pair of tensors (max |e| of that tensor), in one pass over the whole list;
    inf where a non-finite entry of e (NaN, +Inf, -Inf) is not matched by the same in a, or a
    finite one by a non-finite one."""
    if not actual:
        return 0.0
    a = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in actual])
    e = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in expected])
    finite = e.isfinite()
    same = (a == e) | (a.isnan() & e.isnan())
    if bool(((~finite & ~same) | (finite & ~a.isfinite())).any()):
        return math.inf
    sizes = torch.tensor([t.numel() for t in expected])
    index = torch.repeat_interleave(torch.arange(len(expected)), sizes)
    if index.numel() == 0:
        return 0.0
    dtype = actual[0].dtype
    smallest = torch.finfo(dtype).smallest_normal if dtype.is_floating_point else 0.0
    zero = torch.zeros((), dtype=torch.float64)
    magnitude = torch.where(finite, e.abs(), zero)
    scale = torch.zeros(len(expected), dtype=torch.float64).scatter_reduce(
        0, index, magnitude, "amax"
    )
    diff = torch.where(finite, (a - e).abs(), zero)
    return (diff / scale.clamp_min(max(floor, smallest))[index]).max().item()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    def raw(t: Tensor) -> Tensor:
        return t.detach().cpu().clone(memory_format=torch.contiguous_format).view(-1)

    return torch.equal(raw(a).view(torch.uint8), raw(b).view(torch.uint8))


def _bits_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """0 when every tensor has the same bits as its twin, else the relative error (or 1)."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        if not _same_bits(a, e):
            error = _relative_error([a], [e]) if a.is_floating_point() else 1.0
            worst = max(worst, error if error > 0 else 1e-300)  # NaN payloads: not zero
    return worst


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Data:
    """Random gradients of odd shapes and every layout, on one device, from one seed.

    The checks do their own arithmetic (data, reference, error measures: many small torch ops)
    on one thread: on a busy machine, waking a second thread for each of them made the check
    ten times slower. The ops under test run inside ``op_threads()``, with the threads the user
    had set.
    """

    def __init__(self, device: torch.device, seed: int, quick: bool, threads: int = 1) -> None:
        self.device = device
        self.threads = threads
        self.gen = torch.Generator().manual_seed(seed)
        self.shapes: list[tuple[int, ...]] = [
            *[(0,), (1,), (7,), (1023,), (97, 3), (13, 17, 3), (0, 4), (70_001,)]
        ]
        if not quick:
            self.shapes += [(3 * CUDA_CHUNK + 5,), (33, 1001)]

    def op_threads(self) -> contextlib.AbstractContextManager[None]:
        return _intra_op_threads(self.threads)

    def rand(self) -> float:
        return torch.rand((), generator=self.gen).item()

    def values(self, shape: tuple[int, ...]) -> Tensor:
        """float64 on the CPU, with a log-uniform scale."""
        scale = 10 ** (self.rand() * 4 - 2)
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale

    def place(self, values: Tensor, dtype: torch.dtype, layout: str) -> Tensor:
        """``values`` as a ``dtype`` tensor on the device, laid out as ``layout``."""
        dev = self.device
        if layout == "strided" and values.dim() >= 1:  # every other element: not dense
            base = torch.zeros((*values.shape, 2), dtype=dtype, device=dev)
            base[..., 1] = values.to(dev, dtype)
            return base[..., 1]
        if layout == "permuted" and values.dim() >= 2:  # dense, not contiguous
            return values.to(dev, dtype).transpose(0, -1).contiguous().transpose(0, -1)
        if layout == "misaligned":  # one element past a 16-byte boundary
            base = torch.zeros(values.numel() + 1, dtype=dtype, device=dev)
            base[1:] = values.reshape(-1).to(dev, dtype)
            return base[1:].view(values.shape)
        return values.to(dev, dtype)

    def grads(self, dtype: torch.dtype) -> list[Tensor]:
        return [
            self.place(self.values(s), dtype, LAYOUTS[i % len(LAYOUTS)])
            for i, s in enumerate(self.shapes)
        ]

    def inject_faults(self, grads: Sequence[Tensor | None], dtype: torch.dtype) -> None:
        """NaN, +-Inf, an all-zero gradient and a spike, each in a random gradient, sometimes."""
        nonempty = [g for g in grads if g is not None and g.numel() > 0]

        def pick() -> Tensor:
            return nonempty[int(self.rand() * len(nonempty))]

        if self.rand() < 0.2:
            grad = pick()
            grad[(0,) * grad.dim()] = math.nan
        if self.rand() < 0.2:
            grad = pick()
            grad[tuple(n - 1 for n in grad.shape)] = math.inf if self.rand() < 0.5 else -math.inf
        if self.rand() < 0.15:
            pick().zero_()
        if self.rand() < 0.25:
            pick().mul_(30.0 if dtype == torch.float16 else 1e4)


def _check_stabilize(data: _Data, steps: int) -> Iterator[Row]:
    for dtype in DTYPES:
        measure = Measure("stabilize_ vs float64 reference", _dtype_name(dtype))
        for config in STABILIZER_CONFIGS.values():
            granularity = config.get("granularity", "param")
            grads = data.grads(dtype)
            state = F.init_state(grads, granularity, device=data.device)
            ref = ReferenceStabilizer(len(grads), **config)
            for step in range(steps):
                grads = data.grads(dtype)
                data.inject_faults(grads, dtype)
                skip = step % 5 == 3
                found_inf = torch.tensor(float(skip), device=data.device) if step % 2 else None
                skip = skip and found_inf is not None
                expected, ref_norms = ref.step(grads, found_inf=skip)
                with data.op_threads():
                    norms = F.stabilize_(
                        grads, state, found_inf=found_inf, backend="compiled", **config
                    )
                measure.add("grads", _relative_error(grads, expected), GRAD_TOLERANCE[dtype])
                ref_norms = torch.tensor(ref_norms, dtype=torch.float64).unsqueeze(1)
                error = _relative_error(list(norms.unsqueeze(1)), list(ref_norms))
                measure.add("norms", error, NORM_TOLERANCE)
                m = torch.tensor([s.m for s in ref.states], dtype=torch.float64)
                v = torch.tensor([s.v for s in ref.states], dtype=torch.float64)
                k = torch.tensor([s.k for s in ref.states], dtype=torch.int64)
                for what, a, e in (("m", state.m, m), ("v", state.v, v)):
                    rel = (a.cpu() - e).abs() / e.abs().clamp_min(1e-300)
                    measure.add(what, rel.max().item() if rel.numel() else 0.0, STATE_TOLERANCE)
                measure.add("k", 0.0 if torch.equal(state.k.cpu(), k) else math.inf, 0.0)
        yield from measure.rows()


def _check_raise(data: _Data) -> Iterator[Row]:
    measure = Measure("nonfinite='raise' refuses, changes nothing", "float32")
    grads = data.grads(torch.float32)
    state = F.init_state(grads, device=data.device)
    F.stabilize_(grads, state, backend="compiled")
    grads = data.grads(torch.float32)
    grads[3].view(-1)[5] = math.nan
    before = [g.clone() for g in grads] + [t.clone() for t in state]
    try:
        with data.op_threads():
            F.stabilize_(grads, state, nonfinite="raise", backend="compiled")
        measure.add("no FloatingPointError", math.inf, 0.0)
    except FloatingPointError as err:
        measure.add("message names grads[3]", 0.0 if "grads[3]" in str(err) else math.inf, 0.0)
    measure.add("unchanged", _bits_error([*grads, *state], before), 0.0)
    yield from measure.rows()


ADAMW_CONFIGS = {
    "defaults": {},
    "global, amsgrad": {"granularity": "global", "amsgrad": True},
    "spike_guard, maximize": {"spike_guard": 3.0, "maximize": True, "betas": (0.5, 0.99)},
}
_STABILIZER_ARGS = ("gamma1", "gamma2", "granularity", "nonfinite", "spike_guard")
ADAMW_LR = 1e-2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _adamw_pair(
    data: _Data, dtype: torch.dtype, config: dict
) -> tuple[gradstab.StabilizedAdamW, list[Tensor], gradstab.StabilizedOptimizer, list[Tensor]]:
    """StabilizedAdamW and the composition on equal copies of the same parameters (every other
    one off a 16-byte boundary)."""
    values = [data.values(s) * 0.1 for s in data.shapes if s[0] > 0]

    def params() -> list[Tensor]:
        layouts = ("dense", "misaligned")
        return [
            torch.nn.Parameter(data.place(v, dtype, layouts[i % 2])) for i, v in enumerate(values)
        ]

    adam = {k: v for k, v in config.items() if k not in _STABILIZER_ARGS}
    stab = {k: v for k, v in config.items() if k in _STABILIZER_ARGS}
    ours_params, ref_params = params(), params()
    ours = gradstab.StabilizedAdamW(ours_params, lr=ADAMW_LR, weight_decay=0.1, **adam, **stab)
    # float32 math and one rounding for 16-bit weights, as ours does: torch's fused AdamW.
    fused = dtype in (torch.float16, torch.bfloat16)
    inner = torch.optim.AdamW(ref_params, lr=ADAMW_LR, weight_decay=0.1, fused=fused, **adam)
    return ours, ours_params, gradstab.StabilizedOptimizer(inner, **stab), ref_params


def _check_adamw(data: _Data, steps: int) -> Iterator[Row]:
    for dtype in DTYPES:
        configs = ADAMW_CONFIGS if dtype == torch.float32 else {"defaults": {}}
        measure = Measure("StabilizedAdamW vs StabilizedOptimizer(AdamW)", _dtype_name(dtype))
        for config in configs.values():
            ours, ours_params, ref, ref_params = _adamw_pair(data, dtype, config)
            for step in range(steps):
                grads: list[Tensor | None] = [
                    data.values(p.shape).to(data.device, dtype) for p in ours_params
                ]
                data.inject_faults(grads, dtype)
                if step % 4 == 1:
                    grads[int(data.rand() * len(grads))] = None
                for pa, pb, g in zip(ours_params, ref_params, grads):
                    pa.grad = None if g is None else g.clone()
                    pb.grad = None if g is None else g.clone()
                with data.op_threads():
                    ours.step()
                ref.step()
            error = _relative_error(ours_params, ref_params, floor=ADAMW_LR)  # a step: about lr
            measure.add("weights", error, ADAMW_TOLERANCE[dtype])
            for pa, pb in zip(ours_params, ref_params):
                step_a = ours.state[pa].get("step")
                step_b = ref.optimizer.state[pb].get("step")
                same = (step_a is None) == (step_b is None) and (
                    step_a is None or step_a.item() == step_b.item()
                )
                measure.add("step counts", 0.0 if same else math.inf, 0.0)
            stab_a, stab_b = ours.state_dict()["gradstab"], ref.stabilizer.state_dict()
            measure.add("k", 0.0 if torch.equal(stab_a["k"], stab_b["k"]) else math.inf, 0.0)
            for key in ("m", "v"):
                error = _relative_error(list(stab_a[key][:, None]), list(stab_b[key][:, None]))
                measure.add(key, error, NORM_TOLERANCE)
        yield from measure.rows()


def _check_determinism(data: _Data, seed: int) -> Iterator[Row]:
    measure = Measure("same inputs, same bits", "all")

    def run() -> list[Tensor]:
        again = _Data(data.device, seed, quick=True, threads=data.threads)
        out: list[Tensor] = []
        for dtype in DTYPES:
            for config in (STABILIZER_CONFIGS["spike_guard"], STABILIZER_CONFIGS["global"]):
                grads = again.grads(dtype)
                state = F.init_state(grads, config.get("granularity", "param"), again.device)
                for _ in range(3):
                    grads = again.grads(dtype)
                    again.inject_faults(grads, dtype)
                    with again.op_threads():
                        out.append(F.stabilize_(grads, state, backend="compiled", **config))
                    out += grads
                out += list(state)
        ours, params, _, _ = _adamw_pair(again, torch.bfloat16, ADAMW_CONFIGS["global, amsgrad"])
        for _ in range(3):
            for p in params:
                p.grad = again.values(p.shape).to(again.device, p.dtype)
            with again.op_threads():
                ours.step()
        return out + params

    measure.add("bits", _bits_error(run(), run()), 0.0)
    yield from measure.rows()


def _adamw_op_lists(params: Sequence[Tensor], device: torch.device) -> list:
    """The arguments of gradstab::stabilized_adamw_ for ``params`` with amsgrad, fresh state."""
    grads = [torch.zeros_like(p) for p in params]
    stab = F.init_state(grads, device=device)
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.zeros((), device=device) for _ in params]
    found_inf = torch.zeros((), device=device)
    n = [len(params)]
    return [
        list(params), grads, *zeros, steps, *stab, None, found_inf, n, [ADAMW_LR], [0.9],
        [0.999], [0.1], [1e-8], True, False, 0.6, 0.999, 1e-12, True, False, 0, 4.0,
    ]  # fmt: skip


def _check_cuda_graphs(data: _Data) -> Iterator[Row]:
    """Each op captured once and replayed on new gradients: the bits of eager calls."""
    measure = Measure("CUDA graph replay = eager", "mixed")
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(data.shapes))]
    layouts = [LAYOUTS[i % len(LAYOUTS)] for i in range(len(data.shapes))]
    static = [data.place(data.values(s), d, lay) for s, d, lay in zip(data.shapes, dtypes, layouts)]
    eager = [g.clone() for g in static]
    found_inf = torch.zeros((), device=data.device)
    config = {"spike_guard": 4.0}
    graph_state = F.init_state(static, device=data.device)
    eager_state = F.init_state(eager, device=data.device)
    warm = [torch.ones(10, device=data.device)]
    F.stabilize_(warm, F.init_state(warm), backend="compiled")  # loads the kernels uncaptured
    torch.cuda.synchronize(data.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_norms = F.stabilize_(
            static, graph_state, found_inf=found_inf, backend="compiled", **config
        )
    measure.add("capture ran nothing", 0.0 if not graph_state.k.any() else math.inf, 0.0)
    for step in range(6):
        for s, e in zip(static, eager):
            fresh = data.values(s.shape)
            s.copy_(fresh)
            e.copy_(fresh)
        data.inject_faults(static, torch.float16)
        for s, e in zip(static, eager):
            e.copy_(s)
        found_inf.fill_(float(step == 4))
        graph.replay()
        eager_norms = F.stabilize_(
            eager, eager_state, found_inf=found_inf, backend="compiled", **config
        )
        measure.add(
            "stabilize_ bits",
            _bits_error([graph_norms, *static, *graph_state], [eager_norms, *eager, *eager_state]),
            0.0,
        )
    del graph

    shapes = [s for s in data.shapes if s[0] > 0]
    params = [data.place(data.values(s), torch.float32, layouts[i]) for i, s in enumerate(shapes)]
    static_args = _adamw_op_lists([p.clone() for p in params], data.device)
    eager_args = _adamw_op_lists([p.clone() for p in params], data.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.gradstab.stabilized_adamw_(*static_args)
    for step in range(4):
        for s, e in zip(static_args[1], eager_args[1]):
            fresh = data.values(s.shape)
            s.copy_(fresh)
            e.copy_(fresh)
        static_args[10].fill_(float(step == 2))
        eager_args[10].fill_(float(step == 2))
        graph.replay()
        torch.ops.gradstab.stabilized_adamw_(*eager_args)
        written = [0, 2, 3, 4, 5]  # params, moments, steps
        tensors = [[t for i in written for t in args[i]] + list(args[6:9])
                   for args in (static_args, eager_args)]  # fmt: skip
        measure.add("stabilized_adamw_ bits", _bits_error(*tensors), 0.0)
    yield from measure.rows()


def _exact_grads(sizes: Sequence[int], dtype: torch.dtype, rng: random.Random) -> list[Tensor]:
    """Small integers times 2^-7: every square and partial sum is exact in float64, so the norms
    do not depend on the order of summation (the CPU and the device add in different orders)."""
    return [
        torch.tensor([rng.randint(-64, 64) * 2.0**-7 for _ in range(n)], dtype=dtype) for n in sizes
    ]


def _check_cross_device(data: _Data, seed: int) -> Iterator[Row]:
    """From the same norms, the device computes the CPU's bits (docs/cuda.md)."""
    check = "device = CPU from the same norms"
    if not (_ops.has_kernel("cpu") and _ops.has_kernel("cpu", "stabilized_adamw_")):
        yield Row(check, "all", math.nan, 0.0, "no CPU kernels to compare with")
        return
    rng = random.Random(seed)
    sizes = [1, 7, 1023, 70_001, 3]
    for dtype in DTYPES:
        measure = Measure(check, _dtype_name(dtype))
        for config in STABILIZER_CONFIGS.values():
            granularity = config.get("granularity", "param")
            cpu_grads = _exact_grads(sizes, dtype, rng)
            cpu_state = F.init_state(cpu_grads, granularity)
            dev_state = F.init_state(cpu_grads, granularity, device=data.device)
            for step in range(4):
                cpu_grads = _exact_grads(sizes, dtype, rng)
                cpu_grads[step + 1].view(-1)[0] = (math.nan, math.inf, 0.0, 1.0)[step]
                dev_grads = [g.to(data.device) for g in cpu_grads]
                F.stabilize_(cpu_grads, cpu_state, backend="compiled", **config)
                F.stabilize_(dev_grads, dev_state, backend="compiled", **config)
                measure.add(
                    "stabilize_ bits",
                    _bits_error([*dev_grads, *dev_state], [*cpu_grads, *cpu_state]),
                    0.0,
                )
        on_cpu = [torch.nn.Parameter(g * 3) for g in _exact_grads(sizes, dtype, rng)]
        on_device = [torch.nn.Parameter(p.detach().to(data.device)) for p in on_cpu]
        opts = [
            gradstab.StabilizedAdamW(params, amsgrad=True, spike_guard=5.0)
            for params in (on_cpu, on_device)
        ]
        for _ in range(4):
            for p, q, g in zip(on_cpu, on_device, _exact_grads(sizes, dtype, rng)):
                p.grad = g
                q.grad = g.to(data.device)
            for opt in opts:
                opt.step()
            state = []
            for opt, params in zip(opts, (on_cpu, on_device)):
                moments = [t for p in params for t in opt.state[p].values()]
                stabilizer = [opt.state_dict()["gradstab"][key] for key in ("m", "v", "k")]
                state.append([*params, *moments, *stabilizer])
            measure.add("StabilizedAdamW bits", _bits_error(state[1], state[0]), 0.0)
        yield from measure.rows()


def run_checks(device: torch.device, quick: bool, seed: int) -> list[Row]:
    """Every check for ``device``; a check that raises is a failed row that says what."""
    data = _Data(device, seed, quick, threads=torch.get_num_threads())
    steps = 6 if quick else 16
    checks: list[tuple[str, Callable[[], Iterator[Row]]]] = [
        ("stabilize_ vs float64 reference", lambda: _check_stabilize(data, steps)),
        ("nonfinite='raise'", lambda: _check_raise(data)),
        ("StabilizedAdamW vs StabilizedOptimizer(AdamW)", lambda: _check_adamw(data, steps)),
        ("same inputs, same bits", lambda: _check_determinism(data, seed)),
    ]
    if device.type == "cuda":
        checks += [
            ("CUDA graph replay = eager", lambda: _check_cuda_graphs(data)),
            ("device = CPU from the same norms", lambda: _check_cross_device(data, seed)),
        ]
    rows: list[Row] = []
    for name, check in checks:
        try:
            with _intra_op_threads(1):
                rows += list(check())
        except Exception as err:  # reported in the table as a failure
            first_line = str(err).splitlines()[0] if str(err) else ""
            rows.append(Row(name, "", math.nan, 0.0, f"raised {type(err).__name__}: {first_line}"))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| check | dtype | worst error | tolerance | result |", "|---|---|---|---|---|"]
    for r in rows:
        result = "pass" if r.passed else "FAIL"
        if r.note:
            result += f" ({r.note})"
        lines.append(f"| {r.check} | {r.dtype} | {r.error:.2e} | {r.tolerance:.1e} | {result} |")
    return "\n".join(lines)


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checks; returns the exit status (0 all passed, 1 a failure, 2 cannot run)."""
    default_device = "cuda" if torch.cuda.is_available() and _ops.has_kernel("cuda") else "cpu"
    parser = argparse.ArgumentParser(
        prog="python -m gradstab check",
        description="Checks the compiled ops on a device against a float64 reference of the "
        "contract (docs/cuda.md).",
    )
    parser.add_argument(
        "--device", default=default_device, help=f"cpu, cuda or cuda:N (here: {default_device})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and shapes")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(str(err))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gradstab check: --device cuda, but torch sees no CUDA device")
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    missing = [
        op for op in ("stabilize_", "stabilized_adamw_") if not _ops.has_kernel(device.type, op)
    ]
    if missing:
        print(
            f"gradstab check: no compiled {' or '.join(missing)} kernel for {device.type} "
            f"({_ops.build_info()}); see `python -m gradstab info`"
        )
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(
        f"gradstab {gradstab.__version__} check on {_device_description(device)}, "
        f"torch {torch.__version__}, extension: {_ops.build_info()}, seed {seed}"
        + (" (quick)" if args.quick else "")
    )
    start = time.perf_counter()
    rows = run_checks(device, args.quick, seed)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    if failed:
        replay = f"python -m gradstab check --device {args.device} --seed {seed}"
        print(
            f"{len(failed)} of {len(rows)} checks FAILED in {elapsed:.1f} s "
            f"(replay: {replay}{' --quick' if args.quick else ''})"
        )
        return 1
    print(f"all {len(rows)} checks passed in {elapsed:.1f} s")
    return 0
