"""The benchmark's metrics (gradstab.experiment.metrics) on hand-made curves with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from gradstab.experiment import metrics
from gradstab.experiment.data import UNIFORM_LOSS

nan, inf = math.nan, math.inf


def noisy_flat(gen: torch.Generator, length: int, level: float, noise: float) -> list[float]:
    return (level + noise * (torch.rand(length, generator=gen, dtype=torch.float64) - 0.5)).tolist()


def test_capped_counts_anything_worse_than_uniform_as_uniform():
    assert metrics.capped(2.5) == 2.5
    assert metrics.capped(UNIFORM_LOSS) == UNIFORM_LOSS
    for bad in (UNIFORM_LOSS + 1e-9, 40.0, nan, inf, -inf):
        assert metrics.capped(bad) == UNIFORM_LOSS


def test_diverged():
    assert not metrics.diverged([5.0, 3.0, 2.0], [5.5, 2.5])
    assert not metrics.diverged([9.0, 3.0], [5.5, UNIFORM_LOSS])  # equal to uniform: not worse
    assert metrics.diverged([5.0, 3.0], [5.5, UNIFORM_LOSS + 0.01])
    assert metrics.diverged([5.0, nan], [5.5, 2.5])
    assert metrics.diverged([5.0, 3.0], [5.5, inf])
    assert metrics.diverged([5.0, 3.0], [])
    # a held-out loss above uniform along the way is a blow-up, not a divergence
    assert not metrics.diverged([5.0, 3.0], [5.5, 9.0, 2.5])


def test_a_sustained_rise_of_more_than_one_nat_is_a_blow_up_at_its_sixth_step(seed):
    """A step of height h in (1, 2) nats from step s on: the 10-step median jumps by h once 6 of
    its 10 values are high, i.e. at step s + 5 (with 5 high values it rises only h/2 < 1)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        length = int(torch.randint(40, 200, (), generator=gen))
        s = int(torch.randint(10, length - 6, (), generator=gen))
        h = 1.05 + 0.9 * float(torch.rand((), generator=gen))
        curve = noisy_flat(gen, length, 2.0, 0.01)
        curve[s:] = [x + h for x in curve[s:]]
        assert metrics.blow_up_step(curve) == s + 5


def test_blow_up_is_measured_from_the_lowest_point_so_far():
    # falls from 5 to 2 and stays, then climbs back to 3.2: 1.2 above the lowest, though far
    # below the start
    descent = [5.0 - 0.1 * t for t in range(31)] + [2.0] * 10
    assert metrics.blow_up_step([*descent, *[3.2] * 10]) == len(descent) + 5
    assert metrics.blow_up_step([*descent, *[2.9] * 10]) is None


def test_short_spikes_and_slow_drifts_are_not_blow_ups(seed):
    gen = torch.Generator().manual_seed(seed)
    curve = noisy_flat(gen, 100, 2.0, 0.05)
    for t in (20, 50, 51, 52, 53, 80):  # at most 4 high values in any 10-step window
        curve[t] = 100.0
    assert metrics.blow_up_step(curve) is None
    assert metrics.blow_up_step([2.0 + 0.009 * t for t in range(100)]) is None  # 0.9 nats in all


@pytest.mark.parametrize("bad", [nan, inf])
def test_a_nonfinite_training_loss_is_a_blow_up_at_once(bad):
    assert metrics.blow_up_step([3.0, 2.9, bad, 2.0]) == 2


def test_loss_spikes_are_steps_above_1_2_times_the_previous_20_median(seed):
    gen = torch.Generator().manual_seed(seed)
    curve = noisy_flat(gen, 200, 2.0, 0.02)  # ratio to the median within 1 +- 0.01
    expected = [30, 77, 150]
    for t in expected:
        curve[t] = 2.0 * 1.25
    curve[78] = 2.0 * 1.3  # right after the spike at 77: the same spike
    curve[100] = 2.0 * 1.15  # below the ratio
    curve[5] = 50.0  # before a full window: not counted
    assert metrics.loss_spikes(curve) == expected


def test_a_nonfinite_loss_spikes():
    curve = [2.0] * 25
    curve[22] = nan
    assert metrics.loss_spikes(curve) == [22]


def test_loss_spikes_of_a_rising_curve_compare_with_the_median_not_the_minimum():
    # slowly rising by 0.5% a step: each loss is ~1.05 times the previous 20's median
    curve = [2.0 * 1.005**t for t in range(100)]
    assert metrics.loss_spikes(curve) == []
    assert metrics.loss_spikes([2.0 * 1.02**t for t in range(100)]) == [20]


def test_stable_range_is_the_widest_run_of_consecutive_stable_points():
    assert metrics.stable_range({1: True, 2: True, 3: False, 4: True, 5: True, 6: True}) == (4, 6)
    assert metrics.stable_range({6: True, 4: True, 5: True, 3: False, 1: True, 2: True}) == (4, 6)
    assert metrics.stable_range({1: True, 2: True, 3: False, 4: True, 5: True}) == (1, 2)  # tie
    assert metrics.stable_range({1: False, 2: True, 3: False}) == (2, 2)
    assert metrics.stable_range({1: False, 2: False}) is None


def test_sensitivity_is_the_mean_excess_over_the_best_grid_point():
    assert metrics.sensitivity({1e-3: 2.5, 1e-2: 2.0, 1e-1: 3.0}) == pytest.approx(0.5)
    # a diverged point counts as the uniform loss
    assert metrics.sensitivity({1: 2.0, 2: nan}) == pytest.approx((UNIFORM_LOSS - 2.0) / 2)
    assert metrics.sensitivity({1: 2.0}) == 0.0


def test_spread_is_max_minus_min_of_the_capped_losses():
    assert metrics.spread({0.0: 2.1, 0.1: 2.0, 1.0: 2.6}) == pytest.approx(0.6)
    assert metrics.spread({0.0: 2.0, 1.0: 99.0}) == pytest.approx(UNIFORM_LOSS - 2.0)


def test_median_capped():
    assert metrics.median_capped([2.0, nan, 3.0]) == 3.0
    assert metrics.median_capped([2.0, 40.0, 50.0]) == UNIFORM_LOSS


def test_paired_gaps_count_wins_ties_and_losses():
    gaps = metrics.paired_gaps([2.0, 2.5, 3.0, nan, 2.0], [2.5, 2.505, 2.8, 2.0, nan])
    assert gaps.gaps == pytest.approx((-0.5, -0.005, 0.2, UNIFORM_LOSS - 2.0, 2.0 - UNIFORM_LOSS))
    assert (gaps.wins, gaps.ties, gaps.losses) == (2, 1, 2)
    assert gaps.record() == "2-1-2"
    assert gaps.median == pytest.approx(-0.005)
    assert gaps.mean == pytest.approx(-0.061)
    with pytest.raises(ValueError, match="3 runs against 2"):
        metrics.paired_gaps([1, 2, 3], [1, 2])
    empty = metrics.paired_gaps([], [])
    assert math.isnan(empty.median) and empty.record() == "0-0-0"


def test_norm_summary_skips_nonfinite_norms():
    summary = metrics.norm_summary([1.0, 2.0, inf, 3.0, nan, 40.0])
    assert (summary.median, summary.max, summary.skipped) == (2.5, 40.0, 2)
    assert summary.ratio == 16.0
    nothing = metrics.norm_summary([nan])
    assert nothing.skipped == 1 and math.isnan(nothing.median)
