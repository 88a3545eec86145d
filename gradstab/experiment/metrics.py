"""The metrics of docs/evidence.md: pure functions of the recorded curves, tested on hand-made ones.

A run records, per step ``t`` (0-based), the training loss ``train[t]`` of its batch (before the
update) and the total gradient norm before any protection; and the held-out loss ``eval`` at a
few steps, the last one after the last update. Losses are in nats per byte. A run stops at the
first non-finite training loss, so its curves may be shorter than planned.

- **final loss**: the last held-out loss; **best loss**: the lowest one.
- **capped loss**: a final loss that is not finite or is above the uniform loss ln 256 counts as
  ln 256 in every average, difference and ranking (a diverged run is as bad as guessing).
- **diverged**: a non-finite training or held-out loss, or a final held-out loss above ln 256.
- **blow-up**: the 10-step trailing median of the training loss rises more than 1 nat above its
  lowest value so far (a sustained rise, not one bad batch), or a training loss is not finite.
- **loss spike**: a step whose training loss is more than 1.2 times the median of the previous
  20 steps' losses (steps >= 20); consecutive such steps are one spike.
- **stable learning-rate range**: the widest run of consecutive grid learning rates at which no
  seed blew up or diverged.
- **learning-rate sensitivity**: the mean over the grid of (median capped final loss at that
  learning rate minus the lowest such median of the method).
- **weight-decay sensitivity**: the spread (max - min) over the weight-decay grid of the median
  capped final loss.
- **paired gap**: capped final loss of a method minus that of no protection in the run with the
  same learning rate, weight decay and seed (same initial weights, same batches); a *win* is a
  gap below -0.01 nats, a *loss* above +0.01, anything between a tie.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gradstab.experiment.data import UNIFORM_LOSS

BLOW_UP_WINDOW = 10
BLOW_UP_RISE = 1.0  # nats
SPIKE_WINDOW = 20
SPIKE_RATIO = 1.2
TIE = 0.01  # nats: paired gaps within this are ties


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def capped(loss: float) -> float:
    """The loss, or ln 256 if it is not finite or above ln 256."""
    return loss if finite(loss) and loss <= UNIFORM_LOSS else UNIFORM_LOSS


def diverged(train: Sequence[float], evals: Sequence[float]) -> bool:
    """A non-finite loss anywhere, no held-out loss at all, or a final one above ln 256."""
    if not evals or not all(finite(x) for x in (*train, *evals)):
        return True
    return evals[-1] > UNIFORM_LOSS


def blow_up_step(
    train: Sequence[float], window: int = BLOW_UP_WINDOW, rise: float = BLOW_UP_RISE
) -> int | None:
    """The first step at which the run blew up (see the module docstring), or None.

    The smoothed loss at step ``t >= window - 1`` is the median of ``train[t-window+1..t]``; a
    blow-up is the first ``t`` where it exceeds the lowest smoothed loss of the earlier steps by
    more than ``rise``, or the first non-finite training loss, whichever comes first.
    """
    lowest = math.inf
    for t, x in enumerate(train):
        if not finite(x):
            return t
        if t < window - 1:
            continue
        smooth = statistics.median(train[t - window + 1 : t + 1])
        if smooth > lowest + rise:
            return t
        lowest = min(lowest, smooth)
    return None


def loss_spikes(
    train: Sequence[float], window: int = SPIKE_WINDOW, ratio: float = SPIKE_RATIO
) -> list[int]:
    """The first step of every loss spike (see the module docstring).

    Step ``t >= window`` spikes if ``train[t] > ratio * median(train[t-window..t-1])`` or its loss
    is not finite; a run of consecutive spiking steps is one spike, reported at its first step.
    """
    starts = []
    previous = False
    for t in range(window, len(train)):
        x = train[t]
        spiking = not finite(x) or x > ratio * statistics.median(train[t - window : t])
        if spiking and not previous:
            starts.append(t)
        previous = spiking
    return starts


def stable_range(stable: Mapping[float, bool]) -> tuple[float, float] | None:
    """The widest run of consecutive grid points (sorted keys) that are all stable, as
    ``(lowest, highest)``; the lower one among equally wide runs; None if no point is stable."""
    best: tuple[int, float, float] | None = None
    start: float | None = None
    count = 0
    points = sorted(stable)
    for x in points:
        if stable[x]:
            start = x if count == 0 else start
            count += 1
            if best is None or count > best[0]:
                best = (count, start, x)  # type: ignore[assignment]
        else:
            count = 0
    return None if best is None else (best[1], best[2])


def sensitivity(medians: Mapping[float, float]) -> float:
    """Mean over the grid of (capped loss - the lowest capped loss on the grid)."""
    losses = [capped(x) for x in medians.values()]
    best = min(losses)
    return sum(x - best for x in losses) / len(losses)


def spread(medians: Mapping[float, float]) -> float:
    """max - min of the capped losses over the grid."""
    losses = [capped(x) for x in medians.values()]
    return max(losses) - min(losses)


def median_capped(finals: Sequence[float]) -> float:
    """The median over seeds of the capped final losses."""
    return statistics.median(capped(x) for x in finals)


@dataclass(frozen=True)
class PairedGaps:
    """Capped final loss of a method minus no protection's, over paired runs."""

    gaps: tuple[float, ...]

    @property
    def wins(self) -> int:
        return sum(g < -TIE for g in self.gaps)

    @property
    def losses(self) -> int:
        return sum(g > TIE for g in self.gaps)

    @property
    def ties(self) -> int:
        return len(self.gaps) - self.wins - self.losses

    @property
    def median(self) -> float:
        return statistics.median(self.gaps) if self.gaps else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.gaps) if self.gaps else math.nan

    def record(self) -> str:
        """``"W-T-L"``: wins, ties, losses."""
        return f"{self.wins}-{self.ties}-{self.losses}"


def paired_gaps(method: Sequence[float], baseline: Sequence[float]) -> PairedGaps:
    """Gaps between the capped final losses of paired runs (equal lengths, same order)."""
    if len(method) != len(baseline):
        raise ValueError(f"paired_gaps: {len(method)} runs against {len(baseline)}")
    return PairedGaps(tuple(capped(a) - capped(b) for a, b in zip(method, baseline)))


@dataclass(frozen=True)
class NormSummary:
    median: float
    max: float
    skipped: int  # steps whose norm was not finite (a GradScaler skipped them)

    @property
    def ratio(self) -> float:
        """max / median: how far the largest spike stands out."""
        return self.max / self.median if self.median > 0 else math.inf


def norm_summary(norms: Sequence[float]) -> NormSummary:
    """Median and max of the finite per-step gradient norms, and how many were not finite."""
    good = [x for x in norms if finite(x)]
    if not good:
        return NormSummary(math.nan, math.nan, len(norms))
    return NormSummary(statistics.median(good), max(good), len(norms) - len(good))
