"""AMP: ``torch.amp.GradScaler`` with ``GradientStabilizer.apply`` and ``StabilizedOptimizer``.

With a power-of-two loss scale, unscaling is exact, so a scaled float32 run must equal the unscaled
run bit for bit; a step the scaler skips must leave no trace, so a run with an overflow step must
equal the run that never saw that batch. Each is checked on every path: gradstab unscales, the
user unscaled first, the wrapper stepped by the scaler, and the wrapper around a fused optimizer
that takes ``grad_scale``/``found_inf`` (no host sync).
"""

from __future__ import annotations

import pytest
import torch

import gradstab
from tests.training_helpers import SyncCounter, assert_same_bits, batches, loss_fn, mlp, snapshot

STEPS = 8
INIT_SCALE = 2.0**12

# (how the step is taken, who unscales): "apply" = stab.apply(model, scaler=, optimizer=) then
# scaler.step(opt); "wrapper" = scaler.step(StabilizedOptimizer(...)).
PATHS = [
    ("apply", "gradstab", False),
    ("apply", "user", False),
    ("apply", "gradstab", True),
    ("wrapper", "scaler", False),
    ("wrapper", "user", False),
    ("wrapper", "scaler", True),
    ("wrapper", "user", True),
]
PATH_IDS = [f"{how}-{who}-{'fused' if fused else 'plain'}" for how, who, fused in PATHS]


def poison(model: torch.nn.Module) -> None:
    """An overflow in one scaled gradient, as fp16 activations produce it."""
    next(iter(model.parameters())).grad[0, 0] = float("inf")


def run(
    data,
    seed: int,
    *,
    how: str,
    who: str,
    fused: bool,
    scaled: bool,
    overflow_at: int | None = None,
    granularity: str = "param",
    watch=None,
):
    """Trains ``mlp(seed)`` on ``data``; returns weights, optimizer and stabilizer state."""
    model = mlp(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=scaled)
    if how == "wrapper":
        opt = gradstab.StabilizedOptimizer(inner, granularity=granularity)
        stab = opt.stabilizer
    else:
        opt, stab = inner, gradstab.GradientStabilizer(granularity=granularity)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == overflow_at:
            poison(model)
        before = stab.state_dict()
        if who == "user":
            scaler.unscale_(opt)
        if how == "apply":
            stats = stab.apply(model, scaler=scaler, optimizer=opt)
        scaler.step(opt)
        scaler.update()
        if how == "wrapper":
            stats = opt.last_stats
        if watch is not None:
            watch(step, before, stab.state_dict(), stats, scaler)
    return {"weights": snapshot(model), "opt": inner.state_dict(), "stab": stab.state_dict()}


@pytest.mark.parametrize(("how", "who", "fused"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_scaled_fp32_run_equals_unscaled_bit_for_bit(how, who, fused, granularity, seed):
    data = batches(seed, STEPS)
    # A loss spike on one step: the stabilizer's statistics see a real outlier.
    data[4] = (data[4][0] * 30.0, data[4][1])
    kwargs = dict(how=how, who=who, fused=fused, granularity=granularity)
    scaled = run(data, seed, scaled=True, **kwargs)
    plain = run(data, seed, scaled=False, **kwargs)
    assert_same_bits(scaled, plain, "scaled vs unscaled")
    assert scaled["stab"]["k"].min().item() == STEPS


@pytest.mark.parametrize(("how", "who", "fused"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("overflow_at", [0, 3])
def test_skipped_overflow_step_leaves_no_trace(how, who, fused, overflow_at, seed):
    data = batches(seed, STEPS)
    seen = {}

    def watch(step, before, after, stats, scaler):
        if step == overflow_at:
            seen["before"], seen["after"] = before, after
            seen["skipped"] = None if stats is None else stats.to_dict()["skipped"]
            seen["scale"] = scaler.get_scale()

    kwargs = dict(how=how, who=who, fused=fused)
    skipped = run(data, seed, scaled=True, overflow_at=overflow_at, watch=watch, **kwargs)
    never_seen = data[:overflow_at] + data[overflow_at + 1 :]
    reference = run(never_seen, seed, scaled=False, **kwargs)
    assert_same_bits(skipped, reference, "run with a skipped step vs run without that batch")
    assert seen["scale"] == INIT_SCALE / 2, "the scaler did skip the step"
    if overflow_at == 0:
        # The first step registers the parameters with empty statistics: the same as no state.
        assert seen["after"]["k"].eq(0).all() and seen["after"]["m"].eq(0).all()
        assert seen["after"]["v"].eq(0).all()
    else:
        assert_same_bits(seen["after"], seen["before"], "stabilizer around the skipped step")
    if how == "apply" or fused:
        # The plain wrapper is not even called by the scaler on a skipped step.
        assert seen["skipped"] == 4


def test_apply_unscales_exactly_once_and_marks_the_optimizer(seed):
    """apply() unscales when the scaler has not (and the scaler then does not unscale again)."""
    from torch.amp.grad_scaler import OptState

    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    stab = gradstab.GradientStabilizer(gamma1=0.0, gamma2=0.0, bias_correction=False)
    x, y = batches(seed, 1)[0]
    loss_fn(model, x, y).backward()
    unscaled = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_fn(model, x, y)).backward()
    stats = stab.apply(model, scaler=scaler, optimizer=opt)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
    # gamma = 0: m = n and v = n^2, so each gradient leaves with unit norm, in its direction.
    for p, g in zip(model.parameters(), unscaled):
        torch.testing.assert_close(p.grad, g / g.double().norm().float(), rtol=1e-6, atol=1e-7)
    norms = torch.stack([g.double().norm() for g in unscaled]).norm()
    assert stats.to_dict()["norm_before"] == pytest.approx(norms.item(), rel=1e-6)
    scaler.step(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match=r"after scaler.step"):
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.step(opt)
        stab.apply(model, scaler=scaler, optimizer=opt)


def test_no_host_sync_with_a_fused_inner_optimizer(seed):
    """The fused AMP path reads nothing back: no item(), bool(), tolist(), nonzero()... The plain
    path is the control: GradScaler itself reads found_inf there, and the counter sees it."""
    counts = {}
    for fused in (True, False):
        model = mlp(seed)
        opt = gradstab.StabilizedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        counter = SyncCounter()
        for step, (x, y) in enumerate(batches(seed, 5)):
            opt.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            if step == 3:
                poison(model)
            if step == 0:  # the first step lays out the state and the optimizer's buffers
                scaler.step(opt)
                scaler.update()
                continue
            with counter.active():
                scaler.step(opt)
                scaler.update()
        counts[fused] = counter.calls
        assert opt.stabilizer.state_dict()["k"].tolist() == [4, 4, 4, 4]  # 5 steps, 1 skipped
    assert counts[True] == [], counts[True]
    assert "aten::_local_scalar_dense" in counts[False], counts[False]


def test_no_host_sync_in_apply_with_a_scaler(seed):
    model = mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    stab = gradstab.GradientStabilizer()
    counter = SyncCounter()
    for step, (x, y) in enumerate(batches(seed, 4)):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == 0:
            stab.apply(model, scaler=scaler, optimizer=opt)
        else:
            with counter.active():
                stab.apply(model, scaler=scaler, optimizer=opt)
        scaler.step(opt)
        scaler.update()
    assert counter.calls == []


def test_sync_counter_sees_host_reads():
    t = torch.tensor([1.5, 0.0])
    with SyncCounter().active() as counter:
        t[0].item()
        bool(t[0])
        float(t[1])
        t.tolist()
        t.nonzero()
        if t[1]:
            pass
    assert counter.calls.count("aten::_local_scalar_dense") >= 3
    assert "Tensor.tolist" in counter.calls and "aten::nonzero" in counter.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda(seed):
    model = mlp(seed).cuda()
    opt = gradstab.StabilizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
    scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)
    for step, (x, y) in enumerate(batches(seed, 5)):
        x, y = x.cuda(), y.cuda()
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        if step == 3:
            poison(model)
        if step > 0:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.stabilizer.state_dict()["k"].tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("how", ["apply", "wrapper", "wrapper_fused"])
def test_fp16_autocast_on_cpu_counts_only_the_steps_taken(how, seed):
    """Real fp16 autocast with a huge initial scale: the first steps overflow and are skipped
    (the scaler halves its scale each time); the stabilizer counts exactly the steps taken."""
    model = mlp(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=how == "wrapper_fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    if how == "apply":
        opt, stab = inner, gradstab.GradientStabilizer()
    else:
        opt = gradstab.StabilizedOptimizer(inner)
        stab = opt.stabilizer
    taken = 0
    for x, y in batches(seed, 12):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        assert out.dtype == torch.float16
        scaler.scale(torch.nn.functional.mse_loss(out.float(), y)).backward()
        if how == "apply":
            stab.apply(model, scaler=scaler, optimizer=opt)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        taken += scaler.get_scale() >= scale
    assert 0 < taken < 12, "the test needs both skipped and taken steps"
    assert stab.state_dict()["k"].tolist() == [taken] * 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
