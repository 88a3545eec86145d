"""The compiled CPU kernel's own paths: fused vs two-pass, instruction sets, thread splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradstab import _ops
from gradstab import functional as F
from tests.conftest import DTYPES
from tests.helpers import assert_grads_close, inject_faults, random_grads
from tests.reference import ReferenceStabilizer

pytestmark = pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="gradstab._C not built")

ROOT = Path(__file__).resolve().parents[1]


def kernel_info() -> dict:
    return _ops._C.cpu_kernel_info()


def boundary_numels(dtype: torch.dtype) -> list[int]:
    """Sizes on both sides of the fused (one-visit) limit, and of the chunk size."""
    fused_max = kernel_info()["fused_max_bytes"] // torch.empty((), dtype=dtype).element_size()
    chunk = kernel_info()["chunk_elems"]
    return sorted({fused_max - 1, fused_max, fused_max + 1, chunk - 1, chunk + 1, 2 * chunk + 31})


def bits(t: torch.Tensor) -> torch.Tensor:
    dense = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    return dense.view(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_and_two_pass_sizes_match_reference(dtype, seed):
    """Gradients just under and over the fused limit, together, over steps with faults."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n,) for n in boundary_numels(dtype)] + [(3,), (0,)]
    state = F.init_state(random_grads(dtype, gen, shapes))
    ref = ReferenceStabilizer(len(shapes), spike_guard=4.0)
    for step in range(6):
        grads = random_grads(dtype, gen, shapes)
        faults = inject_faults(grads, gen)
        expected, ref_norms = ref.step(grads)
        norms = F.stabilize_(grads, state, backend="compiled", spike_guard=4.0)
        where = f"seed={seed} step={step} faults={faults}"
        assert_grads_close(grads, expected, dtype, where)
        torch.testing.assert_close(
            norms.double(),
            torch.tensor(ref_norms, dtype=torch.float64),
            rtol=1e-5,
            atol=0,
            equal_nan=True,
        )
        assert torch.equal(state.k, torch.tensor([s.k for s in ref.states])), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_path_gives_the_two_pass_bits(dtype, seed):
    """nonfinite='raise' must see every norm before changing anything, so it always takes the
    two-pass path; on finite gradients it must give the fused path's bits exactly."""
    shapes = [(n,) for n in boundary_numels(dtype)] + [(5, 7), (1,)]
    results = []
    for nonfinite in ("zero", "raise"):
        step_gen = torch.Generator().manual_seed(seed)
        grads0 = random_grads(dtype, step_gen, shapes)
        state = F.init_state(grads0)
        out = []
        for _ in range(3):
            grads = random_grads(dtype, step_gen, shapes)
            out.append(F.stabilize_(grads, state, backend="compiled", nonfinite=nonfinite))
            out += grads
        results.append(out + list(state))
    for a, b in zip(*results):
        assert torch.equal(bits(a), bits(b))


def test_many_small_tensors_split_over_threads_give_the_same_bits(seed):
    """Hundreds of fused gradients and a few chunked ones, each thread count splitting them
    differently."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 3000, (), generator=gen)),) for _ in range(300)]
    shapes += [(200_003,), (70_001,)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            step_gen = torch.Generator().manual_seed(seed)
            grads = random_grads(torch.bfloat16, step_gen, shapes)
            state = F.init_state(grads)
            out = []
            for _ in range(2):
                grads = random_grads(torch.bfloat16, step_gen, shapes)
                out.append(F.stabilize_(grads, state, backend="compiled"))
                out += grads
            results.append(out + list(state))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(bits(a), bits(b))


ISA_WORKER = """
import json, sys, torch
from gradstab import _ops, functional as F
gen = torch.Generator().manual_seed(int(sys.argv[1]))
out = {"isa": _ops._C.cpu_kernel_info()["isa"], "tensors": []}
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    # Every length from 0 to 70 (all vector tails), and sizes over the fused limit.
    shapes = [(n,) for n in range(71)] + [(1031, 67), (300_007,)]
    grads = [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dtype) for s in shapes]
    grads.append(grads[-1][::2])  # a strided view
    state = F.init_state(grads)
    for _ in range(2):
        norms = F.stabilize_(grads, state, backend="compiled")
        out["tensors"].append(norms.double().tolist())
    for g in grads + list(state):
        out["tensors"].append(g.contiguous().view(-1).view(torch.uint8).tolist())
print(json.dumps(out))
"""


def run_isa(isa: str, seed: int) -> dict:
    env = dict(os.environ, GRADSTAB_CPU_ISA=isa)
    out = subprocess.run(
        [sys.executable, "-c", ISA_WORKER, str(seed)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_every_instruction_set_gives_the_generic_bits(seed):
    """The AVX2 and AVX-512 loops follow the generic loop's order and rounding exactly."""
    generic = run_isa("generic", seed)
    assert generic["isa"] == "generic"
    compared = []
    for isa in ("avx2", "avx512"):
        other = run_isa(isa, seed)
        if other["isa"] != isa:  # this CPU lacks it (GRADSTAB_CPU_ISA only lowers the choice)
            continue
        compared.append(isa)
        assert len(other["tensors"]) == len(generic["tensors"])
        for i, (a, b) in enumerate(zip(generic["tensors"], other["tensors"])):
            assert a == b, f"{isa} differs from generic in result {i}"
    if kernel_info()["isa"] != "generic":
        assert kernel_info()["isa"] in compared


def test_unknown_isa_request_warns_and_keeps_the_best():
    code = "import gradstab._C as C; print(C.cpu_kernel_info()['isa'])"
    env = dict(os.environ, GRADSTAB_CPU_ISA="sse9")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == kernel_info()["isa"]
    # The warning is raised when the kernels are first chosen (the first op call).
    code = (
        "import warnings, torch; from gradstab import functional as F\n"
        "g = [torch.ones(3)]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); F.stabilize_(g, F.init_state(g))\n"
        "print([str(x.message) for x in w])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "GRADSTAB_CPU_ISA=sse9" in out.stdout + out.stderr
