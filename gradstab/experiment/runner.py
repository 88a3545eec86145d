"""Presets, one training run, the resumable store of finished runs, and the sweeps' run lists."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import gradstab
from gradstab.experiment import metrics
from gradstab.experiment.data import Corpus, load_corpus, random_windows, unigram_loss
from gradstab.experiment.model import GPT, VOCAB_SIZE, GPTConfig
from gradstab.experiment.zclip import ZClip

# Method key -> the name every table uses.
METHODS: dict[str, str] = {
    "none": "no protection",
    "clip": "clip_grad_norm_(1.0)",
    "zclip": "ZClip",
    "stab": "GradientStabilizer()",
    "guard": "GradientStabilizer(spike_guard=10)",
    "sadamw": "StabilizedAdamW",
}
CLIP_MAX_NORM = 1.0
SPIKE_GUARD = 10.0
PRECISIONS = ("fp32", "fp16", "bf16")


def half_decades(low_exp: int, high_exp: int) -> tuple[float, ...]:
    """``10**(k/2)`` for ``k`` from ``2*low_exp`` to ``2*high_exp``: 1e-3, 3.16e-3, ..., 10."""
    return tuple(float(f"{10 ** (k / 2):.4g}") for k in range(2 * low_exp, 2 * high_exp + 1))


@dataclass(frozen=True)
class Preset:
    """Everything a protocol fixes. The grids say which runs each experiment makes."""

    name: str
    model: GPTConfig
    batch: int  # sequences of model.context + 1 bytes per step
    steps: int  # updates of an lr-sweep or wd-sweep run
    eval_every: int  # held-out loss every this many steps, and after the last update
    eval_seqs: int  # held-out sequences behind each held-out loss
    lrs: tuple[float, ...]  # the learning-rate grid
    seeds: tuple[int, ...]
    sweep_wd: float  # weight decay of the learning-rate sweep
    wds: tuple[float, ...]  # the weight-decay grid
    long_factor: int  # a long run has steps * long_factor updates
    long_seeds: tuple[int, ...]
    precisions: tuple[str, ...]  # "fp32"; "fp16" (autocast + GradScaler); "bf16" (autocast)
    warmup_frac: float = 0.1  # linear warm-up over this share of the steps
    min_lr_frac: float = 0.1  # then cosine decay to this share of the peak
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8

    def setup(self) -> dict[str, Any]:
        """The fields that shape a single run (the grids only choose which runs exist)."""
        return {
            "model": dataclasses.asdict(self.model),
            "batch": self.batch,
            "eval_every": self.eval_every,
            "eval_seqs": self.eval_seqs,
            "warmup_frac": self.warmup_frac,
            "min_lr_frac": self.min_lr_frac,
            "betas": list(self.betas),
            "adam_eps": self.adam_eps,
        }


CPU = Preset(
    name="cpu",
    model=GPTConfig(context=64, n_layer=2, n_head=4, d_model=64),
    batch=32,
    steps=300,
    eval_every=25,
    eval_seqs=64,
    lrs=half_decades(-3, 1),
    seeds=(0, 1, 2),
    sweep_wd=0.1,
    wds=(0.0, 0.1, 0.3, 1.0),
    long_factor=4,
    long_seeds=(0,),
    precisions=("fp32",),
)
GPU = Preset(
    name="gpu",
    model=GPTConfig(context=512, n_layer=8, n_head=8, d_model=512),
    batch=16,
    steps=2000,
    eval_every=100,
    eval_seqs=32,
    lrs=half_decades(-3, 1),
    seeds=(0,),
    sweep_wd=0.1,
    wds=(0.0, 0.1, 0.3, 1.0),
    long_factor=4,
    long_seeds=(0,),
    precisions=("fp16", "bf16"),
)
# --quick: the whole pipeline in seconds (for tests); its outcomes mean nothing.
QUICK = {
    "cpu": dataclasses.replace(
        CPU,
        name="cpu-quick",
        model=GPTConfig(context=16, n_layer=1, n_head=2, d_model=16),
        batch=8,
        steps=30,
        eval_every=10,
        eval_seqs=8,
        lrs=(1e-3, 1e-1, 10.0),
        seeds=(0,),
        wds=(0.0, 1.0),
        long_factor=2,
    ),
    "gpu": dataclasses.replace(
        GPU,
        name="gpu-quick",
        model=GPTConfig(context=32, n_layer=1, n_head=2, d_model=32),
        batch=4,
        steps=6,
        eval_every=3,
        eval_seqs=4,
        lrs=(1e-3, 1e-1),
        wds=(0.0, 1.0),
        long_factor=2,
    ),
}
PRESETS = {"cpu": CPU, "gpu": GPU}


@dataclass(frozen=True)
class RunSpec:
    """One run. Runs with equal specs (and preset, device, corpus) are the same run, whichever
    experiment asks for it: the store trains it once."""

    method: str
    lr: float
    wd: float
    seed: int
    steps: int
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {list(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; one of {list(PRECISIONS)}")

    def describe(self) -> str:
        text = f"lr {self.lr:<6g} wd {self.wd:<3g} seed {self.seed}"
        if self.precision != "fp32":
            text += f" {self.precision}"
        return f"{text} {self.steps} steps"


def run_key(spec: RunSpec, preset: Preset, device: str, corpus_digest: str) -> str:
    """The store's identity of a run: what decides its outcome, as canonical JSON."""
    return json.dumps(
        {
            "run": dataclasses.asdict(spec),
            "preset": preset.name,
            "setup": preset.setup(),
            "device": torch.device(device).type,
            "corpus": corpus_digest,
        },
        sort_keys=True,
    )


# ------------------------------------------------------------------------------------------------
# one run


def lr_factor(steps: int, warmup_frac: float, min_frac: float) -> Callable[[int], float]:
    """The schedule as a factor of the peak lr at update ``t`` (0-based): linear warm-up over
    ``ceil(warmup_frac * steps)`` updates, then cosine decay to ``min_frac`` at the last one."""
    warmup = max(1, math.ceil(warmup_frac * steps))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = (t - warmup) / max(1, steps - 1 - warmup)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices (embeddings included), none on biases and LayerNorm gains."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(spec: RunSpec, preset: Preset, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.wd)
    kwargs = {"lr": spec.lr, "betas": preset.betas, "eps": preset.adam_eps}
    if spec.method == "sadamw":
        return gradstab.StabilizedAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def make_protection(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> Callable[[Tensor], None]:
    """What runs between unscaling the gradients and the optimizer's step, given their total
    norm (a 0-d tensor on the device)."""
    params = list(model.parameters())
    if method in ("none", "sadamw"):  # StabilizedAdamW stabilizes inside its step
        return lambda norm: None
    if method == "clip":
        return lambda norm: nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM)
    if method == "zclip":
        zclip = ZClip()
        return lambda norm: zclip.apply_([p.grad for p in params], norm.item())
    if method in ("stab", "guard"):
        stab = gradstab.GradientStabilizer(spike_guard=SPIKE_GUARD if method == "guard" else None)
        amp = scaler.is_enabled()
        return lambda norm: stab.apply(
            model, scaler=scaler if amp else None, optimizer=optimizer if amp else None
        )
    raise ValueError(f"unknown method {method!r}; one of {list(METHODS)}")


@dataclass(frozen=True)
class EvalSet:
    inputs: Tensor  # [eval_seqs, context]
    targets: Tensor
    unigram_loss: float


def eval_set(corpus: Corpus, preset: Preset) -> EvalSet:
    """The fixed held-out sequences behind every held-out loss of a preset."""
    windows = random_windows(
        corpus.heldout,
        preset.eval_seqs,
        preset.model.context + 1,
        torch.Generator().manual_seed(0),
    )
    targets = windows[:, 1:]
    return EvalSet(windows[:, :-1], targets, unigram_loss(corpus.train_counts, targets))


def _autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _sig(x: float) -> float | None:
    """A float for JSON: 6 significant digits; None for NaN/Inf (JSON has neither)."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def train_run(spec: RunSpec, preset: Preset, corpus: Corpus, device: str = "cpu") -> dict:
    """Trains one run; returns its record (see docs/evidence.md, "Outputs").

    The seed fixes the initial weights (drawn on the CPU, then moved) and the batches, so runs
    with the same seed start alike and see the same data whatever their method.
    """
    dev = torch.device(device)
    torch.manual_seed(spec.seed)
    model = GPT(preset.model).to(dev)
    optimizer = make_optimizer(spec, preset, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(spec.steps, preset.warmup_frac, preset.min_lr_frac)
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=spec.precision == "fp16")
    protect = make_protection(spec.method, model, optimizer, scaler)
    params = list(model.parameters())
    batches = torch.Generator().manual_seed(10_000 + spec.seed)
    evals = eval_set(corpus, preset)
    eval_x, eval_y = evals.inputs.to(dev), evals.targets.to(dev)

    @torch.no_grad()
    def held_out_loss() -> float:
        with _autocast(dev, spec.precision):
            logits = model(eval_x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), eval_y.reshape(-1)).item()

    # Per-step figures stay on the device; the host reads them at the evaluation points only.
    train_loss = torch.full((spec.steps,), math.nan, device=dev)
    grad_norm = torch.full((spec.steps,), math.nan, device=dev)
    eval_steps: list[int] = []
    eval_loss: list[float] = []
    stopped = spec.steps
    start = time.perf_counter()
    for step in range(spec.steps + 1):
        if step % preset.eval_every == 0 or step == spec.steps:
            eval_steps.append(step)
            eval_loss.append(held_out_loss())
            bad = (~torch.isfinite(train_loss[:step])).nonzero()
            if len(bad):
                stopped = int(bad[0]) + 1
                break
        if step == spec.steps:
            break
        batch = random_windows(corpus.train, preset.batch, preset.model.context + 1, batches)
        batch = batch.to(dev, non_blocking=True)
        with _autocast(dev, spec.precision):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        train_loss[step] = loss.detach()
        grad_norm[step] = norm
        protect(norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    seconds = time.perf_counter() - start
    train = train_loss[:stopped].tolist()
    norms = grad_norm[:stopped].tolist()
    spikes = metrics.loss_spikes(train)
    summary = metrics.norm_summary(norms)
    return {
        **dataclasses.asdict(spec),
        "method_name": METHODS[spec.method],
        "preset": preset.name,
        "final_loss": _sig(eval_loss[-1]),
        "best_loss": _sig(min((x for x in eval_loss if math.isfinite(x)), default=math.nan)),
        "diverged": metrics.diverged(train, eval_loss),
        "blow_up_step": metrics.blow_up_step(train),
        "loss_spikes": spikes,
        "grad_norm_median": _sig(summary.median),
        "grad_norm_max": _sig(summary.max),
        "skipped_steps": summary.skipped,
        "stopped_at": stopped,
        "seconds": round(seconds, 3),
        "eval_steps": eval_steps,
        "eval_loss": [_sig(x) for x in eval_loss],
        "train_loss": [_sig(x) for x in train],
        "grad_norm": [_sig(x) for x in norms],
        "params": model.num_params(),
        "unigram_loss": round(evals.unigram_loss, 6),
        "corpus": corpus.describe(),
        "env": environment(dev),
    }


def environment(device: torch.device) -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradstab": gradstab.__version__,
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def as_floats(values: Iterable[float | None]) -> list[float]:
    """A record's curve with JSON's nulls back as NaN."""
    return [math.nan if x is None else x for x in values]


# ------------------------------------------------------------------------------------------------
# the store: one JSON line per finished run


class RunStore:
    """``runs.jsonl``: one line per finished run, appended as it finishes.

    An interrupted sweep leaves every finished run on disk; a half-written last line (the
    process killed mid-write) is dropped when the store is opened, and the sweep trains only the
    runs it does not find.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        self.dropped = 0
        if path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) < len(raw):  # a line cut short: drop it so the next append is clean
            self.dropped += 1
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                self.dropped += 1

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict:
        return self.records[key]

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


# ------------------------------------------------------------------------------------------------
# running many


@dataclass(frozen=True)
class Job:
    spec: RunSpec
    key: str


def _init_worker() -> None:
    # Tiny matrices: a second thread per run costs more than it brings, and the runs are then
    # reproducible whatever the machine's core count.
    torch.set_num_threads(1)


def _train_job(spec: RunSpec, preset: Preset, device: str, key: str) -> dict:
    record = train_run(spec, preset, load_corpus(), device)
    return {"key": key, **record}


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(done: int, total: int, record: dict, elapsed: float, eta: float) -> str:
    width = len(str(total))
    final = record["final_loss"]
    status = "diverged" if record["diverged"] else ""
    if record["blow_up_step"] is not None:
        status = (status + " blow-up").strip()
    spec = RunSpec(*(record[f.name] for f in dataclasses.fields(RunSpec)))
    return (
        f"[{done:{width}d}/{total}] {METHODS[record['method']]:<35} {spec.describe():<34} "
        f"final {'nan' if final is None else f'{final:.3f}':>6} {status:<17} "
        f"({record['seconds']:.1f} s)  elapsed {_fmt_duration(elapsed)}  ETA {_fmt_duration(eta)}"
    )


class Trainer:
    """Trains runs the store lacks, in this process or in ``workers`` processes of one thread
    each (started on first need and kept until ``close()``, or the end of a ``with`` block)."""

    def __init__(
        self,
        preset: Preset,
        store: RunStore,
        *,
        device: str = "cpu",
        workers: int = 1,
        log: Callable[[str], None] = print,
    ) -> None:
        self.preset = preset
        self.store = store
        self.device = device
        self.workers = workers
        self.log = log
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, specs: Sequence[RunSpec]) -> list[dict]:
        """Trains the runs of ``specs`` the store lacks; returns every spec's record, in order.

        One progress line per finished run, with an ETA from the steps still to train at the
        pace so far.
        """
        corpus = load_corpus()
        keys = [run_key(s, self.preset, self.device, corpus.digest) for s in specs]
        jobs = list({k: Job(s, k) for s, k in zip(specs, keys) if k not in self.store}.values())
        done_before = len(set(keys)) - len(jobs)
        if done_before:
            rest = f"; training the other {len(jobs)}" if jobs else ""
            self.log(f"{done_before} of {len(set(keys))} runs already in {self.store.path}{rest}")
        total_steps = sum(j.spec.steps for j in jobs)
        finished_steps = 0
        start = time.perf_counter()
        for count, record in enumerate(self._train(jobs), 1):
            self.store.add(record)
            finished_steps += record["steps"]
            elapsed = time.perf_counter() - start
            eta = elapsed / finished_steps * (total_steps - finished_steps)
            self.log(progress_line(count, len(jobs), record, elapsed, eta))
        return [self.store.get(k) for k in keys]

    def _train(self, jobs: list[Job]) -> Iterator[dict]:
        if self.workers <= 1 or len(jobs) <= 1:
            threads = torch.get_num_threads()
            _init_worker()
            try:
                for job in jobs:
                    yield _train_job(job.spec, self.preset, self.device, job.key)
            finally:
                torch.set_num_threads(threads)
            return
        if self._pool is None:
            # Fresh processes: forking one whose torch has started its threads can hang.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )
        pending: set[Future] = {
            self._pool.submit(_train_job, j.spec, self.preset, self.device, j.key) for j in jobs
        }
        try:
            while pending:
                ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


# ------------------------------------------------------------------------------------------------
# the experiments' run lists


def lr_sweep_specs(
    preset: Preset, methods: Sequence[str] = tuple(METHODS), lrs: Sequence[float] | None = None
) -> list[RunSpec]:
    return [
        RunSpec(m, lr, preset.sweep_wd, seed, preset.steps, precision)
        for precision in preset.precisions
        for lr in (lrs or preset.lrs)
        for seed in preset.seeds
        for m in methods
    ]


def wd_sweep_specs(preset: Preset, lr: float) -> list[RunSpec]:
    return [
        RunSpec(m, lr, wd, seed, preset.steps, precision)
        for precision in preset.precisions
        for wd in preset.wds
        for seed in preset.seeds
        for m in METHODS
    ]


def long_specs(preset: Preset, lrs: Sequence[float]) -> list[RunSpec]:
    return [
        RunSpec(m, lr, preset.sweep_wd, seed, preset.steps * preset.long_factor, precision)
        for precision in preset.precisions
        for lr in lrs
        for seed in preset.long_seeds
        for m in METHODS
    ]


def stable_and_learning(records: Sequence[dict]) -> bool:
    """No seed blew up or diverged, and the median final loss beats the unigram baseline."""
    if any(r["diverged"] or r["blow_up_step"] is not None for r in records):
        return False
    finals = as_floats(r["final_loss"] for r in records)
    return metrics.median_capped(finals) < records[0]["unigram_loss"]


def choose_wd_lr(preset: Preset, baseline: Sequence[dict]) -> float | None:
    """The weight-decay sweep's learning rate, by the rule fixed before any result was seen:
    the largest grid learning rate such that at it and at every smaller one, no protection
    (``baseline``: its lr-sweep records) never blew up or diverged in any seed and its median
    final loss is below the unigram loss. None if even the smallest fails."""
    chosen = None
    for lr in sorted(preset.lrs):
        runs = [r for r in baseline if r["lr"] == lr]
        if not runs or not stable_and_learning(runs):
            break
        chosen = lr
    return chosen


def long_lrs(preset: Preset, chosen: float) -> list[float]:
    """The long runs' learning rates: the chosen one and the next larger on the grid."""
    grid = sorted(preset.lrs)
    above = [lr for lr in grid if lr > chosen]
    return [chosen, *above[:1]]
