"""``python -m gradstab demo``: GradientStabilizer at work on a small language model, on the CPU.

A character-level MLP language model learns to predict the next character of Python's own standard
library sources (shipped with every Python, so nothing is downloaded), with AdamW, four ways:

- no protection,
- ``torch.nn.utils.clip_grad_norm_(params, 1.0)``,
- ``GradientStabilizer()`` with the paper's defaults,
- ``GradientStabilizer(spike_guard=10)``.

Experiments (every method sees the same initial weights and the same batches):

- **spikes**: at known steps a bad batch's gradient is multiplied by 1e2, later one by 1e4;
- **scale**: the same spiked run with gradients 100x larger (the loss summed over the batch of 100
  instead of averaged) and 100x smaller (loss / 100): a fixed clipping threshold is right for one
  scale only, while GradientStabilizer's output does not depend on the scale;
- **lr sweep**: runs without spikes at learning rates from 1e-3 to 1, several seeds each.

The metrics are defined on the *eval curve* ``curve[t]``: the mean cross-entropy (nats per
character) on a fixed held-out set before the update of step ``t``; ``curve[steps]`` is the loss
after the last update. For a spike injected at step ``s`` (its bad gradient is applied by update
``s``), with the window ``s < t <= e`` running up to the next spike's step, or to the end:

- ``jump`` = ``max(curve[s+1..e]) - curve[s]``, floored at 0 (inf if the loss is not finite);
- ``recovery`` = ``t - s + 1`` for the last ``t`` of the window with ``curve[t] > curve[s]`` (from
  then on the loss stays at or below its pre-spike value), 0 if there is none, and "not within the
  window" if the loss is still above at ``e``;
- ``final loss`` = ``curve[steps]``;
- ``diverged`` = the loss became NaN/Inf, or the final loss is not below the loss at step 0.

The table reports the worst jump and the slowest recovery over a run's spikes; the sweep reports
the median final loss over the seeds, its range, and the number of diverged runs. See docs/demo.md
for the results and what they mean.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import gradstab

__all__ = [
    "FULL",
    "METHODS",
    "QUICK",
    "DemoConfig",
    "DemoResults",
    "SpikeSummary",
    "diverged",
    "main",
    "recovery_steps",
    "run_demo",
    "spike_jump",
    "summarize_spikes",
]

# Method key -> label. The keys are what ``make_protection`` understands.
METHODS: dict[str, str] = {
    "none": "no protection",
    "clip": "clip_grad_norm_(1.0)",
    "stab": "GradientStabilizer()",
    "guard": "GradientStabilizer(spike_guard=10)",
}
CLIP_MAX_NORM = 1.0
SPIKE_GUARD = 10.0

# Sources of the standard library that exist in every CPython >= 3.10. The model trains on the
# first group and is evaluated on the second, which it never sees.
TRAIN_FILES = (
    "argparse.py",
    "calendar.py",
    "contextlib.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)
EVAL_FILES = ("bisect.py", "colorsys.py", "dataclasses.py")

# Vocabulary: '\n' -> 0, printable ASCII ' '..'~' -> 1..95, anything else -> 96.
VOCAB_SIZE = 97


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``FULL`` is ``python -m gradstab demo``, ``QUICK`` is ``--quick``."""

    steps: int  # updates per spiked run
    spikes: tuple[tuple[int, float], ...]  # (step, gradient multiplier) of the bad batches
    grad_scales: tuple[float, ...]  # the spiked run at these gradient scales; 1.0 comes first
    sweep_lrs: tuple[float, ...]
    sweep_steps: int  # updates per sweep run
    sweep_seeds: tuple[int, ...]  # each (method, lr) of the sweep is trained once per seed
    lr: float = 3e-3  # AdamW's learning rate of the spiked runs
    batch: int = 100  # so that "loss summed instead of averaged" is exactly gradients x100
    context: int = 16  # characters the model sees
    embed: int = 16
    hidden: int = 128
    eval_size: int = 512  # held-out contexts behind every point of the eval curve
    seed: int = 0  # initial weights and batch order of the spiked runs


FULL = DemoConfig(
    steps=300,
    spikes=((100, 1e2), (200, 1e4)),
    grad_scales=(1.0, 100.0, 0.01),
    sweep_lrs=(1e-3, 1e-2, 1e-1, 3e-1, 1.0),
    sweep_steps=150,
    sweep_seeds=(0, 1, 2),
)
QUICK = DemoConfig(
    steps=60,
    spikes=((20, 1e2), (40, 1e4)),
    grad_scales=(1.0, 100.0, 0.01),
    sweep_lrs=(3e-3, 1e-1, 1.0),
    sweep_steps=40,
    sweep_seeds=(0,),
    eval_size=256,
)


# ------------------------------------------------------------------------------------------------
# metrics (pure functions of the eval curve; tested on synthetic curves)


def _window_end(spike_steps: Sequence[int], i: int, last: int) -> int:
    return spike_steps[i + 1] if i + 1 < len(spike_steps) else last


def spike_jump(curve: Sequence[float], step: int, end: int) -> float:
    """How far the loss rose after the spike of ``step``: ``max(curve[step+1..end]) - curve[step]``.

    Floored at 0 (a loss that only went down did not jump); ``inf`` if the loss before the spike
    or any loss in the window is NaN or Inf.
    """
    window = curve[step + 1 : end + 1]
    if not window:
        raise ValueError(f"spike_jump: empty window (step={step}, end={end})")
    values = [curve[step], *window]
    if not all(math.isfinite(x) for x in values):
        return math.inf
    return max(0.0, max(window) - curve[step])


def recovery_steps(curve: Sequence[float], step: int, end: int) -> int | None:
    """Steps from the spike of ``step`` until the loss is back for good at its pre-spike value.

    That is ``t - step`` for the last ``t`` in ``step+1..end`` with ``curve[t] > curve[step]``,
    plus one: from then on to the end of the window the loss stays at or below ``curve[step]``.
    0 if the loss never rose above it; ``None`` if it is still above at ``end`` (or not finite).
    A loss that first dips (the bad update follows that batch's own gradient) and rises later
    counts as rising: what matters is when it is back to stay.
    """
    before = curve[step]
    if not math.isfinite(before):
        return None
    above = [t for t in range(step + 1, end + 1) if not curve[t] <= before]
    if not above:
        return 0
    if above[-1] == end:
        return None
    return above[-1] - step + 1


def diverged(curve: Sequence[float]) -> bool:
    """True if a loss is NaN/Inf or the final loss is not below the loss at step 0."""
    return not all(math.isfinite(x) for x in curve) or curve[-1] >= curve[0]


@dataclass
class SpikeSummary:
    """The metrics of one spiked run (see the module docstring for the definitions)."""

    final_loss: float
    jumps: list[float]  # per spike
    recoveries: list[int | None]  # per spike; None: not back within the window
    windows: list[int]  # per spike: how many steps the window had
    diverged: bool

    @property
    def worst_jump(self) -> float:
        return max(self.jumps)

    def recovery_text(self) -> str:
        """The slowest recovery: ``"12"``, or ``">100"`` if some spike was not recovered from."""
        missed = [w for r, w in zip(self.recoveries, self.windows) if r is None]
        if missed:
            return f">{min(missed)}"
        return str(max(r for r in self.recoveries if r is not None))


def summarize_spikes(curve: Sequence[float], spike_steps: Sequence[int]) -> SpikeSummary:
    """Metrics of an eval curve (``len(curve) = steps + 1``) with spikes at ``spike_steps``."""
    steps = sorted(spike_steps)
    last = len(curve) - 1
    if not steps or steps[0] < 0 or steps[-1] >= last:
        raise ValueError(f"spike steps {list(spike_steps)} must lie in [0, {last})")
    ends = [_window_end(steps, i, last) for i in range(len(steps))]
    return SpikeSummary(
        final_loss=curve[-1],
        jumps=[spike_jump(curve, s, e) for s, e in zip(steps, ends)],
        recoveries=[recovery_steps(curve, s, e) for s, e in zip(steps, ends)],
        windows=[e - s for s, e in zip(steps, ends)],
        diverged=diverged(curve),
    )


# ------------------------------------------------------------------------------------------------
# data and model


def encode(text: str) -> Tensor:
    """Characters to ids: '\\n' -> 0, ' '..'~' -> 1..95, anything else -> 96 (int64)."""
    raw = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.int64)
    printable = (raw >= 32) & (raw < 127)
    return torch.where(raw == 10, 0, torch.where(printable, raw - 31, VOCAB_SIZE - 1))


@dataclass
class Corpus:
    """Training text, the fixed held-out contexts behind the eval curve, and a reference loss."""

    train_ids: Tensor
    eval_x: Tensor  # [eval_size, context]
    eval_y: Tensor  # [eval_size]
    unigram_loss: float  # eval loss of a model that knows only the characters' frequencies


def load_corpus(context: int, eval_size: int) -> Corpus:
    """Python's standard-library sources: ``TRAIN_FILES`` to train, ``EVAL_FILES`` to evaluate."""
    stdlib = Path(sysconfig.get_path("stdlib"))
    missing = [n for n in (*TRAIN_FILES, *EVAL_FILES) if not (stdlib / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"gradstab demo: it trains on Python's standard-library sources, but {stdlib} lacks "
            f"{', '.join(missing)} (a Python installed without its .py files?)"
        )

    def read(names: Sequence[str]) -> Tensor:
        return encode("".join((stdlib / n).read_text(encoding="utf-8") for n in names))

    train_ids, eval_ids = read(TRAIN_FILES), read(EVAL_FILES)
    starts = torch.randint(
        len(eval_ids) - context, (eval_size,), generator=torch.Generator().manual_seed(2)
    )
    eval_x, eval_y = _contexts(eval_ids, starts, context)
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 1
    unigram = -(counts / counts.sum()).log()[eval_y].mean().item()
    return Corpus(train_ids, eval_x, eval_y, unigram)


class CharMLP(nn.Module):
    """Predicts the next character from the ``context`` previous ones (Bengio et al. 2003)."""

    def __init__(self, context: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, embed)
        self.net = nn.Sequential(
            nn.Linear(context * embed, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, VOCAB_SIZE),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.embed(x).flatten(1))


def _contexts(ids: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    offsets = torch.arange(context)
    return ids[starts[:, None] + offsets], ids[starts + context]


def make_protection(method: str, model: nn.Module) -> Callable[[], object]:
    """What runs between ``loss.backward()`` and ``optimizer.step()`` for ``method``."""
    if method == "none":
        return lambda: None
    if method == "clip":
        return lambda: nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
    if method in ("stab", "guard"):
        stab = gradstab.GradientStabilizer(spike_guard=SPIKE_GUARD if method == "guard" else None)
        return lambda: stab.apply(model)
    raise ValueError(f"unknown method {method!r}; one of {list(METHODS)}")


@dataclass
class Run:
    """One training run: its eval curve (or just its first and last point) and its time."""

    curve: list[float]
    seconds: float


def train(
    method: str,
    corpus: Corpus,
    cfg: DemoConfig,
    *,
    lr: float,
    steps: int | None = None,
    seed: int | None = None,
    grad_scale: float = 1.0,
    spikes: dict[int, float] | None = None,
    full_curve: bool = True,
) -> Run:
    """Trains one model with AdamW; returns the eval curve (every step, or first and last).

    The loss is ``sum of the batch's cross-entropies * grad_scale / batch`` (``grad_scale=1``: the
    mean; ``grad_scale=batch``: the sum), times the multiplier of a bad batch at a spike step.
    ``steps`` and ``seed`` (initial weights, batch order) default to ``cfg``'s. A run whose loss
    turns NaN/Inf stops there; its curve ends with that value.
    """
    steps = cfg.steps if steps is None else steps
    seed = cfg.seed if seed is None else seed
    spikes = spikes or {}
    torch.manual_seed(seed)
    model = CharMLP(cfg.context, cfg.embed, cfg.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    protect = make_protection(method, model)
    batches = torch.Generator().manual_seed(seed + 1)

    @torch.no_grad()
    def eval_loss() -> float:
        return F.cross_entropy(model(corpus.eval_x), corpus.eval_y).item()

    start = time.perf_counter()
    curve = [eval_loss()]
    for step in range(steps):
        starts = torch.randint(len(corpus.train_ids) - cfg.context, (cfg.batch,), generator=batches)
        x, y = _contexts(corpus.train_ids, starts, cfg.context)
        loss = F.cross_entropy(model(x), y, reduction="sum") * (grad_scale / cfg.batch)
        (loss * spikes.get(step, 1.0)).backward()
        protect()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            curve.append(math.nan)
            break
        if full_curve or step == steps - 1:
            curve.append(eval_loss())
            if not math.isfinite(curve[-1]):
                break
    return Run(curve, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# the demo


@dataclass
class DemoResults:
    cfg: DemoConfig
    unigram_loss: float
    spiked: dict[float, dict[str, Run]] = field(default_factory=dict)  # grad scale -> method ->
    sweep: dict[str, dict[float, list[Run]]] = field(default_factory=dict)  # method -> lr -> seeds
    seconds: float = 0.0

    def spike_summaries(self) -> dict[float, dict[str, SpikeSummary]]:
        steps = [s for s, _ in self.cfg.spikes]
        return {
            scale: {m: summarize_spikes(run.curve, steps) for m, run in runs.items()}
            for scale, runs in self.spiked.items()
        }

    def sweep_median(self, method: str, lr: float) -> float:
        """Median final loss over the sweep's seeds (NaN counts as +inf)."""
        return statistics.median(_inf_if_nan(run.curve[-1]) for run in self.sweep[method][lr])


def _inf_if_nan(x: float) -> float:
    return math.inf if math.isnan(x) else x


def scale_label(scale: float, batch: int) -> str:
    if scale == 1.0:
        return "spikes"
    if scale == batch:
        return f"spikes, grads x{scale:g} (loss summed)"
    if scale < 1.0:
        return f"spikes, grads x{scale:g} (loss / {1 / scale:g})"
    return f"spikes, grads x{scale:g}"


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResults:
    """Trains every run of ``cfg``, logging one line per run as it finishes."""
    corpus = load_corpus(cfg.context, cfg.eval_size)
    threads = torch.get_num_threads()
    # One thread: the matrices are tiny (a second thread costs more than it brings), and the
    # results then do not depend on the machine's core count.
    torch.set_num_threads(1)
    try:
        results = DemoResults(cfg, corpus.unigram_loss)
        total = len(METHODS) * (len(cfg.grad_scales) + len(cfg.sweep_lrs))
        done = 0
        start = time.perf_counter()

        def note(what: str, method: str, runs: list[Run]) -> None:
            nonlocal done
            done += 1
            finals = " ".join(f"{run.curve[-1]:.3f}" for run in runs)
            seconds = sum(run.seconds for run in runs)
            log(
                f"[{done:{len(str(total))}d}/{total}] {what:<34} {METHODS[method]:<35} "
                f"final loss {finals}  ({seconds:.1f} s)"
            )

        spikes = dict(cfg.spikes)
        for scale in cfg.grad_scales:
            results.spiked[scale] = {}
            for method in METHODS:
                run = train(method, corpus, cfg, lr=cfg.lr, grad_scale=scale, spikes=spikes)
                results.spiked[scale][method] = run
                note(scale_label(scale, cfg.batch), method, [run])
        for method in METHODS:
            results.sweep[method] = {}
            for lr in cfg.sweep_lrs:
                results.sweep[method][lr] = [
                    train(
                        method,
                        corpus,
                        cfg,
                        lr=lr,
                        steps=cfg.sweep_steps,
                        seed=seed,
                        full_curve=False,
                    )
                    for seed in cfg.sweep_seeds
                ]
                seeds = len(cfg.sweep_seeds)
                what = f"lr sweep, lr={lr:g}" + (f", {seeds} seeds" if seeds > 1 else "")
                note(what, method, results.sweep[method][lr])
        results.seconds = time.perf_counter() - start
        return results
    finally:
        torch.set_num_threads(threads)


def _fmt_loss(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else str(x)


def _fmt_short(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.3g}"


def spike_table(results: DemoResults) -> str:
    """The markdown table of the spiked runs: one row per (experiment, method)."""
    lines = [
        "| experiment | method | final loss | worst jump | steps to recover | diverged |",
        "|---|---|---:|---:|---:|---|",
    ]
    for scale, summaries in results.spike_summaries().items():
        for method, s in summaries.items():
            lines.append(
                f"| {scale_label(scale, results.cfg.batch)} | {METHODS[method]} | "
                f"{_fmt_loss(s.final_loss)} | {_fmt_loss(s.worst_jump)} | {s.recovery_text()} | "
                f"{'yes' if s.diverged else 'no'} |"
            )
    return "\n".join(lines)


def sweep_table(results: DemoResults) -> str:
    """The markdown table of the sweep: per (method, lr) the median final loss over the seeds
    with its range, and per method the number of diverged runs."""
    cfg = results.cfg
    seeds = len(cfg.sweep_seeds)
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in cfg.sweep_lrs) + " | diverged |",
        "|---|" + "---:|" * len(cfg.sweep_lrs) + "---:|",
    ]
    for method, by_lr in results.sweep.items():
        cells = []
        count = 0
        for lr in cfg.sweep_lrs:
            finals = [run.curve[-1] for run in by_lr[lr]]
            count += sum(diverged(run.curve) for run in by_lr[lr])
            cell = _fmt_short(results.sweep_median(method, lr))
            if seeds > 1:
                low, high = min(finals), max(_inf_if_nan(x) for x in finals)
                cell += f" ({_fmt_short(low)}-{_fmt_short(high)})"
            cells.append(cell)
        lines.append(
            f"| {METHODS[method]} | "
            + " | ".join(cells)
            + f" | {count}/{len(cfg.sweep_lrs) * seeds} |"
        )
    return "\n".join(lines)


COLORS = {"none": "tab:red", "clip": "tab:blue", "stab": "tab:green", "guard": "tab:purple"}


def plot(results: DemoResults, out: Path) -> None:
    """One PNG: the eval curves of each spiked experiment, and the sweep's median final losses."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cfg = results.cfg
    start_loss = next(iter(next(iter(results.spiked.values())).values())).curve[0]
    top = start_loss * 1.05
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), dpi=80)
    axes = axes.flatten()
    for ax, (scale, runs) in zip(axes, results.spiked.items()):
        for method, run in runs.items():
            ax.plot(run.curve, color=COLORS[method], lw=1.2, label=METHODS[method])
        for step, factor in cfg.spikes:
            ax.axvline(step, color="gray", ls=":", lw=0.8)
            ax.text(step, top, f" bad batch x{factor:g}", fontsize=7, color="gray", va="top")
        ax.set_title(scale_label(scale, cfg.batch), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("held-out loss (nats/char)", fontsize=8)
    ax = axes[len(results.spiked)]
    for i, method in enumerate(results.sweep):
        # Each method a little to the side of the others, so the seed ranges do not overlap.
        lrs = [lr * 1.08 ** (i - 1.5) for lr in cfg.sweep_lrs]
        medians = [min(results.sweep_median(method, lr), top) for lr in cfg.sweep_lrs]
        finals = [
            [min(_inf_if_nan(r.curve[-1]), top) for r in results.sweep[method][lr]]
            for lr in cfg.sweep_lrs
        ]
        low = [m - min(f) for m, f in zip(medians, finals)]
        high = [max(f) - m for m, f in zip(medians, finals)]
        ax.errorbar(
            lrs,
            medians,
            yerr=[low, high],
            fmt="o-",
            color=COLORS[method],
            ms=3,
            lw=1.2,
            elinewidth=0.8,
            capsize=2,
            label=METHODS[method],
        )
    ax.axhline(results.unigram_loss, color="gray", ls="--", lw=0.8)
    ax.text(
        cfg.sweep_lrs[0], results.unigram_loss, "unigram", fontsize=7, color="gray", va="bottom"
    )
    ax.set_xscale("log")
    ax.set_title(
        f"lr sweep, no spikes: final loss after {cfg.sweep_steps} steps\n"
        f"(median and range of {len(cfg.sweep_seeds)} seed(s))",
        fontsize=9,
    )
    ax.set_xlabel("AdamW learning rate", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_ylim(1.9, top)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstab demo",
        description="Train a small character-level language model on the CPU four ways (no "
        "protection, clip_grad_norm_, GradientStabilizer, GradientStabilizer with spike_guard) "
        "with injected gradient spikes at three gradient scales, and over a learning-rate "
        "sweep; print the results and plot them.",
        # The metrics' definitions, from this module's docstring: the installed package has no
        # docs/ folder, so the output points here.
        epilog=__doc__[__doc__.index("The metrics are defined") : __doc__.index("See docs/")],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("gradstab_demo.png"),
        help="the PNG to write (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller, shorter run (for tests)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print(
            "gradstab demo: the plot needs matplotlib: pip install matplotlib "
            "(`make demo` installs it)",
            file=sys.stderr,
        )
        return 2
    cfg = QUICK if args.quick else FULL
    spikes = ", ".join(f"x{f:g} at step {s}" for s, f in cfg.spikes)
    print(
        f"gradstab demo{' --quick' if args.quick else ''}: a character-level MLP learns to "
        f"predict Python's standard-library sources, on the CPU, with AdamW (batch {cfg.batch}).\n"
        f"Spiked runs: lr {cfg.lr:g}, {cfg.steps} steps, bad batches {spikes}. "
        f"Sweep: {cfg.sweep_steps} steps, seeds {list(cfg.sweep_seeds)}.",
        flush=True,
    )
    results = run_demo(cfg, log=lambda line: print(line, flush=True))
    print(
        "\nSpiked runs. Loss: cross-entropy on held-out text (nats/char); the untrained model "
        f"has {results.spiked[cfg.grad_scales[0]]['none'].curve[0]:.3f}, character frequencies "
        f"alone (unigram) {results.unigram_loss:.3f}. Definitions: python -m gradstab demo --help"
    )
    print(spike_table(results))
    print(
        f"\nLearning-rate sweep, no spikes: median final loss over {len(cfg.sweep_seeds)} "
        "seed(s); diverged runs counted"
    )
    print(sweep_table(results))
    plot(results, args.out)
    print(f"\nwrote {args.out}; {results.seconds:.1f} s of training")
    return 0
