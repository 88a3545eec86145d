"""``StabilizedOptimizer``: a real optimizer that stabilizes, then steps the one it wraps."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import gradstab
from tests.conftest import DTYPES
from tests.helpers import assert_grads_close
from tests.reference import ReferenceStabilizer
from tests.training_helpers import assert_same_bits, batches, loss_fn, mlp, snapshot

INNER = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
}


def random_grads_for(model: nn.Module, gen: torch.Generator, step: int) -> list[str]:
    """Fresh gradients with a fault now and then; returns what was injected."""
    params = list(model.parameters())
    for p in params:
        scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
    faults = []
    if step % 5 == 2:
        params[1].grad[0] = float("nan")
        faults.append("nan@1")
    if step % 7 == 3:
        params[2].grad.mul_(1e4 if params[2].dtype != torch.float16 else 30.0)
        faults.append("spike@2")
    if step % 6 == 4:
        params[3].grad.zero_()
        faults.append("zero@3")
    if step % 4 == 1:
        params[0].grad = None
        faults.append("none@0")
    return faults


def test_is_a_real_optimizer_sharing_the_inner_one():
    model = mlp(0)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = gradstab.StabilizedOptimizer(inner, gamma1=0.7, spike_guard=8.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert "StabilizedOptimizer" in gradstab.__all__
    assert opt.optimizer is inner
    assert isinstance(opt.stabilizer, gradstab.GradientStabilizer)
    assert (opt.stabilizer.gamma1, opt.stabilizer.spike_guard) == (0.7, 8.0)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    assert "AdamW" in repr(opt) and "GradientStabilizer" in repr(opt)


@pytest.mark.parametrize("inner_name", list(INNER))
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_step_stabilizes_then_steps_the_inner_optimizer(inner_name, granularity, seed):
    """The inner step sees the reference's gradients, and its update is exactly the inner
    optimizer's on those gradients (a twin optimizer fed the same gradients agrees bit for bit)."""
    gen = torch.Generator().manual_seed(seed)
    model, twin = mlp(seed), mlp(seed)
    opt = gradstab.StabilizedOptimizer(
        INNER[inner_name](model.parameters()), granularity=granularity
    )
    twin_opt = INNER[inner_name](twin.parameters())
    seen: list[list[torch.Tensor | None]] = []
    opt.optimizer.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        )
    )
    params = list(model.parameters())
    if granularity == "global":
        ref = ReferenceStabilizer(1, granularity="global")
    else:
        refs = [ReferenceStabilizer(1) for _ in params]
    for step in range(12):
        faults = random_grads_for(model, gen, step)
        present = [i for i, p in enumerate(params) if p.grad is not None]
        if granularity == "global":
            expected, _ = ref.step([params[i].grad for i in present])
        else:
            expected = [refs[i].step([params[i].grad])[0][0] for i in present]
        opt.step()
        got = seen[-1]
        assert [i for i, g in enumerate(got) if g is not None] == present
        where = f"seed={seed} step={step} faults={faults}"
        assert_grads_close([got[i] for i in present], expected, torch.float32, where)
        for p, g in zip(twin.parameters(), got):
            p.grad = None if g is None else g.clone()
        twin_opt.step()
        assert_same_bits(snapshot(model), snapshot(twin), where)
        assert_same_bits(opt.optimizer.state_dict(), twin_opt.state_dict(), where)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_grad_dtype(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    model = mlp(seed, dtype)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    ref = ReferenceStabilizer(4)
    for step in range(6):
        random_grads_for(model, gen, 0)  # no faults: the reference is per list here
        expected, _ = ref.step([p.grad for p in model.parameters()])
        opt.step()
        assert_grads_close([p.grad for p in model.parameters()], expected, dtype, f"step={step}")


def test_step_closure_runs_with_grad_enabled_and_returns_the_loss(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(seed, 1)[0]
    ref = ReferenceStabilizer(4)
    captured = {}

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        captured["expected"] = ref.step([p.grad for p in model.parameters()])[0]
        return loss

    before = snapshot(model)
    with torch.no_grad():  # as the Lightning and HF loops may call it
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    for (name, p), e in zip(model.named_parameters(), captured["expected"]):
        assert_grads_close([p.grad], [e], torch.float32, name)
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * e.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ],
    ids=["step", "onecycle", "lambda", "cosine"],
)
def test_lr_schedulers_drive_the_inner_optimizer(make_scheduler, seed):
    model, twin = mlp(seed), mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    twin_inner = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_stab = gradstab.GradientStabilizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched, twin_sched = make_scheduler(opt), make_scheduler(twin_inner)
        for x, y in batches(seed, 6):
            for m, o in ((model, opt), (twin, twin_inner)):
                o.zero_grad()
                loss_fn(m, x, y).backward()
            opt.step()
            twin_stab.apply(twin_inner)
            twin_inner.step()
            sched.step()
            twin_sched.step()
            assert opt.optimizer.param_groups[0]["lr"] == twin_inner.param_groups[0]["lr"]
    assert sched.get_last_lr() == twin_sched.get_last_lr()
    assert_same_bits(snapshot(model), snapshot(twin), "weights")


def test_add_param_group_takes_the_next_positions(seed):
    gen = torch.Generator().manual_seed(seed)
    model = mlp(seed)
    params = list(model.parameters())
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(params[:2], lr=0.0))
    refs = [ReferenceStabilizer(1) for _ in params]
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": params[2:], "lr": 0.0})
            assert len(opt.optimizer.param_groups) == 2
        active = params if step >= 3 else params[:2]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        expected = [refs[i].step([p.grad])[0][0] for i, p in enumerate(active)]
        untouched = [p.grad.clone() for p in params[len(active) :]]
        opt.step()
        assert_grads_close([p.grad for p in active], expected, torch.float32, f"step={step}")
        for p, g in zip(params[len(active) :], untouched):
            assert torch.equal(p.grad, g), "a parameter outside the optimizer was touched"
    assert opt.state_dict()["gradstab"]["keys"] == [0, 1, 2, 3]
    assert opt.state_dict()["gradstab"]["k"].tolist() == [6, 6, 3, 3]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none, seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss_fn(model, *batches(seed, 1)[0]).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def train(opt, model, data) -> None:
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("inner_name", ["adamw", "adamw_fused", "sgd_momentum"])
def test_state_dict_round_trip_continues_bit_for_bit(inner_name, seed):
    data = batches(seed, 10)
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(INNER[inner_name](model.parameters()), spike_guard=5.0)
    train(opt, model, data)

    resumed_model = mlp(seed)
    opt_a = gradstab.StabilizedOptimizer(
        INNER[inner_name](resumed_model.parameters()), spike_guard=5.0
    )
    train(opt_a, resumed_model, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert set(saved["opt"]) == {"state", "param_groups", "gradstab"}
    assert saved["opt"]["gradstab"]["keys"] == [0, 1, 2, 3]

    fresh_model = mlp(seed + 1)
    fresh_model.load_state_dict(saved["model"])
    opt_b = gradstab.StabilizedOptimizer(INNER[inner_name](fresh_model.parameters()))
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.stabilizer.spike_guard == 5.0, "the stabilizer's configuration is restored"
    train(opt_b, fresh_model, data[4:])
    assert_same_bits(snapshot(fresh_model), snapshot(model), "weights")
    assert_same_bits(opt_b.state_dict(), opt.state_dict(), "optimizer + stabilizer")


def test_plain_inner_state_dict_loads_and_resets_the_stabilizer(seed):
    data = batches(seed, 6)
    model = mlp(seed)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in data[:3]:
        plain.zero_grad()
        loss_fn(model, x, y).backward()
        plain.step()
    opt = gradstab.StabilizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(opt, model, data[3:])  # the stabilizer has state now
    opt.load_state_dict(plain.state_dict())
    assert_same_bits(opt.optimizer.state_dict(), plain.state_dict(), "inner")
    assert opt.stabilizer.state_dict()["keys"] == []
    # ...and the wrapper's own state dict loads into a bare optimizer, which ignores "gradstab".
    bare = torch.optim.AdamW(mlp(seed).parameters(), lr=1e-2)
    train(opt, model, data[:2])
    bare.load_state_dict(opt.state_dict())
    assert_same_bits(bare.state_dict(), opt.optimizer.state_dict(), "bare")


def test_bad_state_dict_is_refused_before_anything_changes(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(opt, model, batches(seed, 3))
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["gradstab"]["config"]["gamma2"] = 1.5
    before = opt.state_dict()
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


def test_stabilizer_checkpoint_for_other_positions_is_refused_at_the_next_step(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    train(opt, model, batches(seed, 2))
    sd = opt.state_dict()
    smaller = gradstab.StabilizedOptimizer(torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    sd["param_groups"][0]["params"] = [0, 1]
    sd["state"] = {}
    smaller.load_state_dict(sd)
    loss_fn(model, *batches(seed, 1)[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="2, 3"):
        smaller.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_hooks_registered_on_the_wrapper_run(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}
    )
    train(opt, model, batches(seed, 1))
    assert calls == [("pre", True), ("post", True)]
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)


def test_pickle_and_deepcopy(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(opt, model, batches(seed, 2))
    assert opt.last_stats is not None
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, gradstab.StabilizedOptimizer)
        assert clone.optimizer is not opt.optimizer
        assert_same_bits(clone.stabilizer.state_dict(), opt.stabilizer.state_dict(), "stabilizer")
        clone.register_step_pre_hook(lambda o, a, k: None)


def test_last_stats_are_the_steps_figures(seed):
    model = mlp(seed)
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = batches(seed, 1)[0]
    loss_fn(model, x, y).backward()
    before = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    opt.step()
    after = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    figures = opt.last_stats.to_dict()
    assert figures["norm_before"] == pytest.approx(before.item(), rel=1e-5)
    assert figures["norm_after"] == pytest.approx(after.item(), rel=1e-5)
    assert figures["skipped"] == 0


def test_bad_arguments_are_named():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        gradstab.StabilizedOptimizer(p)
    with pytest.raises(TypeError, match="LBFGS"):
        gradstab.StabilizedOptimizer(torch.optim.LBFGS(p))
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="already"):
        gradstab.StabilizedOptimizer(opt)
    with pytest.raises(ValueError, match="gamma1"):
        gradstab.StabilizedOptimizer(torch.optim.SGD(p, lr=0.1), gamma1=1.0)
    with pytest.raises(TypeError, match="colour"):
        gradstab.StabilizedOptimizer(torch.optim.SGD(p, lr=0.1), colour="red")
    p[0].grad = torch.randn(3).to_sparse()
    with pytest.raises(ValueError, match=r"params'\]\[0\].*sparse"):
        opt.step()
