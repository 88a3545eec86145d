"""One rank of the DeepSpeed tests (tests/test_deepspeed.py), on CPU ranks (DS_ACCELERATOR=cpu).

Launched on 2 ranks by the test (or by hand: ``DS_ACCELERATOR=cpu torchrun --nproc-per-node 2
tests/deepspeed_worker.py --out DIR``), it runs every scenario below in one process group and
writes what it saw to ``DIR/rank{RANK}.pt``; it asserts nothing itself.

Scenarios (the model, batches, spike and NaN are those of tests/distributed_worker.py, whose
``train_single`` is the single process every fp32 run must equal):
    train/{stage}/{dtype}   ZeRO stage 0-3, fp32 and bf16, 8 AdamW steps with a 1e4 spike (the
                  loss scaled) and a NaN in one gradient element (a tensor hook); per step the
                  whole gradients before and after apply() (gathered outside the counted part),
                  the all-reduce calls apply() made, the stats; the final weights and state.
    accum/{stage}  gradient_accumulation_steps=2 (two micro-batches of 8 per rank and step).
    fp16/{stage}   fp16 with DeepSpeed's dynamic loss scaler and an Inf in one step (skipped).
    global/2       granularity="global" on ZeRO-2.
    resume/{stage} 4 steps, engine.save_checkpoint with the stabilizer in client_state, a fresh
                  engine and stabilizer, load_checkpoint, 4 more steps.
    errors         gradient_clipping warning, apply() outside backward..step, scaler=, raise.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

import gradstab
from gradstab.integrations import deepspeed as gds
from tests import distributed_worker as dw

STAGES = (0, 1, 2, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INF_STEP = 3  # the fp16 scenario puts an Inf into one gradient at this step


def ds_config(
    stage: int,
    dtype: str,
    accum: int = 1,
    clipping: float = 0.0,
    persistent: bool = False,
    fp32_accum: bool = False,
    overlap: bool = False,
) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": dw.BATCH // dist.get_world_size() // accum,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": clipping,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if fp32_accum:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if overlap:
        # as HuggingFace's example configs: overlapped, bucketed reduction (small buckets here,
        # so that parameters span several)
        cfg["zero_optimization"].update(
            overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=200
        )
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 10, "loss_scale_window": 1000}
    if stage == 3 and not persistent:
        # gather parameters on every use: the model is tiny, and the default threshold keeps
        # all of it persistent (its gradients are partitioned all the same: scenario train/3p)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def make_engine(stage: int, dtype: str, **kwargs):
    model = dw.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=dw.LR)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config(stage, dtype, **kwargs)
    )
    return engine


class Faults:
    """Injects the NaN (or Inf) of the scenarios into one gradient element with a tensor hook,
    before DeepSpeed reduces anything (as the single process sets it into ``p.grad``)."""

    def __init__(self, engine, value: float | None = float("nan")):
        self.active = False
        self.value = value
        param = dict(engine.module.named_parameters())[dw.NAN_PARAM]
        param.register_hook(self._hook)

    def _hook(self, grad):
        if not self.active:
            return grad
        grad = grad.clone()
        grad[dw.NAN_INDEX] = self.value
        return grad


def whole_grads(engine) -> list[torch.Tensor]:
    """The whole averaged gradients (DeepSpeed's public API; collectives, never counted)."""
    return [safe_get_full_grad(p).detach().clone() for _, p in engine.module.named_parameters()]


def whole_weights(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().clone()
    return out


def run_steps(engine, stab, start: int, stop: int, faults: Faults, record: bool, accum: int = 1):
    """Steps ``start..stop`` on this rank's slice of the batch (micro-batches of it under
    accumulation); returns per step what apply() saw and did."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = next(engine.module.parameters()).dtype
    steps = []
    for step in range(start, stop):
        x, y = dw.batch(step)
        per_rank = dw.BATCH // world
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        micro = per_rank // accum
        entry: dict = {"calls": []}
        for j in range(accum):
            xs, ys = x[j * micro : (j + 1) * micro], y[j * micro : (j + 1) * micro]
            loss = nn.functional.mse_loss(engine(xs.to(dtype)).float(), ys)
            if step == dw.SPIKE_STEP:
                loss = loss * dw.SPIKE
            faults.active = step == (INF_STEP if faults.value == float("inf") else dw.NAN_STEP)
            engine.backward(loss)
            faults.active = False
            boundary = engine.is_gradient_accumulation_boundary()
            if record and boundary and step == start:
                frag = gds.layout.fragments(engine.module, engine.optimizer)
                entry["layout"] = {
                    "sharded": frag.sharded,
                    "numel": sum(t.numel() for t in frag.local),
                }
            if record and boundary:
                entry["before"] = whole_grads(engine)
                entry["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", 1.0))
            with dw.CollectiveCounter() as counter:
                stats = stab.apply(engine)
            entry["calls"].append(counter.calls)
            if boundary:
                entry["stats"] = stats.to_dict()
                if record:
                    entry["after"] = whole_grads(engine)
            skipped_before = engine.skipped_steps
            engine.step()
            if boundary:
                entry["ds_skipped"] = engine.skipped_steps > skipped_before
        steps.append(entry)
    return steps


def run_training(
    stage: int,
    dtype: str,
    accum: int = 1,
    granularity: str = "param",
    persistent: bool = False,
    fp32_accum: bool = False,
    overlap: bool = False,
) -> dict:
    engine = make_engine(
        stage, dtype, accum=accum, persistent=persistent, fp32_accum=fp32_accum, overlap=overlap
    )
    stab = gradstab.GradientStabilizer(granularity=granularity)
    faults = Faults(engine, float("inf") if dtype == "fp16" else float("nan"))
    steps = run_steps(engine, stab, 0, dw.STEPS, faults, record=True, accum=accum)
    result = {
        "steps": steps,
        "weights": whole_weights(engine),
        "state": stab.state_dict(),
        "optimizer": type(engine.optimizer).__name__,
        "dtype": dtype,
        "layout": steps[0]["layout"],
        "names": [n for n, _ in engine.module.named_parameters()],
    }
    engine.destroy()
    return result


def run_resume(stage: int, out: Path) -> dict:
    """4 steps, a checkpoint with the stabilizer in client_state, a fresh engine and
    stabilizer loading it, 4 more steps."""
    ckpt = out / f"ckpt_zero{stage}"
    engine = make_engine(stage, "fp32")
    stab = gradstab.GradientStabilizer()
    faults = Faults(engine)
    run_steps(engine, stab, 0, dw.HALF, faults, record=False)
    engine.save_checkpoint(
        str(ckpt), tag="half", client_state={gds.CLIENT_STATE_KEY: stab.state_dict()}
    )
    engine.destroy()
    del engine, stab

    engine = make_engine(stage, "fp32")
    stab = gradstab.GradientStabilizer()
    faults = Faults(engine)
    _, client = engine.load_checkpoint(str(ckpt), tag="half")
    stab.load_state_dict(client[gds.CLIENT_STATE_KEY])
    run_steps(engine, stab, dw.HALF, dw.STEPS, faults, record=False)
    result = {"weights": whole_weights(engine), "state": stab.state_dict()}
    engine.destroy()
    return result


def run_errors() -> dict:
    errors: dict = {}
    x, y = dw.batch(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = dw.BATCH // world
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]

    # gradient_clipping > 0: one warning, not one per step
    engine = make_engine(2, "fp32", clipping=1.0)
    stab = gradstab.GradientStabilizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            engine.backward(nn.functional.mse_loss(engine(x), y))
            stab.apply(engine)
            engine.step()
    errors["clipping_warnings"] = [
        str(w.message) for w in caught if "gradient_clipping" in str(w.message)
    ]
    # apply() after engine.step(): the gradients are gone
    try:
        stab.apply(engine)
        errors["after_step"] = None
    except gds.DeepSpeedLayoutError as err:
        errors["after_step"] = str(err)
    # a torch GradScaler makes no sense with an engine
    engine.backward(nn.functional.mse_loss(engine(x), y))
    try:
        stab.apply(engine, scaler=torch.amp.GradScaler("cpu"))
        errors["scaler"] = None
    except ValueError as err:
        errors["scaler"] = str(err)
    engine.step()
    engine.destroy()

    # ZeRO-1 with bf16 and float32 gradient accumulation is DeepSpeed's BF16_Optimizer: refused
    engine = make_engine(1, "bf16", fp32_accum=True)
    engine.backward(nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
    try:
        gradstab.GradientStabilizer().apply(engine)
        errors["bf16_optimizer"] = None
    except gds.DeepSpeedLayoutError as err:
        errors["bf16_optimizer"] = f"{type(engine.optimizer).__name__}: {err}"
    engine.step()
    engine.destroy()

    # nonfinite="raise" with a NaN in a piece that only rank 1 holds: every rank raises
    engine = make_engine(2, "fp32")
    stab = gradstab.GradientStabilizer(nonfinite="raise")
    faults = Faults(engine)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    stab.apply(engine)
    engine.step()
    before_state = stab.state_dict()
    faults.active = True
    engine.backward(nn.functional.mse_loss(engine(x), y))
    faults.active = False
    grads_before = whole_grads(engine)
    try:
        stab.apply(engine)
        errors["raise"] = None
    except FloatingPointError as err:
        errors["raise"] = str(err)
    errors["raise_grads_before"] = grads_before
    errors["raise_grads_after"] = whole_grads(engine)
    errors["raise_state_before"] = before_state
    errors["raise_state_after"] = stab.state_dict()
    engine.step()
    engine.destroy()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="run the scenarios whose key starts so")
    args = parser.parse_args()
    out = Path(args.out)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict = {
        "world": dist.get_world_size(),
        "deepspeed": deepspeed.__version__,
        "inf_step": INF_STEP,
    }
    scenarios = {}
    for stage in STAGES:
        for dtype in ("fp32", "bf16"):
            scenarios[f"train/{stage}/{dtype}"] = lambda s=stage, d=dtype: run_training(s, d)
    scenarios["train/3p/fp32"] = lambda: run_training(3, "fp32", persistent=True)
    # bf16 with float32 gradient accumulation: ZeRO-2 keeps one flat float32 partition
    scenarios["train/2a/bf16"] = lambda: run_training(2, "bf16", fp32_accum=True)
    scenarios["train/2o/fp32"] = lambda: run_training(2, "fp32", overlap=True)
    for stage in (0, 2, 3):
        scenarios[f"accum/{stage}"] = lambda s=stage: run_training(s, "fp32", accum=2)
        scenarios[f"fp16/{stage}"] = lambda s=stage: run_training(s, "fp16")
    scenarios["global/2"] = lambda: run_training(2, "fp32", granularity="global")
    for stage in (2, 3):
        scenarios[f"resume/{stage}"] = lambda s=stage: run_resume(s, out)
    scenarios["errors"] = run_errors

    def run_scenarios() -> dict:
        for key, scenario in scenarios.items():
            if args.only is None or key.startswith(args.only):
                results[key] = scenario()
        return results

    save_and_exit(run_scenarios, out, rank)


def save_and_exit(results: Callable[[], dict], out: Path, rank: int) -> NoReturn:
    """Saves ``results()`` as ``out/rank{rank}.pt`` and ends the process: exit status 1 with the
    traceback if it raised, else 0 once every rank has saved. ``os._exit``: DeepSpeed's CPU
    communication threads can abort an orderly interpreter exit."""
    try:
        torch.save(results(), out / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
