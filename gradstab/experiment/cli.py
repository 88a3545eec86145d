"""``python -m gradstab experiment NAME``: the command line of the stability benchmark."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gradstab.experiment import report, runner
from gradstab.experiment.data import UNIFORM_LOSS, load_corpus
from gradstab.experiment.model import GPT
from gradstab.experiment.runner import METHODS, Preset, RunStore

EXPERIMENTS = ("lr-sweep", "wd-sweep", "long", "all")


class Session:
    """One invocation: the preset, where results go, and how runs are trained."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.preset: Preset = (runner.QUICK if args.quick else runner.PRESETS)[args.preset]
        self.device: str = args.device
        self.workers: int = args.workers
        self.out: Path = args.out
        self.lrs: list[float] | None = args.lr
        self.log = log
        self.store = RunStore(self.out / "runs.jsonl")
        if self.store.dropped:
            log(f"dropped {self.store.dropped} incomplete line(s) of {self.store.path}")
        self.trainer = runner.Trainer(
            self.preset, self.store, device=self.device, workers=self.workers, log=log
        )
        self.command = "python -m gradstab experiment " + " ".join(args.argv)

    def run(self, specs: Sequence[runner.RunSpec]) -> list[dict]:
        return self.trainer.run(specs)

    def write(self, name: str, sections: Sequence[tuple[str, str]]) -> None:
        """Prints the tables and writes them to ``OUT/name.md``."""
        text = f"<!-- written by: {self.command} -->\n"
        for title, table in sections:
            text += f"\n### {title}\n\n{table}\n"
            self.log(f"\n{title}\n{table}")
        path = self.out / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.log(f"wrote {path}")

    def plot(self, draw: Callable[..., None], records: Sequence[dict], name: str, *extra) -> None:
        path = self.out / f"{name}.png"
        draw(records, path, *extra)
        self.log(f"wrote {path}")

    # the experiments ---------------------------------------------------------------------------

    def lr_sweep(self) -> list[dict]:
        records = self.run(runner.lr_sweep_specs(self.preset, lrs=self.lrs))
        lr = report.lr_label
        self.write(
            "lr-sweep",
            [
                (
                    "Final held-out loss (nats/byte): median over seeds (min-max)",
                    report.by_grid_table(records, "lr", lambda x: f"lr {lr(x)}"),
                ),
                (
                    "Runs that diverged or blew up, of all seeds (d: diverged)",
                    report.instability_table(records, "lr", lambda x: f"lr {lr(x)}"),
                ),
                (
                    "Paired gap to no protection (nats/byte): median over seeds, W-T-L",
                    report.paired_table(records, "lr", lambda x: f"lr {lr(x)}"),
                ),
                (
                    "Gradient-norm max/median of a run: median over seeds",
                    report.norm_table(records, "lr", lambda x: f"lr {lr(x)}"),
                ),
                *self.twin_section(records, "lr", lambda x: f"lr {lr(x)}"),
            ],
        )
        self.plot(report.plot_lr_sweep, records, "lr-sweep")
        first_seed = [r for r in records if r["seed"] == min(self.preset.seeds)]
        self.plot(report.plot_traces, first_seed, "lr-sweep-traces", "lr sweep")
        return records

    @staticmethod
    def twin_section(
        records: Sequence[dict], field: str, label: Callable[[float], str]
    ) -> list[tuple[str, str]]:
        if not {"sadamw", "stab"} <= {r["method"] for r in records}:
            return []
        return [
            (
                "Rounding alone: |StabilizedAdamW - GradientStabilizer()| final loss, paired "
                "(the same update computed two ways)",
                report.twin_table(records, field, label),
            )
        ]

    def chosen_lr(self) -> float:
        if self.lrs:
            lr = self.lrs[0]
            self.log(f"learning rate {lr:g}, as given by --lr (not the protocol's rule)")
            return lr
        baseline = self.run(runner.lr_sweep_specs(self.preset, methods=["none"]))
        lr = runner.choose_wd_lr(self.preset, baseline)
        if lr is None:
            lr = min(self.preset.lrs)
            self.log(
                f"learning rate {lr:g}, the smallest of the grid: at none of the grid's learning "
                "rates did no protection stay stable and beat the unigram loss in every seed"
            )
            return lr
        self.log(
            f"learning rate {lr:g}: the largest of the grid at which, and below which, no "
            "protection neither blew up nor diverged in any seed and beat the unigram loss"
        )
        return lr

    def wd_sweep(self, lr: float) -> list[dict]:
        records = self.run(runner.wd_sweep_specs(self.preset, lr))
        self.write(
            "wd-sweep",
            [
                (
                    f"Final held-out loss at lr {lr:g} (nats/byte): median over seeds (min-max)",
                    report.by_grid_table(records, "wd", lambda x: f"wd {x:g}"),
                ),
                (
                    "Weight-decay sensitivity: max - min of the final losses over the grid",
                    report.wd_spread_table(records),
                ),
                (
                    "Runs that diverged or blew up, of all seeds (d: diverged)",
                    report.instability_table(records, "wd", lambda x: f"wd {x:g}"),
                ),
                (
                    "Paired gap to no protection (nats/byte): median over seeds, W-T-L",
                    report.paired_table(records, "wd", lambda x: f"wd {x:g}"),
                ),
                *self.twin_section(records, "wd", lambda x: f"wd {x:g}"),
            ],
        )
        self.plot(report.plot_wd_sweep, records, "wd-sweep")
        return records

    def long(self, lr: float) -> list[dict]:
        records = self.run(runner.long_specs(self.preset, runner.long_lrs(self.preset, lr)))
        self.write("long", [("Long runs", report.long_table(records))])
        self.plot(report.plot_traces, records, "long", "long run")
        return records


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gradstab experiment",
        description="The stability benchmark of docs/evidence.md: a small byte-level GPT trained "
        "on Python's standard-library sources with AdamW, under "
        + ", ".join(METHODS.values())
        + ". Every finished run is appended to OUT/runs.jsonl; a rerun trains only the runs "
        "missing there, so an interrupted sweep resumes where it stopped.",
    )
    parser.add_argument(
        "name",
        choices=EXPERIMENTS,
        help="lr-sweep: the learning-rate grid x seeds; wd-sweep: the weight-decay grid at the "
        "protocol's learning rate; long: runs of 4x the steps; all: the three and a summary",
    )
    parser.add_argument("--preset", choices=sorted(runner.PRESETS), default="cpu")
    parser.add_argument(
        "--device", default=None, help="where to train (default: cpu; cuda for --preset gpu)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("gradstab_experiment"),
        help="directory of runs.jsonl, the tables (*.md) and plots (*.png) (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny version of the preset (for tests)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes training runs at once, one thread each (default: 2 on a CPU with 2 or "
        "more cores, else 1)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=None,
        help="lr-sweep: only these learning rates (a slice of the grid); wd-sweep, long: this "
        "learning rate instead of the protocol's rule",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.device is None:
        args.device = "cuda" if args.preset == "gpu" else "cpu"
    if args.workers is None:
        args.workers = min(2, os.cpu_count() or 1) if args.device == "cpu" else 1
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.lr and any(not lr > 0 for lr in args.lr):
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: this torch sees no CUDA device (--device cpu runs the "
            "preset on the CPU)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print(
            "gradstab experiment: the plots need matplotlib: pip install matplotlib",
            file=sys.stderr,
        )
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    session = Session(args, log)
    preset = session.preset
    corpus = load_corpus()
    params = GPT(preset.model).num_params()
    log(
        f"gradstab experiment {args.name}, preset {preset.name}: a {params:,}-parameter GPT "
        f"({preset.model.n_layer} layers, width {preset.model.d_model}, context "
        f"{preset.model.context}), batch {preset.batch}, {preset.steps} steps, "
        f"{'/'.join(preset.precisions)}, on {args.device} with {args.workers} worker(s).\n"
        f"Text: Python {corpus.python}'s standard library, {corpus.train_files} files "
        f"({len(corpus.train):,} bytes) to train, {corpus.heldout_files} ({len(corpus.heldout):,}"
        f" bytes) held out, sha256 {corpus.digest[:16]}. Uniform loss {UNIFORM_LOSS:.3f}. "
        f"Results: {session.store.path}"
    )
    start = time.perf_counter()
    lr_records = wd_records = None
    with session.trainer:
        if args.name in ("lr-sweep", "all"):
            lr_records = session.lr_sweep()
        if args.name in ("wd-sweep", "long", "all"):
            lr = session.chosen_lr()
            if args.name in ("wd-sweep", "all"):
                wd_records = session.wd_sweep(lr)
            if args.name in ("long", "all"):
                session.long(lr)
    if lr_records is not None:
        session.write(
            "summary" if args.name == "all" else "lr-sweep-summary",
            [("Headline", report.headline_table(lr_records, wd_records))],
        )
    log(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
