"""torch.compile: the functional core in one fullgraph graph, and compiled models.

Compiling is slow on a 2-core machine, so the graphs are small and few: one compile per
granularity for ``stabilize_`` (inductor, the default backend), and ``aot_eager`` for the model,
whose forward/backward inductor would take most of a minute to build here (the stabilizer runs
eagerly on its gradients either way).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import gradstab
from gradstab import functional as F
from tests.conftest import CPU_BACKENDS
from tests.helpers import assert_grads_close, inject_faults
from tests.reference import ReferenceStabilizer
from tests.training_helpers import assert_same_bits, batches, loss_fn, mlp, snapshot

pytestmark = pytest.mark.skipif("compiled" not in CPU_BACKENDS, reason="gradstab._C not built")

# Odd shapes, mixed dtypes and a strided view, fixed across steps so nothing recompiles.
LAYOUT = [
    ((7, 13), torch.float32, False),
    ((1,), torch.float16, False),
    ((1023,), torch.bfloat16, False),
    ((5, 11), torch.float32, True),
    ((0,), torch.float32, False),
    ((97,), torch.float64, False),
]


def fresh_grads(gen: torch.Generator) -> list[torch.Tensor]:
    grads = []
    for shape, dtype, transposed in LAYOUT:
        scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)
        g = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        grads.append(g.t().contiguous().t().to(dtype) if transposed else g.to(dtype))
    return grads


@pytest.mark.parametrize(
    "config",
    [{"granularity": "param"}, {"granularity": "global", "spike_guard": 4.0, "gamma1": 0.8}],
    ids=["param", "global-guard"],
)
def test_stabilize_under_fullgraph_compile_equals_eager(config, seed):
    def step(grads, m, v, k, found_inf):
        return F.stabilize_(grads, F.StabilizerState(m, v, k), found_inf=found_inf, **config)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(seed)
    template = fresh_grads(gen)
    eager_state = F.init_state(template, config["granularity"])
    compiled_state = F.init_state(template, config["granularity"])
    ref = ReferenceStabilizer(len(template), **config)
    for step_index in range(8):
        grads = fresh_grads(gen)
        faults = inject_faults(grads, gen)
        skip = step_index == 5
        found_inf = torch.tensor(float(skip))
        twins = [g.clone() for g in grads]
        expected, _ = ref.step(grads, found_inf=skip)
        eager_norms = step(grads, *eager_state, found_inf)
        compiled_norms = compiled(twins, *compiled_state, found_inf)
        where = f"seed={seed} step={step_index} faults={faults} skip={skip}"
        assert_same_bits(twins, grads, f"{where} grads")
        assert_same_bits(compiled_norms, eager_norms, f"{where} norms")
        assert_same_bits(tuple(compiled_state), tuple(eager_state), f"{where} state")
        for g, e, (_, dtype, _) in zip(grads, expected, LAYOUT):
            assert_grads_close([g], [e], dtype, where)
    assert counter.frame_count == 1, "recompiled"
    (graph,) = counter.graphs
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.gradstab.stabilize_.default in targets, targets


def test_compiled_model_with_eager_stabilizer(seed):
    """The stabilizer sees the compiled model's gradients under the original parameter names,
    so a checkpoint moves between the compiled and the plain model."""
    torch._dynamo.reset()
    data = batches(seed, 4)
    model = mlp(seed)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2)
    stab = gradstab.GradientStabilizer()
    ref = ReferenceStabilizer(4)
    for x, y in data[:3]:
        opt.zero_grad()
        loss_fn(compiled, x, y).backward()
        expected, _ = ref.step([p.grad for p in model.parameters()])
        stab.apply(compiled)
        assert_grads_close([p.grad for p in model.parameters()], expected, torch.float32, "")
        opt.step()
    sd = stab.state_dict()
    assert sd["keys"] == [name for name, _ in model.named_parameters()]
    assert sd["k"].tolist() == [3, 3, 3, 3]

    # The checkpoint continues on an uncompiled twin exactly as on the compiled model.
    twin = mlp(seed)
    twin.load_state_dict(model.state_dict())
    twin_stab = gradstab.GradientStabilizer()
    twin_stab.load_state_dict(sd)
    x, y = data[3]
    opt.zero_grad()
    loss_fn(compiled, x, y).backward()
    loss_fn(twin, x, y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # the same gradients, whatever the backend's rounding
    stab.apply(compiled)
    twin_stab.apply(twin)
    assert_same_bits(
        {n: p.grad for n, p in model.named_parameters()},
        {n: p.grad for n, p in twin.named_parameters()},
        "grads",
    )
    assert_same_bits(stab.state_dict(), twin_stab.state_dict(), "stabilizer")
    assert snapshot(model).keys() == snapshot(twin).keys()
