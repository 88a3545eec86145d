"""Markdown tables and PNG plots from the records of finished runs (definitions: metrics.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from gradstab.experiment import metrics
from gradstab.experiment.data import UNIFORM_LOSS
from gradstab.experiment.runner import METHODS, as_floats

Records = Sequence[dict]


def select(records: Records, **fields: object) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in fields.items())]


def grid(records: Records, field: str) -> list[float]:
    return sorted({r[field] for r in records})


def methods_of(records: Records) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in METHODS if m in present]


def finals(records: Records) -> list[float]:
    return as_floats(r["final_loss"] for r in records)


def unstable(record: dict) -> bool:
    return record["diverged"] or record["blow_up_step"] is not None


def _loss(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "nan"


def _short(x: float) -> str:
    return f"{x:.2f}"


def _gap(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "-"


def lr_label(x: float) -> str:
    """A learning rate for a table or a title: two significant digits."""
    return f"{x:.2g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def loss_cell(runs: Records) -> str:
    """Median capped final loss over seeds, with the (capped) min-max when there are several."""
    values = [metrics.capped(x) for x in finals(runs)]
    cell = _short(statistics.median(values))
    if len(values) > 1:
        cell += f" ({_short(min(values))}-{_short(max(values))})"
    return cell


def _grid_table(
    records: Records,
    field: str,
    label: Callable[[float], str],
    cell: Callable[[Records], str],
) -> str:
    """One row per method, one column per grid value of ``field``: ``cell`` of the method's runs
    at that value (all seeds)."""
    points = grid(records, field)
    rows = [
        [METHODS[m], *(cell(select(records, method=m, **{field: x})) for x in points)]
        for m in methods_of(records)
    ]
    return _table(["method", *(label(x) for x in points)], rows)


def by_grid_table(records: Records, field: str, label: Callable[[float], str]) -> str:
    """Final held-out loss per method (rows) and grid value of ``field`` (columns)."""
    return _grid_table(records, field, label, loss_cell)


def _instability_cell(runs: Records) -> str:
    bad = sum(unstable(r) for r in runs)
    div = sum(r["diverged"] for r in runs)
    return f"{bad}/{len(runs)}" + (f" ({div}d)" if div else "")


def instability_table(records: Records, field: str, label: Callable[[float], str]) -> str:
    """Per grid value: runs that diverged or blew up, of all seeds (``d``: how many diverged)."""
    return _grid_table(records, field, label, _instability_cell)


def paired(records: Records, method: str, **fields: object) -> metrics.PairedGaps:
    """Gaps of ``method`` to no protection over the runs matching ``fields``."""
    return paired_between(records, method, "none", **fields)


def paired_between(
    records: Records, method: str, base: str, **fields: object
) -> metrics.PairedGaps:
    """Gaps of ``method`` to ``base`` over the runs matching ``fields``, paired by
    (lr, wd, seed, steps, precision)."""

    def pair_key(r: dict) -> tuple:
        return (r["lr"], r["wd"], r["seed"], r["steps"], r["precision"])

    baseline = {pair_key(r): r for r in select(records, method=base, **fields)}
    mine = [r for r in select(records, method=method, **fields) if pair_key(r) in baseline]
    return metrics.paired_gaps(finals(mine), finals([baseline[pair_key(r)] for r in mine]))


def paired_table(records: Records, field: str, label: Callable[[float], str]) -> str:
    """Per grid value: median paired gap to no protection and wins-ties-losses over seeds."""
    points = grid(records, field)
    rows = []
    for m in methods_of(records):
        if m == "none":
            continue
        cells = []
        for x in points:
            gaps = paired(records, m, **{field: x})
            cells.append(f"{_gap(gaps.median)} {gaps.record()}")
        total = paired(records, m)
        rows.append([METHODS[m], *cells, f"{_gap(total.median)} {total.record()}"])
    return _table(["method", *(label(x) for x in points), "all"], rows)


def twin_table(records: Records, field: str, label: Callable[[float], str]) -> str:
    """StabilizedAdamW and GradientStabilizer() + AdamW compute the same update up to float
    rounding: per grid value, the largest |difference| of their capped final losses over the
    seeds, a measure of how far rounding alone moves a run (the noise floor of every gap)."""
    points = grid(records, field)
    cells = []
    for x in points:
        gaps = paired_between(records, "sadamw", "stab", **{field: x})
        cells.append(f"{max((abs(g) for g in gaps.gaps), default=math.nan):.3f}")
    return _table(["", *(label(x) for x in points)], [["max over seeds", *cells]])


def wd_spread_table(records: Records) -> str:
    """Weight-decay sensitivity: the spread of the medians over the grid, and the spread of
    each seed's own runs (same initial weights and batches at every weight decay)."""
    seeds = grid(records, "seed")
    rows = []
    for m in methods_of(records):
        per_seed = [
            metrics.spread(
                {
                    r["wd"]: as_floats([r["final_loss"]])[0]
                    for r in select(records, method=m, seed=s)
                }
            )
            for s in seeds
        ]
        rows.append(
            [
                METHODS[m],
                f"{metrics.spread(medians_by(records, m, 'wd')):.3f}",
                ", ".join(f"{x:.3f}" for x in per_seed),
                f"{statistics.fmean(per_seed):.3f}",
            ]
        )
    header = [
        "method",
        "spread of the medians",
        "spread of each seed (" + ", ".join(f"seed {s}" for s in seeds) + ")",
        "mean of the seeds'",
    ]
    return _table(header, rows)


def _norm_ratio_cell(runs: Records) -> str:
    ratios = [metrics.norm_summary(as_floats(r["grad_norm"])).ratio for r in runs]
    return f"{statistics.median(ratios):.3g}"


def norm_table(records: Records, field: str, label: Callable[[float], str]) -> str:
    """Per grid value: median over seeds of each run's max/median gradient norm."""
    return _grid_table(records, field, label, _norm_ratio_cell)


def stable_range_text(records: Records, method: str) -> str:
    by_lr = {
        lr: not any(unstable(r) for r in select(records, method=method, lr=lr))
        for lr in grid(records, "lr")
    }
    found = metrics.stable_range(by_lr)
    if found is None:
        return "none"
    low, high = found
    points = sum(low <= lr <= high for lr in by_lr)
    return f"{lr_label(low)}-{lr_label(high)} ({points})"


def medians_by(records: Records, method: str, field: str) -> dict[float, float]:
    return {
        x: metrics.median_capped(finals(select(records, method=method, **{field: x})))
        for x in grid(records, field)
    }


def headline_table(lr_records: Records, wd_records: Records | None = None) -> str:
    """One row per method: what each of the paper's claims is measured by."""
    header = [
        "method",
        "best final loss (lr)",
        "stable lr range (points)",
        "diverged",
        "blew up",
        "loss spikes",
        "lr sensitivity",
        "paired gap vs none, W-T-L",
    ]
    if wd_records:
        header += ["wd sensitivity"]
    rows = []
    for m in methods_of(lr_records):
        runs = select(lr_records, method=m)
        by_lr = medians_by(lr_records, m, "lr")
        best_lr = min(by_lr, key=lambda lr: by_lr[lr])
        gaps = paired(lr_records, m)
        row = [
            METHODS[m],
            f"{_loss(by_lr[best_lr])} ({lr_label(best_lr)})",
            stable_range_text(lr_records, m),
            f"{sum(r['diverged'] for r in runs)}/{len(runs)}",
            f"{sum(r['blow_up_step'] is not None for r in runs)}/{len(runs)}",
            str(sum(len(r["loss_spikes"]) for r in runs)),
            f"{metrics.sensitivity(by_lr):.3f}",
            "-" if m == "none" else f"{_gap(gaps.median)}, {gaps.record()}",
        ]
        if wd_records:
            row.append(f"{metrics.spread(medians_by(wd_records, m, 'wd')):.3f}")
        rows.append(row)
    return _table(header, rows)


def long_table(records: Records) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (r["lr"], list(METHODS).index(r["method"]))):
        summary = metrics.norm_summary(as_floats(r["grad_norm"]))
        final, best = as_floats([r["final_loss"], r["best_loss"]])
        rows.append(
            [
                lr_label(r["lr"]),
                METHODS[r["method"]],
                _loss(final),
                _loss(best),
                "-" if r["blow_up_step"] is None else str(r["blow_up_step"]),
                "yes" if r["diverged"] else "no",
                str(len(r["loss_spikes"])),
                f"{summary.median:.3g}",
                f"{summary.max:.3g}",
            ]
        )
    header = [
        "lr",
        "method",
        "final loss",
        "best loss",
        "blow-up at step",
        "diverged",
        "loss spikes",
        "grad norm median",
        "grad norm max",
    ]
    return _table(header, rows, numeric_from=2)


# ------------------------------------------------------------------------------------------------
# plots

COLORS = {
    "none": "tab:red",
    "clip": "tab:blue",
    "zclip": "tab:orange",
    "stab": "tab:green",
    "guard": "tab:purple",
    "sadamw": "tab:olive",
}

# StabilizedAdamW computes what GradientStabilizer() + AdamW computes: dashed, so both show.
STYLES = {"sadamw": "--"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _baselines(ax, unigram: float, uniform: bool) -> None:
    lines = [(UNIFORM_LOSS, "uniform (ln 256)")] if uniform else []
    for y, name in [*lines, (unigram, "unigram")]:
        ax.axhline(y, color="gray", ls="--", lw=0.8)
        ax.text(
            0.01, y, name, transform=ax.get_yaxis_transform(), fontsize=7, color="gray", va="bottom"
        )


def _loss_vs(ax, records: Records, field: str, xs: Callable[[float], float], uniform: bool) -> None:
    """Median capped final loss against ``field`` per method, with the seeds' range."""
    methods = methods_of(records)
    points = grid(records, field)
    for i, m in enumerate(methods):
        med, low, high = [], [], []
        for x in points:
            values = [metrics.capped(v) for v in finals(select(records, method=m, **{field: x}))]
            med.append(statistics.median(values))
            low.append(med[-1] - min(values))
            high.append(max(values) - med[-1])
        ax.errorbar(
            [xs(x) * 1.07 ** (i - (len(methods) - 1) / 2) for x in points],
            med,
            yerr=[low, high],
            fmt="o",
            ls=STYLES.get(m, "-"),
            color=COLORS[m],
            ms=3,
            lw=1.1,
            elinewidth=0.8,
            capsize=2,
            label=METHODS[m],
        )
    _baselines(ax, records[0]["unigram_loss"], uniform)
    ax.set_ylabel("final held-out loss (nats/byte)", fontsize=8)


def plot_lr_sweep(records: Records, out: Path) -> None:
    """Final loss against the learning rate, and each run's max/median gradient norm."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=80)
    _loss_vs(left, records, "lr", lambda x: x, uniform=True)
    left.set_xscale("log")
    left.set_xlabel("peak learning rate (AdamW)", fontsize=8)
    seeds = len(grid(records, "seed"))
    left.set_title(
        f"final held-out loss: median and range of {seeds} seed(s); diverged runs count as ln 256",
        fontsize=9,
    )
    left.set_ylim(top=UNIFORM_LOSS + 0.25)
    left.legend(fontsize=7, loc="upper left")
    for m in methods_of(records):
        for r in select(records, method=m):
            ratio = metrics.norm_summary(as_floats(r["grad_norm"])).ratio
            right.scatter(r["lr"], ratio, s=9, color=COLORS[m], alpha=0.7)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("peak learning rate (AdamW)", fontsize=8)
    right.set_ylabel("max / median gradient norm of a run", fontsize=8)
    right.set_title("how far a run's largest gradient stands out (every run)", fontsize=9)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    _save(plt, fig, out)


def plot_wd_sweep(records: Records, out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.4), dpi=80)
    points = grid(records, "wd")
    position = {x: i for i, x in enumerate(points)}
    worst = max(metrics.capped(x) for x in finals(records))
    _loss_vs(ax, records, "wd", lambda x: 10.0 ** position[x], uniform=worst > UNIFORM_LOSS - 0.5)
    ax.set_xscale("log")
    ax.set_xticks([10.0**i for i in range(len(points))], [f"{x:g}" for x in points])
    ax.minorticks_off()
    ax.set_ylim(top=max(worst, records[0]["unigram_loss"]) + 0.1)
    ax.set_xlabel("weight decay", fontsize=8)
    ax.set_title(f"weight-decay sweep at lr {lr_label(records[0]['lr'])}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(labelsize=7)
    _save(plt, fig, out)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    return [
        statistics.median(values[max(0, t - window + 1) : t + 1])
        if math.isfinite(values[t])
        else math.nan
        for t in range(len(values))
    ]


def plot_traces(records: Records, out: Path, title: str, columns: int = 3) -> None:
    """Per learning rate, one line per method: the training loss (10-step median) above and the
    gradient norm before protection below, every step; ``columns`` learning rates a row."""
    plt = _pyplot()
    lrs = grid(records, "lr")
    cols = min(columns, len(lrs))
    rows = -(-len(lrs) // cols)
    fig, axes = plt.subplots(
        2 * rows, cols, figsize=(4.4 * cols, 5.4 * rows), dpi=80, squeeze=False
    )
    for i, lr in enumerate(lrs):
        top, bottom = axes[2 * (i // cols)][i % cols], axes[2 * (i // cols) + 1][i % cols]
        for r in sorted(select(records, lr=lr), key=lambda r: list(METHODS).index(r["method"])):
            train = as_floats(r["train_loss"])
            color, style = COLORS[r["method"]], STYLES.get(r["method"], "-")
            top.plot(
                _smooth(train, metrics.BLOW_UP_WINDOW),
                color=color,
                ls=style,
                lw=0.9,
                label=METHODS[r["method"]],
            )
            bottom.plot(as_floats(r["grad_norm"]), color=color, ls=style, lw=0.6, alpha=0.8)
        top.set_title(f"{title}, lr {lr_label(lr)}", fontsize=9)
        top.set_ylim(0, UNIFORM_LOSS + 1)
        top.set_ylabel("training loss, 10-step median (axis ends at 6.5)", fontsize=8)
        bottom.set_yscale("log")
        bottom.set_ylabel("gradient norm before protection", fontsize=8)
        bottom.set_xlabel("step", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    for i in range(len(lrs), rows * cols):
        axes[2 * (i // cols)][i % cols].set_visible(False)
        axes[2 * (i // cols) + 1][i % cols].set_visible(False)
    axes[0][0].legend(fontsize=7, loc="upper right")
    _save(plt, fig, out)


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
