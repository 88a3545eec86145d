"""Draws a results CSV of ``python -m gradstab bench`` as a PNG.

    python benchmarks/plot.py benchmarks/results/cpu.csv [-o benchmarks/results/cpu.png]

One group of bars per preset: each implementation's median time divided by that of
clip_grad_norm_ (log scale; the floor is the memory-bandwidth bound), labelled with the
milliseconds. Needs matplotlib (``pip install matplotlib``), which gradstab itself does not.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

COLORS = {
    "loop": "#c44e52",
    "torch": "#dd8452",
    "compiled": "#4c72b0",
    "apply": "#8172b3",
    "clip_grad_norm_": "#8c8c8c",
    "floor": "#55a868",
}


def load(path: Path) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, str]]]:
    with open(path, newline="") as f:
        # Rows without a time over clip_grad_norm_ (the AdamW-step presets) have no place here.
        rows = [r for r in csv.DictReader(f) if r["vs_clip_grad_norm"]]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    return presets, impls, {(r["preset"], r["implementation"]): r for r in rows}


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets, impls, rows = load(csv_path)
    any_row = next(iter(rows.values()))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 2.0 * len(presets)), 4.8))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs, ys, labels = [], [], []
        for i, preset in enumerate(presets):
            row = rows.get((preset, impl))
            if row is None or not row["vs_clip_grad_norm"]:
                continue
            xs.append(i + (j - (len(impls) - 1) / 2) * width)
            ys.append(float(row["vs_clip_grad_norm"]))
            labels.append(f"{float(row['median_ms']):.3g}")
        bars = ax.bar(xs, ys, width, label=impl, color=COLORS.get(impl))
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ratios = [float(r["vs_clip_grad_norm"]) for r in rows.values() if r["vs_clip_grad_norm"]]
    ax.set_ylim(10 ** (math.log10(min(ratios)) - 0.3), 10 ** (math.log10(max(ratios)) + 0.4))
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("time / clip_grad_norm_ time (labels: ms)")
    ax.set_title(
        f"gradstab on {any_row['device']}, {any_row['threads']} threads, torch {any_row['torch']}"
        f"\nmedian of {any_row['repeats']} interleaved repetitions, {any_row['date']}",
        fontsize=8,
    )
    ax.legend(fontsize=7, ncol=min(len(impls), 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(png_path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a results CSV of gradstab.bench")
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: the CSV's name, .png)")
    args = parser.parse_args()
    plot(args.csv, args.out or args.csv.with_suffix(".png"))


if __name__ == "__main__":
    main()
