"""ZClip's rule (gradstab.experiment.zclip) against the published rule, written out again here."""

from __future__ import annotations

import math

import pytest
import torch

from gradstab.experiment.zclip import ZClip

ALPHA, Z, WARMUP, MAX_NORM, EPS = 0.97, 2.5, 25, 1.0, 1e-6


def published_rule(norms, alpha=ALPHA, z_thresh=Z, warmup=WARMUP, max_norm=MAX_NORM, eps=EPS):
    """The norm each step is clipped to (Kumar et al. 2025, z-score mode, reciprocal threshold),
    in float64 tensors: warm-up clips to ``max_norm`` and collects; then the EMA statistics."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    targets = torch.minimum(norms[:warmup], torch.tensor(max_norm, dtype=torch.float64))
    mu = norms[:warmup].mean()
    var = norms[:warmup].var(unbiased=False)
    out = targets.tolist()
    for n in norms[warmup:]:
        sigma = var.sqrt()
        z = (n - mu) / (sigma + eps)
        c = mu + z_thresh * sigma / (z / z_thresh) if z > z_thresh else n
        mu = alpha * mu + (1 - alpha) * c
        var = alpha * var + (1 - alpha) * (c - mu) ** 2
        out.append(float(c))
    return out


def norms_with_spikes(gen: torch.Generator, steps: int) -> list[float]:
    """Gradient norms drifting around 1, some 2-1e4 times larger, some steps in a row."""
    base = 1.0 + 0.3 * torch.randn(steps, generator=gen, dtype=torch.float64).abs()
    base *= torch.linspace(1.0, 0.3, steps, dtype=torch.float64)  # a slow fall, as in training
    spikes = torch.rand(steps, generator=gen) < 0.08
    size = 10 ** (torch.rand(steps, generator=gen, dtype=torch.float64) * 4 + 0.3)
    return torch.where(spikes, base * size, base).tolist()


def test_the_rule_matches_the_published_one_step_by_step(seed):
    gen = torch.Generator().manual_seed(seed)
    clipped = 0
    for _ in range(5):
        norms = norms_with_spikes(gen, 400)
        zclip = ZClip()
        got = [zclip.target_norm(n) for n in norms]
        want = published_rule(norms)
        assert got == pytest.approx(want, rel=1e-12, abs=0)
        clipped += sum(g < n for g, n in zip(got[WARMUP:], norms[WARMUP:]))
    assert clipped >= 20  # spikes were clipped: the test is not vacuous


def test_hand_computed_steps():
    zclip = ZClip(warmup_steps=3)
    # warm-up: clipped to 1.0, statistics from [1, 2, 3]: mu = 2, s2 = 2/3
    assert [zclip.target_norm(n) for n in (1.0, 2.0, 3.0)] == [1.0, 1.0, 1.0]
    assert zclip.mean == 2.0 and zclip.var == pytest.approx(2 / 3, rel=1e-15)
    # 2.5: z = 0.5 / 0.8165 = 0.61, not an outlier; mu <- 0.97*2 + 0.03*2.5 = 2.015
    assert zclip.target_norm(2.5) == 2.5
    assert zclip.mean == pytest.approx(2.015, rel=1e-15)
    assert zclip.var == pytest.approx(0.97 * 2 / 3 + 0.03 * (2.5 - 2.015) ** 2, rel=1e-15)
    # 10: sigma = sqrt(s2), z = (10 - mu) / sigma, clipped to mu + 2.5^2 sigma / z
    mu, sigma = zclip.mean, math.sqrt(zclip.var)
    z = (10 - mu) / (sigma + 1e-6)
    assert z > 9
    target = zclip.target_norm(10.0)
    assert target == pytest.approx(mu + 6.25 * sigma / z, rel=1e-15)
    assert target == pytest.approx(2.5267, abs=1e-4)  # 2.015 + 6.25 * 0.8085 / 9.876
    assert zclip.mean == pytest.approx(0.97 * mu + 0.03 * target, rel=1e-15)  # fed the clipped


def test_warm_up_without_a_fixed_norm_leaves_the_gradients_alone():
    zclip = ZClip(warmup_steps=2, warmup_max_norm=None)
    assert [zclip.target_norm(n) for n in (5.0, 7.0)] == [5.0, 7.0]
    assert zclip.mean == 6.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_norm_changes_nothing(bad):
    zclip = ZClip(warmup_steps=2)
    assert math.isnan(zclip.target_norm(bad)) if math.isnan(bad) else zclip.target_norm(bad) == bad
    assert zclip.warmup_norms == []  # not collected during warm-up
    zclip.target_norm(1.0), zclip.target_norm(3.0)
    state = (zclip.mean, zclip.var)
    zclip.target_norm(bad)
    assert (zclip.mean, zclip.var) == state
    grads = [torch.full((3,), bad)]
    assert zclip.apply_(grads, bad) == 1.0
    assert (zclip.mean, zclip.var) == state


def test_apply_scales_the_gradients_to_the_target_keeping_their_direction(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) for s in [(7, 3), (1,), (0,), (1023,)]]
    original = [g.clone() for g in grads]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    zclip = ZClip(warmup_steps=1, warmup_max_norm=norm / 4)
    factor = zclip.apply_(grads, norm)  # warm-up: to the fixed norm
    assert factor == pytest.approx((norm / 4) / (norm + 1e-6), rel=1e-12)
    for g, o in zip(grads, original):
        torch.testing.assert_close(g, o * factor)
    after = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert after == pytest.approx(norm / 4, rel=1e-5)
    # then a norm equal to the mean: z = 0, nothing to do
    assert zclip.apply_(grads, norm) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"z_thresh": 0.0}, "z_thresh"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"warmup_max_norm": 0.0}, "warmup_max_norm"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZClip(**kwargs)
