"""Hostile input (issue 14): what a careless or adversarial user can hand gradstab, on every
backend.

1. Finite gradients whose norm passes float32's range: one contract (a valid, huge gradient) on
   every backend, in StabilizedAdamW, with "raise", the global norm and bfloat16, and statistics
   that describe what the kernels did.
2. A state key that now names another tensor than its state was built for.
3. Settings passed explicitly (or assigned) against a checkpoint's.
4. Gradients without data (meta, freed storage).
5. Checkpoint values no run can reach.
6. DDP's ``module.`` prefix, the HF warning's location, the quickstart, the demo's pointer, eps.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gradstab
from gradstab import functional as F
from tests.conftest import CPU_BACKENDS, RTOL
from tests.helpers import assert_grads_close
from tests.reference import ReferenceStabilizer

ROOT = Path(__file__).resolve().parents[1]
FLOAT32_MAX = torch.finfo(torch.float32).max
ADAMW_BACKENDS = ["auto", "torch"]  # StabilizedAdamW: its compiled op where it has one, torch ops


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))


def fill_grads(module: nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    for p in module.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def l2(tensors: list[Tensor]) -> float:
    """The L2 norm of tensors together, in float64 without overflow (math.hypot scales)."""
    return math.hypot(*(math.hypot(*t.double().flatten().tolist()) for t in tensors))


def huge_grads(gen: torch.Generator, dtype: torch.dtype, granularity: str) -> list[Tensor]:
    """Finite gradients whose norm (per tensor, or over all for "global") passes 3.4e38, and
    ordinary ones next to them."""
    if granularity == "param":
        values = 3e38 * (0.5 + 0.5 * torch.rand(4, generator=gen, dtype=torch.float64))
        huge = [values]
    else:  # no tensor is beyond float32 on its own; together they are (about 6e38)
        huge = [1e37 * (0.9 + 0.1 * torch.rand(400, generator=gen, dtype=torch.float64))] * 10
        huge = [h.clone() for h in huge]
    ordinary = [torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.zeros(5)]
    return [g.to(dtype) for g in huge + ordinary]


def params_with(grads: list[Tensor]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


# ------------------------------------------------------------------------------------------------
# 1. huge but finite


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_huge_finite_gradient_is_a_valid_huge_gradient(backend, dtype, granularity, seed):
    """Every element finite, the norm past float32's max: rescaled like any gradient, counted,
    and reported with its true norm, as the float64 reference does it."""
    gen = torch.Generator().manual_seed(seed)
    warmup = [g / 1e36 for g in huge_grads(gen, dtype, granularity)]
    grads = huge_grads(gen, dtype, granularity)
    n = len(grads)
    ref = ReferenceStabilizer(n, granularity=granularity)
    state = F.init_state(grads, granularity)
    for step in (warmup, grads):
        step = [g.clone() for g in step]
        expected, ref_norms = ref.step(step)
        norms = F.stabilize_(step, state, granularity=granularity, backend=backend)
        assert_grads_close(step, expected, dtype, f"seed={seed}")
    assert norms.dtype == torch.float64
    assert torch.isfinite(norms).all()
    assert max(ref_norms) > FLOAT32_MAX or math.hypot(*ref_norms) > FLOAT32_MAX
    torch.testing.assert_close(
        norms, torch.tensor(ref_norms, dtype=torch.float64), rtol=1e-6, atol=0
    )
    expected_k = [2] if granularity == "global" else [2] * (n - 1) + [0]
    assert state.k.tolist() == expected_k

    # The same through GradientStabilizer: the figures are the true ones, nothing is "skipped".
    stab = gradstab.GradientStabilizer(granularity=granularity, backend=backend)
    params = params_with(warmup)
    stab.apply(params)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    stats = stab.apply(params)
    figures = stats.to_dict()
    assert figures["skipped"] == 0
    assert figures["norm_before"] == pytest.approx(l2(grads), rel=1e-9)
    assert figures["norm_after"] == pytest.approx(l2([p.grad for p in params]), rel=RTOL[dtype])
    assert stats.norm_before.dtype == stats.norm_after.dtype == torch.float64
    assert stab.state_dict()["k"].tolist() == expected_k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_below_float32_squares_is_not_a_zero_gradient(backend, seed):
    """The mirror case: squares below float32's range must not make a nonzero gradient read 0."""
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.rand(300, generator=gen, dtype=torch.float64) + 0.5) * 1e-25]
    grads = [g.float() for g in grads] + [torch.zeros(3)]
    ref = ReferenceStabilizer(2)
    state = F.init_state(grads)
    expected, ref_norms = ref.step(grads)
    norms = F.stabilize_(grads, state, backend=backend)
    assert state.k.tolist() == [1, 0]
    assert norms[0].item() == pytest.approx(ref_norms[0], rel=1e-6)
    assert_grads_close(grads, expected, torch.float32, f"seed={seed}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_raise_policy_lets_huge_finite_gradients_through_and_stops_nonfinite_ones(
    backend, granularity, seed
):
    gen = torch.Generator().manual_seed(seed)
    grads = huge_grads(gen, torch.float32, granularity)
    params = params_with(grads)
    stab = gradstab.GradientStabilizer(nonfinite="raise", granularity=granularity, backend=backend)
    stats = stab.apply(params)
    assert stats.to_dict()["skipped"] == 0
    assert l2([p.grad for p in params]) < 100  # rescaled
    bad = len(params) - 2  # the ordinary (7, 3) gradient
    params[bad].grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in params]
    sd = stab.state_dict()
    with pytest.raises(FloatingPointError, match=rf"params\[{bad}\]"):
        stab.apply(params)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert torch.equal(stab.state_dict()["k"], sd["k"])


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_stabilized_adamw_steps_on_a_huge_finite_gradient_like_the_reference(
    backend, granularity, seed
):
    """StabilizedAdamW (compiled op and torch fallback): the weights move as AdamW moves them
    with the reference's stabilized gradients."""
    gen = torch.Generator().manual_seed(seed)
    grads = huge_grads(gen, torch.float32, granularity)
    params = [nn.Parameter(torch.randn(g.shape, generator=gen)) for g in grads]
    initial = [p.detach().clone() for p in params]
    twins = [nn.Parameter(p.clone()) for p in initial]
    opt = gradstab.StabilizedAdamW(params, lr=0.1, granularity=granularity)
    opt._backend = backend
    ref_opt = torch.optim.AdamW(twins, lr=0.1, foreach=False)
    ref = ReferenceStabilizer(len(grads), granularity=granularity)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    expected, _ = ref.step(grads)
    for t, e in zip(twins, expected):
        t.grad = e.float()
    opt.step()
    ref_opt.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
    assert not torch.equal(params[0].detach(), initial[0])
    assert opt.state_dict()["gradstab"]["k"].tolist() == (
        [1] if granularity == "global" else [1] * (len(grads) - 1) + [0]
    )
    figures = opt.last_stats.to_dict()
    assert figures["skipped"] == 0
    assert figures["norm_before"] == pytest.approx(l2(grads), rel=1e-9)
    assert figures["norm_after"] == pytest.approx(l2(expected), rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_stats_describe_the_gradients_before_and_after(backend, nonfinite, granularity, seed):
    """norm_before/norm_after are the L2 norms of the gradients as they were and as they are;
    skipped counts the gradients left unscaled: under huge, NaN, Inf and zero gradients."""
    gen = torch.Generator().manual_seed(seed)
    stab = gradstab.GradientStabilizer(
        nonfinite=nonfinite, granularity=granularity, backend=backend
    )
    grads = [torch.randn(s, generator=gen) for s in [(5,), (3, 4), (7,), (2,), (6,)]]
    params = params_with(grads)
    stab.apply(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[0].grad.fill_(2e38)  # huge but finite
    params[3].grad.zero_()
    if granularity == "param":
        params[2].grad[1] = float("nan")
    before = [p.grad.clone() for p in params]
    figures = stab.apply(params).to_dict()
    after = [p.grad for p in params]
    assert figures["norm_before"] == pytest.approx(l2(before), rel=1e-9, nan_ok=True)
    if granularity == "param" and nonfinite == "skip":
        assert math.isnan(figures["norm_after"])
    else:
        assert figures["norm_after"] == pytest.approx(l2(after), rel=1e-5)
    assert figures["skipped"] == (1 if granularity == "param" else 0)


# ------------------------------------------------------------------------------------------------
# 2. a key that now names another tensor


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_models_applied_in_turn_are_refused_naming_the_key(backend, seed):
    """A GAN's generator and discriminator share parameter names: one stabilizer would merge
    their statistics."""
    gen = torch.Generator().manual_seed(seed)
    generator, discriminator = small_model(), small_model()
    stab = gradstab.GradientStabilizer(backend=backend)
    fill_grads(generator, gen, 100.0)
    stab.apply(generator)
    saved = stab.state_dict()
    fill_grads(discriminator, gen)
    grads = [p.grad.clone() for p in discriminator.parameters()]
    with pytest.raises(RuntimeError, match=r"'0\.weight'.*GradientStabilizer \(or callback\) per"):
        stab.apply(discriminator)
    assert all(torch.equal(p.grad, g) for p, g in zip(discriminator.parameters(), grads))
    assert torch.equal(stab.state_dict()["k"], saved["k"])
    # The generator keeps working, and a stabilizer of its own serves the discriminator.
    fill_grads(generator, gen)
    stab.apply(generator)
    assert stab.state_dict()["k"].tolist() == [2] * 4
    gradstab.GradientStabilizer(backend=backend).apply(discriminator)


def test_two_submodules_with_the_same_local_names_are_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model[0])
    with pytest.raises(RuntimeError, match=r"'weight'"):
        stab.apply(model[2])


def test_a_module_then_its_optimizer_is_refused(seed):
    """apply(model), then apply(optimizer): each parameter would get a second state."""
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    with pytest.raises(RuntimeError, match=r"already has statistics under the key '0\.weight'"):
        stab.apply(opt)
    assert stab.state_dict()["keys"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_mixing_names_and_positions_of_distinct_tensors_warns_once(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    extra = nn.Parameter(torch.randn(3))
    stab = gradstab.GradientStabilizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fill_grads(model, gen)
            extra.grad = torch.randn(3, generator=gen)
            stab.apply(model)
            stab.apply([extra])
    mixed = [w for w in caught if "by position" in str(w.message)]
    assert len(mixed) == 1, [str(w.message) for w in caught]
    assert mixed[0].filename == __file__


def test_a_replaced_parameter_of_another_shape_is_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(model)
    model[2] = nn.Linear(7, 5)  # the old layer is gone
    gc.collect()
    fill_grads(model, gen)
    with pytest.raises(RuntimeError, match=r"'2\.weight'.*shape \(3, 7\).*\(5, 7\)"):
        stab.apply(model)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_legitimate_changes_keep_working(backend, seed):
    """Tied weights, parameters replaced by tensors of the same shape (load_state_dict with
    assign=True), a growing optimizer and a model stepped for many steps."""
    gen = torch.Generator().manual_seed(seed)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    names = [name for name, _ in model.named_parameters()]
    stab = gradstab.GradientStabilizer(backend=backend)
    ref = ReferenceStabilizer(len(names))
    for _ in range(3):
        fill_grads(model, gen)
        expected, _ = ref.step([p.grad for p in model.parameters()])
        stab.apply(model)
        assert_grads_close([p.grad for p in model.parameters()], expected, torch.float32, "")
    assert stab.state_dict()["keys"] == names

    model = small_model()
    stab = gradstab.GradientStabilizer(backend=backend)
    ref = ReferenceStabilizer(4)
    for step in range(3):
        if step == 2:
            model.load_state_dict(small_model().state_dict(), assign=True)  # new Parameters
            gc.collect()
        fill_grads(model, gen)
        expected, _ = ref.step([p.grad for p in model.parameters()])
        stab.apply(model)
        assert_grads_close([p.grad for p in model.parameters()], expected, torch.float32, "")
    assert stab.state_dict()["k"].tolist() == [3] * 4

    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(params[:1], lr=0.1), backend=backend)
    params[0].grad = torch.randn(3, generator=gen)
    opt.step()
    opt.add_param_group({"params": params[1:]})
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert opt.stabilizer.state_dict()["k"].tolist() == [2, 1]


# ------------------------------------------------------------------------------------------------
# 3. explicit settings against a checkpoint's


def saved_with(**settings) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = small_model()
    stab = gradstab.GradientStabilizer(**settings)
    fill_grads(model, gen)
    stab.apply(model)
    return stab.state_dict()


def test_explicit_settings_win_over_the_checkpoint_with_one_warning():
    sd = saved_with(spike_guard=10.0)
    stab = gradstab.GradientStabilizer(spike_guard=5.0, gamma2=0.99)
    with pytest.warns(UserWarning) as caught:
        stab.load_state_dict(sd)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "spike_guard=5.0 (checkpoint: 10.0)" in message
    assert "gamma2=0.99 (checkpoint: 0.999)" in message
    assert (stab.spike_guard, stab.gamma2) == (5.0, 0.99)
    assert torch.equal(stab.state_dict()["m"], sd["m"])  # the statistics are loaded


def test_settings_not_chosen_take_the_checkpoints_without_a_warning():
    sd = saved_with(spike_guard=10.0, gamma1=0.5)
    stab = gradstab.GradientStabilizer(gamma1=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stab.load_state_dict(sd)
    assert stab.spike_guard == 10.0


def test_assigned_settings_are_validated_and_win_over_the_checkpoint():
    stab = gradstab.GradientStabilizer()
    stab.spike_guard = 10
    assert stab.spike_guard == 10.0 and isinstance(stab.spike_guard, float)
    with pytest.warns(UserWarning, match=r"spike_guard=10\.0 \(checkpoint: None\)"):
        stab.load_state_dict(saved_with())
    assert stab.spike_guard == 10.0
    bad = {
        "gamma1": 1.0,
        "gamma2": -0.1,
        "eps": 1e300,
        "bias_correction": 1,
        "granularity": "layer",
        "nonfinite": "ignore",
        "spike_guard": -2.0,
    }
    for name, value in bad.items():
        before = stab.config()
        with pytest.raises((ValueError, TypeError), match=name):
            setattr(stab, name, value)
        assert stab.config() == before


def test_granularity_chosen_unlike_the_checkpoints_starts_fresh_and_says_so():
    sd = saved_with(granularity="global")
    stab = gradstab.GradientStabilizer(granularity="param")
    with pytest.warns(UserWarning, match=r"granularity='param' \(checkpoint: 'global'\).*fresh"):
        stab.load_state_dict(sd)
    assert stab.granularity == "param" and stab.state_dict()["keys"] == []
    adopted = gradstab.GradientStabilizer()
    adopted.load_state_dict(sd)
    assert adopted.granularity == "global" and adopted.state_dict()["keys"] == ["<global>"]
    with pytest.raises(ValueError, match=r"granularity cannot change.*reset"):
        adopted.granularity = "param"
    adopted.reset()
    adopted.granularity = "param"


def test_stabilized_adamw_and_optimizer_keep_their_chosen_settings(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(4, generator=gen))]
    params[0].grad = torch.randn(4, generator=gen)
    plain = gradstab.StabilizedAdamW(params)
    plain.step()
    without_guard = plain.state_dict()

    opt = gradstab.StabilizedAdamW(params, spike_guard=10.0)
    with pytest.warns(UserWarning, match="spike_guard"):
        opt.load_state_dict(without_guard)
    assert opt.spike_guard == 10.0
    resumed = gradstab.StabilizedAdamW(params)
    resumed.load_state_dict(without_guard)
    assert resumed.spike_guard is None
    resumed.spike_guard = 10.0  # the documented fix for a post-spike stall, in a resumed run
    assert (
        resumed.spike_guard == 10.0
        and resumed.state_dict()["gradstab"]["config"]["spike_guard"] == 10.0
    )
    with pytest.raises(ValueError, match="stab_eps"):
        resumed.stab_eps = 1e300
    with pytest.raises(ValueError, match="spike_guard"):
        resumed.spike_guard = -1.0

    wrapped = gradstab.StabilizedOptimizer(torch.optim.AdamW(params), spike_guard=5.0)
    with pytest.warns(UserWarning, match=r"spike_guard=5\.0 \(checkpoint: None\)"):
        wrapped.load_state_dict(without_guard)
    assert wrapped.stabilizer.spike_guard == 5.0


@needs("transformers")
def test_huggingface_resume_keeps_the_callbacks_arguments(tmp_path):
    from gradstab.integrations.huggingface import GradientStabilizerCallback
    from tests.test_huggingface import make_trainer, tiny_llama, train

    train(tmp_path / "a", stabilizer={"spike_guard": 10.0}, save_steps=2, max_steps=2)
    checkpoint = next((tmp_path / "a" / "off").glob("checkpoint-*"))
    cb = GradientStabilizerCallback(spike_guard=5.0, gamma2=0.99)
    trainer = make_trainer(tmp_path / "b", tiny_llama(0), [cb], max_steps=3)
    with pytest.warns(UserWarning, match=r"spike_guard=5\.0 \(checkpoint: 10\.0\)"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert (cb.stabilizer.spike_guard, cb.stabilizer.gamma2) == (5.0, 0.99)
    assert cb.state()["args"] == {"spike_guard": 5.0, "gamma2": 0.99}
    assert int(cb.stabilizer.state_dict()["k"].max()) == 3  # the statistics were resumed


@needs("lightning")
def test_lightning_callback_keeps_its_arguments_on_load():
    from gradstab.integrations.lightning import GradientStabilizerCallback

    saved = GradientStabilizerCallback()
    saved.stabilizer.load_state_dict(saved_with(spike_guard=10.0))
    cb = GradientStabilizerCallback(spike_guard=5.0)
    with pytest.warns(UserWarning, match=r"spike_guard=5\.0 \(checkpoint: 10\.0\)"):
        cb.load_state_dict(saved.state_dict())
    assert cb.stabilizer.spike_guard == 5.0


# ------------------------------------------------------------------------------------------------
# 4. gradients without data


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["param", "global"])
def test_meta_gradients_are_refused_and_to_empty_then_works(backend, granularity, seed):
    """A model moved to the meta device: its gradients are refused up front, the statistics
    stay, and once the model is materialized again (to_empty) training goes on."""
    gen = torch.Generator().manual_seed(seed)
    stab = gradstab.GradientStabilizer(backend=backend, granularity=granularity)
    model = small_model()
    ref = ReferenceStabilizer(4, granularity=granularity)
    fill_grads(model, gen)
    ref.step([p.grad for p in model.parameters()])
    stats = stab.apply(model)
    saved = stab.state_dict()

    model.to("meta")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"'0\.weight'.*meta"):
        stab.apply(model)
    after = stab.state_dict()
    assert after["keys"] == saved["keys"]
    assert all(torch.equal(after[name], saved[name]) for name in ("m", "v", "k"))
    assert "skipped" in repr(stats) and stats.to_dict()["skipped"] == 0

    model.to_empty(device="cpu")
    gc.collect()
    fill_grads(model, gen)
    expected, _ = ref.step([p.grad for p in model.parameters()])
    stats = stab.apply(model)
    assert_grads_close([p.grad for p in model.parameters()], expected, torch.float32, "")
    assert stats.to_dict()["skipped"] == 0 and stab.state_dict()["k"].min() == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_with_freed_storage_is_refused_not_a_crash(backend):
    """A gradient whose storage was freed: torch's own ops crash the process on it. Run in a
    child process so that a crash fails this test instead of the session."""
    code = f"""
import torch, gradstab
from torch import nn
p = nn.Parameter(torch.randn(4))
p.grad = torch.randn(4)
p.grad.untyped_storage().resize_(0)
stab = gradstab.GradientStabilizer(backend={backend!r})
try:
    stab.apply([p])
except ValueError as err:
    assert "params[0]" in str(err) and "storage" in str(err), err
    assert stab.state_dict()["keys"] == []
    print("refused")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0 and out.stdout.strip() == "refused", (out.returncode, out.stderr)


# ------------------------------------------------------------------------------------------------
# 5. checkpoint values


BAD_VALUES = {
    "negative k": ("k", 1, -3, r"negative update count k"),
    "NaN m": ("m", 2, math.nan, r"first moment m"),
    "infinite m": ("m", 0, math.inf, r"first moment m"),
    "negative m": ("m", 3, -1.0, r"first moment m"),
    "negative v": ("v", 1, -1.0, r"second moment v"),
    "NaN v": ("v", 0, math.nan, r"second moment v"),
}


@pytest.mark.parametrize("bad", BAD_VALUES, ids=list(BAD_VALUES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unreachable_checkpoint_values_are_refused_naming_the_key(bad, backend, seed):
    name, index, value, message = BAD_VALUES[bad]
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer(backend=backend)
    fill_grads(model, gen)
    stab.apply(model)
    good = stab.state_dict()
    edited = stab.state_dict()
    edited[name][index] = value
    key = good["keys"][index]
    with pytest.raises(ValueError, match=rf"{message}.* for '{re.escape(key)}'"):
        stab.load_state_dict(edited)
    kept = stab.state_dict()
    assert all(torch.equal(kept[n], good[n]) for n in ("m", "v", "k"))
    # The same through the optimizers, before anything of theirs changes.
    opt = gradstab.StabilizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.stabilizer.load_state_dict(good)
    sd = {**opt.state_dict(), "gradstab": edited}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    adamw = gradstab.StabilizedAdamW(model.parameters())
    with pytest.raises(ValueError, match=message):
        adamw.load_state_dict({**adamw.state_dict(), "gradstab": edited})


def test_moments_without_an_update_are_refused():
    sd = saved_with()
    sd["k"][0] = 0
    with pytest.raises(ValueError, match=r"m or v nonzero while k = 0 for '0\.weight'"):
        gradstab.GradientStabilizer().load_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# 6. the smaller points


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_of_a_wrapped_model_loads_into_the_bare_one(backend, prefix, seed):
    """DistributedDataParallel (and DataParallel) name parameters "module.<name>": a checkpoint
    saved through one resumes the bare model exactly."""
    gen = torch.Generator().manual_seed(seed)
    model, twin = small_model(), small_model()
    twin.load_state_dict(model.state_dict())
    stab, uninterrupted = (gradstab.GradientStabilizer(backend=backend) for _ in range(2))
    for _ in range(2):
        fill_grads(model, gen)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        stab.apply(model)
        uninterrupted.apply(twin)
    sd = stab.state_dict()
    sd["keys"] = [prefix + key for key in sd["keys"]]
    resumed = gradstab.GradientStabilizer(backend=backend)
    resumed.load_state_dict(sd)
    fill_grads(model, gen)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    resumed.apply(model)
    uninterrupted.apply(twin)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    assert resumed.state_dict()["keys"] == uninterrupted.state_dict()["keys"]


def test_data_parallel_wrapper_keys_by_the_bare_names(seed):
    gen = torch.Generator().manual_seed(seed)
    model = small_model()
    stab = gradstab.GradientStabilizer()
    fill_grads(model, gen)
    stab.apply(nn.DataParallel(model))
    stab.apply(model)  # the same parameters under the same names
    assert stab.state_dict()["keys"] == [name for name, _ in model.named_parameters()]


@needs("transformers")
def test_huggingface_clipping_warning_points_at_the_users_code(tmp_path):
    from gradstab.integrations.huggingface import GradientStabilizerCallback
    from tests.test_huggingface import make_trainer, tiny_llama

    trainer = make_trainer(
        tmp_path, tiny_llama(0), [GradientStabilizerCallback()], max_steps=1, max_grad_norm=1.0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "max_grad_norm" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__, ours[0].filename


def quickstart_snippets() -> list[tuple[str, str]]:
    """The first python block of the README's Quickstart and of docs/quickstart.md's first
    section."""
    found = []
    for path, heading in (("README.md", "## Quickstart"), ("docs/quickstart.md", "## One line")):
        text = (ROOT / path).read_text()
        section = text[text.index(heading) :]
        block = re.search(r"```python\n(.*?)```", section, re.S)
        found.append((path, block.group(1)))
    return found


@pytest.mark.parametrize(("path", "code"), quickstart_snippets(), ids=["README", "quickstart"])
def test_quickstart_snippet_runs_as_written(path, code):
    namespace: dict = {}
    exec(compile(code, path, "exec"), namespace)
    assert isinstance(namespace["stats"], gradstab.StabilizerStats)


def test_demo_points_at_something_an_installed_user_has(monkeypatch, capsys):
    """The output names no file of the source tree; the pointer (--help) has the definitions."""
    pytest.importorskip("matplotlib")
    from gradstab import demo

    help_text = subprocess.run(
        [sys.executable, "-m", "gradstab", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "recovery" in help_text and "diverged" in help_text

    cfg = demo.QUICK
    results = demo.DemoResults(cfg, 3.2)
    run = demo.Run([4.6, 3.0], 0.0)
    results.spiked = {s: {m: run for m in demo.METHODS} for s in cfg.grad_scales}
    results.sweep = {
        m: {lr: [run] * len(cfg.sweep_seeds) for lr in cfg.sweep_lrs} for m in demo.METHODS
    }
    monkeypatch.setattr(demo, "run_demo", lambda cfg, log: results)
    monkeypatch.setattr(demo, "spike_table", lambda results: "")
    monkeypatch.setattr(demo, "plot", lambda results, out: None)
    assert demo.main(["--quick", "--out", "unused.png"]) == 0
    printed = capsys.readouterr().out
    assert "docs/" not in printed
    assert "python -m gradstab demo --help" in printed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps_has_an_upper_bound_everywhere(backend):
    g = [torch.randn(3)]
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        gradstab.GradientStabilizer(eps=1e300, backend=backend)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        F.stabilize_(g, F.init_state(g), eps=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"stab_eps must be in \(0, 1\)"):
        gradstab.StabilizedAdamW([nn.Parameter(torch.randn(3))], stab_eps=1e300)
    gradstab.GradientStabilizer(eps=0.5, backend=backend).apply(params_with(g))
