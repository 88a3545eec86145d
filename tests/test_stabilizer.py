"""``GradientStabilizer``: keys, state, checkpoints, AMP, statistics and errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradstab
from tests.conftest import CPU_BACKENDS, DTYPES
from tests.helpers import assert_grads_close
from tests.reference import ReferenceStabilizer

ROOT = Path(__file__).resolve().parents[1]


def small_model(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


def fill_grads(model: nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_apply_module_matches_reference(backend, dtype, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model(dtype)
    params = list(model.parameters())
    stab = gradstab.GradientStabilizer(granularity=granularity, backend=backend)
    ref = ReferenceStabilizer(len(params), granularity=granularity)
    for step in range(30):
        fill_grads(model, gen, scale=10 ** (torch.rand((), generator=gen).item() * 4 - 2))
        if step % 7 == 3:
            params[2].grad.mul_(1e4 if dtype != torch.float16 else 50)
        expected, norms = ref.step([p.grad for p in params])
        stats = stab.apply(model)
        assert_grads_close([p.grad for p in params], expected, dtype, f"seed={seed} step={step}")
        after = math.sqrt(sum(float((e * e).sum()) for e in expected))
        figures = stats.to_dict()
        assert figures["skipped"] == 0
        before = math.sqrt(sum(n * n for n in norms))
        assert figures["norm_before"] == pytest.approx(before, rel=1e-5)
        rel = 1e-2 if dtype.itemsize == 2 else 1e-5
        assert figures["norm_after"] == pytest.approx(after, rel=rel)


def test_backend_reports_cpu():
    expected = "cpu" if "compiled" in CPU_BACKENDS else "torch"
    assert gradstab.GradientStabilizer().backend == expected
    assert gradstab.GradientStabilizer(backend="torch").backend == "torch"


@pytest.mark.parametrize("target", ["optimizer", "list", "groups", "module"])
def test_targets_key_state_consistently(target, seed):
    """A module keys by name, the rest by position; all give the same transform."""
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01)
    choose = {
        "optimizer": lambda: opt,
        "list": lambda: iter(params),
        "groups": lambda: opt.param_groups,
        "module": lambda: model,
    }[target]
    stab = gradstab.GradientStabilizer()
    ref = ReferenceStabilizer(len(params))
    for _ in range(5):
        fill_grads(model, gen, 3.0)
        expected, _ = ref.step([p.grad for p in params])
        stab.apply(choose())
        assert_grads_close([p.grad for p in params], expected, torch.float32, f"seed={seed}")
    keys = stab.state_dict()["keys"]
    if target == "module":
        assert keys == [name for name, _ in model.named_parameters()]
    else:
        assert keys == list(range(len(params)))


def test_params_without_grad_keep_their_state(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    params = list(model.parameters())
    stab = gradstab.GradientStabilizer(spike_guard=4.0)
    refs = [ReferenceStabilizer(1, spike_guard=4.0) for _ in params]
    for step in range(25):
        fill_grads(model, gen, 2.0)
        # Drop a changing subset of gradients: the first step sees only some parameters too.
        present = [i for i in range(len(params)) if (step * 7 + i * 3) % 4 != 0]
        for i, p in enumerate(params):
            if i not in present:
                p.grad = None
        expected = {i: refs[i].step([params[i].grad])[0][0] for i in present}
        before = {i: p.grad for i, p in enumerate(params) if i not in present}
        stab.apply(model)
        for i in present:
            assert_grads_close([params[i].grad], [expected[i]], torch.float32, f"step={step}")
        assert all(params[i].grad is None for i in before)
    sd = stab.state_dict()
    for i, (name, _) in enumerate(model.named_parameters()):
        j = sd["keys"].index(name)
        assert sd["k"][j].item() == refs[i].states[0].k
        assert sd["m"][j].item() == pytest.approx(refs[i].states[0].m, rel=1e-6)


def test_state_dict_round_trip_is_exact(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer(gamma1=0.7, spike_guard=5.0)
    for _ in range(4):
        fill_grads(model, gen)
        stab.apply(model)
    sd = stab.state_dict()
    other = gradstab.GradientStabilizer()
    other.load_state_dict(sd)
    assert other.gamma1 == 0.7 and other.spike_guard == 5.0
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    fill_grads(model, gen)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    stab.apply(model)
    other.apply(twin)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    for name in ("m", "v", "k"):
        assert torch.equal(stab.state_dict()[name], other.state_dict()[name])
    # state_dict is a snapshot: later steps do not change what was saved.
    saved = sd["m"].clone()
    fill_grads(model, gen)
    stab.apply(model)
    assert torch.equal(sd["m"], saved)
    # A state_dict saved before any step after loading still holds the loaded state.
    empty = gradstab.GradientStabilizer().state_dict()["m"]
    assert torch.equal(empty, torch.zeros(0, dtype=torch.float64))
    fresh = gradstab.GradientStabilizer()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.state_dict()["m"], sd["m"])


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, granularity):
    from tests.resume_worker import train

    train(0, 12, granularity, None, tmp_path / "full.pt")
    train(0, 5, granularity, None, tmp_path / "half.pt")
    worker = ROOT / "tests" / "resume_worker.py"
    subprocess.run(
        [
            sys.executable,
            str(worker),
            "--granularity",
            granularity,
            "--start",
            "5",
            "--stop",
            "12",
            "--resume",
            str(tmp_path / "half.pt"),
            "--out",
            str(tmp_path / "resumed.pt"),
        ],
        check=True,
        cwd=ROOT,
    )
    full = torch.load(tmp_path / "full.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for name in ("m", "v", "k"):
        assert torch.equal(full["stab"][name], resumed["stab"][name]), name
    assert full["stab"]["keys"] == resumed["stab"]["keys"]
    assert int(full["stab"]["k"].max()) == 12  # every step was a valid update


def test_stats_are_lazy_but_survive_later_steps(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen, 5.0)
    first = stab.apply(model)
    first_after = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    for _ in range(3):
        fill_grads(model, gen, 100.0)
        stab.apply(model)
    assert first.to_dict()["norm_after"] == pytest.approx(first_after, rel=1e-5)
    assert isinstance(first.norm_before, torch.Tensor) and first.norm_before.dim() == 0


def test_stats_count_skipped(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    fill_grads(model, gen)
    model[0].weight.grad[0, 0] = float("nan")
    stats = stab.apply(model)
    assert stats.to_dict()["skipped"] == 1
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight.grad))
    fill_grads(model, gen)
    stats = stab.apply(model, found_inf=torch.tensor(1.0))
    assert stats.to_dict()["skipped"] == 4


@pytest.mark.parametrize("granularity", ["param", "global"])
def test_grad_scaler_scaled_run_equals_unscaled_bit_for_bit(granularity, seed):
    """With a loss scale that is a power of two, unscaling is exact, so the runs must agree."""

    def run(use_scaler: bool) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = small_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        stab = gradstab.GradientStabilizer(granularity=granularity)
        gen = torch.Generator().manual_seed(seed)
        for step in range(8):
            x = torch.randn(32, 13, generator=gen)
            loss = model(x).square().mean() * (1e3 if step == 4 else 1.0)
            scaler.scale(loss).backward()
            stab.apply(model, scaler=scaler, optimizer=opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        sd = stab.state_dict()
        return [p.detach().clone() for p in model.parameters()] + [sd["m"], sd["v"], sd["k"]]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_skipped_scaler_step_leaves_no_trace(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    stab = gradstab.GradientStabilizer()
    scaler.scale(model(torch.randn(4, 13, generator=gen)).sum()).backward()
    stab.apply(opt, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = stab.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(4, 13, generator=gen)).sum()).backward()
    model[2].weight.grad[1, 1] = float("inf")
    grads = [p.grad.clone() for p in model.parameters()]
    stats = stab.apply(opt, scaler=scaler)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g / 4.0, equal_nan=True)  # unscaled, nothing else
    scaler.step(opt)
    scaler.update()
    after = stab.state_dict()
    for name in ("m", "v", "k"):
        assert torch.equal(before[name], after[name])
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
    assert stats.to_dict()["skipped"] == 4


def test_scaler_needs_an_optimizer():
    model = small_model()
    with pytest.raises(ValueError, match="optimizer="):
        gradstab.GradientStabilizer().apply(model, scaler=torch.amp.GradScaler("cpu"))


# ------------------------------------------------------------------------------------------
# bad input: a clear error naming the culprit, nothing changed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma1": 1.0}, "gamma1"),
        ({"gamma1": -0.1}, "gamma1"),
        ({"gamma2": 1.5}, "gamma2"),
        ({"gamma2": float("nan")}, "gamma2"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
        ({"granularity": "layer"}, "granularity"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"spike_guard": 0.0}, "spike_guard"),
        ({"spike_guard": float("inf")}, "spike_guard"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gradstab.GradientStabilizer(**kwargs)
    with pytest.raises(ValueError, match=name):
        g = [torch.randn(3)]
        gradstab.functional.stabilize_(g, gradstab.functional.init_state(g), **kwargs)


def test_wrong_types_are_named():
    with pytest.raises(TypeError, match="gamma1"):
        gradstab.GradientStabilizer(gamma1="0.6")
    with pytest.raises(TypeError, match="bias_correction"):
        gradstab.GradientStabilizer(bias_correction=1)
    with pytest.raises(TypeError, match="apply"):
        gradstab.GradientStabilizer().apply(42)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_rejects_bad_arguments_directly(backend):
    """The compiled op checks its own arguments too (it can be called without the wrapper)."""
    g = [torch.randn(3), torch.randn(4)]
    state = gradstab.functional.init_state(g)
    op = (
        torch.ops.gradstab.stabilize_
        if backend == "compiled"
        else gradstab._torch_backend.stabilize_
    )
    args = dict(
        found_inf=None,
        gamma1=0.6,
        gamma2=0.999,
        eps=1e-12,
        bias_correction=True,
        global_norm=False,
        nonfinite=0,
        spike_guard=None,
    )
    with pytest.raises(RuntimeError, match="m must be"):
        op(g, state.m[:1], state.v, state.k, **args)
    with pytest.raises(RuntimeError, match="k must be"):
        op(g, state.m, state.v, state.k.double(), **args)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
        op([g[0], torch.ones(4, dtype=torch.int32)], state.m, state.v, state.k, **args)
    with pytest.raises(RuntimeError, match="found_inf"):
        op(g, state.m, state.v, state.k, **{**args, "found_inf": torch.ones(2)})
    if backend == "compiled":
        with pytest.raises(ValueError, match="gamma2"):
            op(g, state.m, state.v, state.k, **{**args, "gamma2": 1.0})
        with pytest.raises(RuntimeError, match=r"grads\[0\].*expanded"):
            op([torch.ones(1).expand(3), g[1]], state.m, state.v, state.k, **args)
    assert torch.equal(state.k, torch.zeros(2, dtype=torch.int64))


def test_sparse_grad_is_named_and_nothing_changes(seed):
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 2)
    model = nn.Sequential(emb, lin)
    model(torch.tensor([1, 2, 3])).sum().backward()
    stab = gradstab.GradientStabilizer()
    lin_grad = lin.weight.grad.clone()
    with pytest.raises(ValueError, match=r"'0.weight'.*sparse"):
        stab.apply(model)
    assert torch.equal(lin.weight.grad, lin_grad)
    assert stab.state_dict()["keys"] == []


def test_raise_policy_names_the_parameter_and_changes_nothing(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer(nonfinite="raise")
    fill_grads(model, gen)
    stab.apply(model)
    before = stab.state_dict()
    fill_grads(model, gen)
    model[2].bias.grad[0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"'2\.bias'"):
        stab.apply(model)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    after = stab.state_dict()
    for name in ("m", "v", "k"):
        assert torch.equal(before[name], after[name])


def test_checkpoint_from_another_model_is_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    sd = stab.state_dict()

    other = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 3))
    fill_grads(other, gen)
    fresh = gradstab.GradientStabilizer()
    fresh.load_state_dict(sd)
    grads = [p.grad.clone() for p in other.parameters()]
    with pytest.raises(RuntimeError, match=r"'3\.weight'"):
        fresh.apply(other)
    assert all(torch.equal(p.grad, g) for p, g in zip(other.parameters(), grads))

    renamed = nn.Sequential(nn.Identity(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    fill_grads(renamed, gen)
    fresh = gradstab.GradientStabilizer()
    fresh.load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"'0\.weight'"):
        fresh.apply(renamed)
    assert fresh.state_dict()["keys"] == sd["keys"], "a refused apply must keep the loaded state"

    lenient = gradstab.GradientStabilizer()
    lenient.load_state_dict(sd, strict=False)
    lenient.apply(renamed)

    positional = gradstab.GradientStabilizer()
    positional.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="keyed by position"):
        positional.apply(list(model.parameters()))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.pop("m"), "lacks"),
        (lambda sd: sd.update(version=99), "version"),
        (lambda sd: sd.update(m=sd["m"][:1]), "m"),
        (lambda sd: sd.update(k=sd["k"].double()), "k"),
        (lambda sd: sd["config"].update(gamma1=2.0), "gamma1"),
        (lambda sd: sd["config"].update(granularity="global"), "global"),
        (lambda sd: sd["config"].update(colour="red"), "colour"),
    ],
)
def test_malformed_state_dict_is_refused_and_state_kept(edit, match, seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    good = stab.state_dict()
    bad = stab.state_dict()
    edit(bad)
    with pytest.raises((ValueError, KeyError)) as info:
        stab.load_state_dict(bad)
    assert match in str(info.value)
    kept = stab.state_dict()
    for name in ("m", "v", "k"):
        assert torch.equal(kept[name], good[name])
    assert kept["config"] == good["config"]


def test_same_tensor_twice_is_refused():
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="twice"):
        gradstab.GradientStabilizer().apply([p, p])


def test_reset_forgets_everything(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    stab.reset()
    assert stab.state_dict()["keys"] == []
    ref = ReferenceStabilizer(4)
    fill_grads(model, gen)
    expected, _ = ref.step([p.grad for p in model.parameters()])
    stab.apply(model)
    assert_grads_close([p.grad for p in model.parameters()], expected, torch.float32, "after reset")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors_name_the_right_parameter_in_every_form(backend, seed):
    """Labels are made only on error (for speed): each form of ``params`` must still name the
    culprit, also when parameters without gradients come before it."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.zeros(3, requires_grad=True) for _ in range(5)]

    def fill() -> None:
        for t in tensors:
            t.grad = torch.randn(3, generator=gen)
        tensors[1].grad = None
        tensors[4].grad[0] = float("inf")

    forms = [
        (tensors, r"params\[4\]"),
        ([{"params": tensors[:2]}, {"params": tensors[2:]}], r"param_groups\[1\]\['params'\]\[2\]"),
        (
            torch.optim.SGD([{"params": tensors[:3]}, {"params": tensors[3:]}]),
            r"\[1\]\['params'\]\[1\]",
        ),
    ]
    for params, label in forms:
        fill()
        grads = [None if t.grad is None else t.grad.clone() for t in tensors]
        stab = gradstab.GradientStabilizer(nonfinite="raise", backend=backend)
        with pytest.raises(FloatingPointError, match=label) as info:
            stab.apply(params)
        assert "params[0]" not in str(info.value) and "[0]['params'][0]" not in str(info.value)
        for t, g in zip(tensors, grads):
            if g is None:
                assert t.grad is None
            else:
                torch.testing.assert_close(t.grad, g, rtol=0, atol=0, equal_nan=True)

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].bias.grad = torch.ones(2)
    model[1].weight.grad = torch.ones(2, 2).to_sparse()
    with pytest.raises(ValueError, match=r"'1.weight'.*sparse"):
        gradstab.GradientStabilizer(backend=backend).apply(model)
    with pytest.raises(ValueError, match=r"params\[1\] and params\[3\]"):
        gradstab.GradientStabilizer(backend=backend).apply(
            [tensors[0], tensors[2], tensors[3], tensors[2]]
        )


def test_parameter_walk_equals_named_parameters():
    """apply() walks a module's parameters itself (for speed); names and order must be those of
    named_parameters(), with tied parameters and shared submodules once, under the first name."""
    from gradstab.stabilizer import _named_parameters

    shared = nn.Linear(3, 3)
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    parametrized = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def named_parameters(self, *args, **kwargs):
            yield from reversed(list(super().named_parameters(*args, **kwargs)))

    modules = [
        nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(nn.Linear(3, 2, bias=False))),
        tied,
        parametrized,
        nn.ModuleDict({"x": nn.ParameterList([nn.Parameter(torch.ones(2))] * 3)}),
        Custom(),
        nn.Sequential(),
    ]
    for module in modules:
        assert _named_parameters(module) == list(module.named_parameters()), module
