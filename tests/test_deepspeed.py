"""GradientStabilizer on a DeepSpeed engine: ZeRO stages 0-3 on two CPU ranks.

tests/deepspeed_worker.py runs every scenario once, on 2 ranks in one process group
(DS_ACCELERATOR=cpu, gloo); each test compares what the ranks saw with one process training on the
whole batch (tests/distributed_worker.py ``train_single``), with the float64 reference on the
whole gradients (gathered with DeepSpeed's public ``safe_get_full_grad``), or with the other rank.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Not imported here: the workers import DeepSpeed in their own processes.
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip(
        "deepspeed is not installed (pip install 'gradstab[deepspeed]'; make test installs it)",
        allow_module_level=True,
    )

from tests import distributed_worker as dw
from tests.conftest import RTOL
from tests.helpers import assert_grads_close, free_port, run_ranks
from tests.reference import ReferenceStabilizer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TRAIN_RTOL = 1e-5  # relative to the largest entry of each tensor
STAGES = (0, 1, 2, 3)
TRAIN_RUNS = [f"train/{s}/{d}" for s in STAGES for d in ("fp32", "bf16")]
EXACT_RUNS = [
    *(f"train/{s}/fp32" for s in STAGES),
    "train/3p/fp32",
    "train/2o/fp32",
    "accum/0",
    "accum/2",
    "accum/3",
]
FP16_RUNS = ["fp16/0", "fp16/2", "fp16/3"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARDED = {"2a": True, "2o": True, "0": False, "1": True, "2": True, "3": True, "3p": True}


def launch(script: Path, out: Path, world: int = WORLD, timeout: int = 400) -> list[dict]:
    """Runs ``script --out OUT`` on ``world`` CPU ranks; returns what each rank saved.

    DeepSpeed compiles its shared-memory communication op on first use (about 25 s here); it is
    cached in ``build/torch-extensions`` unless TORCH_EXTENSIONS_DIR says otherwise.
    """
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": _extensions_dir()}
    return run_ranks([str(script)], out, world, env, timeout, script.name)


def _extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch-extensions"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch(ROOT / "tests" / "deepspeed_worker.py", tmp_path_factory.mktemp("deepspeed"))


@pytest.fixture(scope="module")
def single() -> dict[str, dict]:
    return {g: dw.train_single(g) for g in ("param", "global")}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{msg}: {m}"
    )


def _check_transform(run: dict, granularity: str, msg: str) -> None:
    """Every step's whole gradients after apply() against the float64 reference applied to the
    whole gradients before it (unscaled by DeepSpeed's loss scale), and apply()'s figures."""
    steps = run["steps"]
    ref = ReferenceStabilizer(len(steps[0]["before"]), granularity=granularity)
    for i, step in enumerate(steps):
        scale = step["loss_scale"]
        before = [g.double() / scale for g in step["before"]]
        expected, norms = ref.step(before, found_inf=step["ds_skipped"])
        if step["ds_skipped"]:
            assert step["stats"]["skipped"] == len(before), f"{msg} step {i}"
            continue
        dtype = DTYPES[run["dtype"]]  # DeepSpeed reduces 16-bit gradients for 16-bit models
        after = [g.double() / scale for g in step["after"]]
        assert_grads_close(after, expected, dtype, f"{msg} step {i}")
        before_norm = math.sqrt(sum(n * n for n in norms if math.isfinite(n)))
        if all(math.isfinite(n) for n in norms):
            assert step["stats"]["norm_before"] == pytest.approx(before_norm, rel=1e-5), msg
        assert step["stats"]["norm_after"] == pytest.approx(
            math.sqrt(sum(float((e * e).sum()) for e in expected)), rel=max(RTOL[dtype], 1e-5)
        ), f"{msg} step {i}"


@pytest.mark.parametrize("key", EXACT_RUNS)
def test_fp32_training_equals_single_process(ranks, single, key):
    """ZeRO 0-3 (and ZeRO-3 with persistent parameters, and 2 micro-batches of gradient
    accumulation), fp32, 8 AdamW steps with a 1e4 spike and a NaN: the weights on both ranks equal
    one process on the whole batch with GradientStabilizer + torch.optim.AdamW (1e-5 relative),
    and so does the stabilizer's state."""
    expected = single["param"]
    for rank, r in enumerate(ranks):
        run = r[key]
        msg = f"{key} rank {rank} ({run['optimizer']})"
        assert run["weights"].keys() == expected["weights"].keys(), msg
        for name, w in expected["weights"].items():
            _assert_close(run["weights"][name], w, TRAIN_RTOL, f"{msg}, {name}")
        assert run["state"]["keys"] == expected["state"]["keys"], msg
        assert torch.equal(run["state"]["k"], expected["state"]["k"]), msg
        for name in ("m", "v"):
            _assert_close(run["state"][name], expected["state"][name], TRAIN_RTOL, msg)
    # the NaN step left only the poisoned parameter's statistics alone
    k = dict(zip(expected["state"]["keys"], expected["state"]["k"].tolist()))
    assert k[dw.NAN_PARAM] == dw.STEPS - 1


@pytest.mark.parametrize(
    "key", [*TRAIN_RUNS, "accum/2", "accum/3", "train/3p/fp32", "train/2a/bf16"]
)
def test_stabilized_gradients_match_reference(ranks, key):
    """The whole averaged gradients after apply() equal the float64 reference on the whole
    gradients before it, every step, with the tolerance of the gradients' dtype (bf16 runs
    included, whose training cannot equal an fp32 process)."""
    for rank, r in enumerate(ranks):
        _check_transform(r[key], "param", f"{key} rank {rank}")


def test_global_granularity(ranks, single):
    for rank, r in enumerate(ranks):
        run = r["global/2"]
        _check_transform(run, "global", f"global/2 rank {rank}")
        for name, w in single["global"]["weights"].items():
            _assert_close(run["weights"][name], w, TRAIN_RTOL, f"global/2 rank {rank}, {name}")


@pytest.mark.parametrize("key", FP16_RUNS)
def test_fp16_skipped_steps_leave_statistics_untouched(ranks, key):
    """fp16 with DeepSpeed's dynamic loss scaler (initial scale 2^10): the step with an Inf and
    the spike step (whose scaled loss overflows fp16 under ZeRO 1-3) are skipped by DeepSpeed; on
    exactly those steps apply() changes no statistic (k counts the other steps) and reports every
    gradient skipped; on the others the unscaled gradients match the reference."""
    for rank, r in enumerate(ranks):
        run = r[key]
        skipped = [s["ds_skipped"] for s in run["steps"]]
        assert skipped[r["inf_step"]], f"{key}: DeepSpeed did not skip the Inf step"
        assert run["state"]["k"].tolist() == [dw.STEPS - sum(skipped)] * len(run["state"]["k"])
        _check_transform(run, "param", f"{key} rank {rank}")


def test_state_identical_on_both_ranks(ranks):
    keys = [k for k in ranks[0] if isinstance(ranks[0][k], dict) and "state" in ranks[0][k]]
    assert len(keys) >= len(TRAIN_RUNS) + len(FP16_RUNS)
    for key in keys:
        for name in ("m", "v", "k"):
            assert torch.equal(ranks[0][key]["state"][name], ranks[1][key]["state"][name]), key


def test_one_all_reduce_per_optimizer_step(ranks):
    """What apply() adds: nothing under ZeRO 0 (every rank holds the whole averaged gradients),
    one all-reduce over the 2 ranks under ZeRO 1-3 (not one per parameter), and nothing at a
    micro-step that is not an accumulation boundary."""
    for r in ranks:
        runs = [*TRAIN_RUNS, *FP16_RUNS, "train/3p/fp32", "train/2a/bf16", "train/2o/fp32"]
        for key in [*runs, "global/2"]:
            stage = key.split("/")[1]
            want = [[WORLD]] if SHARDED[stage] else [[]]
            assert [s["calls"] for s in r[key]["steps"]] == [want] * dw.STEPS, key
        for key in ("accum/0", "accum/2", "accum/3"):
            want = [[], [WORLD] if SHARDED[key.split("/")[1]] else []]
            assert [s["calls"] for s in r[key]["steps"]] == [want] * dw.STEPS, key


def test_each_stage_used_its_own_layout(ranks):
    """The runs really went through DeepSpeed's stage-specific optimizers."""
    want = {
        "train/0/fp32": "AdamW",
        "train/0/bf16": "FP16_UnfusedOptimizer",
        "train/1/fp32": "DeepSpeedZeroOptimizer",
        "train/2/bf16": "DeepSpeedZeroOptimizer",
        "train/3/fp32": "DeepSpeedZeroOptimizer_Stage3",
        "train/3/bf16": "DeepSpeedZeroOptimizer_Stage3",
        "fp16/0": "FP16_UnfusedOptimizer",  # (FP16_Optimizer is for DeepSpeed's FusedAdam)
    }
    for key, name in want.items():
        assert ranks[0][key]["optimizer"] == name, key
    for key in ("train/1/fp32", "train/2/fp32", "train/3/fp32"):
        assert ranks[0][key]["layout"]["sharded"], key
        # each rank held a strict part of the elements, and together all of them
        held = [r[key]["layout"]["numel"] for r in ranks]
        assert sum(held) == sum(w.numel() for w in ranks[0][key]["weights"].values()), key
        assert all(0 < n < sum(held) for n in held), key


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_resume_is_bit_exact(ranks, stage):
    """4 steps, engine.save_checkpoint with the stabilizer in client_state, a fresh engine and
    stabilizer, load_checkpoint, 4 more steps: the weights and state equal the uninterrupted run
    bit for bit, on both ranks."""
    for rank, r in enumerate(ranks):
        resumed, straight = r[f"resume/{stage}"], r[f"train/{stage}/fp32"]
        for name, w in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], w), f"rank {rank}: {name}"
        for name in ("m", "v", "k"):
            assert torch.equal(resumed["state"][name], straight["state"][name]), f"rank {rank}"
        assert resumed["state"]["keys"] == straight["state"]["keys"]


def test_gradient_clipping_warns_once(ranks):
    for r in ranks:
        warned = r["errors"]["clipping_warnings"]
        assert len(warned) == 1 and "gradient_clipping=1.0" in warned[0], warned


def test_apply_outside_backward_and_step_is_refused(ranks):
    for r in ranks:
        assert "after engine.backward(loss) and before engine.step()" in r["errors"]["after_step"]
        assert "no scaler" in r["errors"]["scaler"]


def test_bf16_optimizer_is_refused(ranks):
    """ZeRO-1 with bf16 parameters and float32 gradient accumulation runs DeepSpeed's
    BF16_Optimizer, whose layout gradstab does not read: a clear error, not wrong norms."""
    for r in ranks:
        error = r["errors"]["bf16_optimizer"]
        assert error is not None and error.startswith("BF16_Optimizer:"), error
        assert "not supported" in error, error


def test_nonfinite_raise_raises_on_every_rank(ranks):
    """A NaN in an element only rank 1 holds under ZeRO-2, nonfinite='raise': both ranks raise,
    naming the parameter, and neither the gradients nor the state change."""
    for rank, r in enumerate(ranks):
        e = r["errors"]
        assert e["raise"] is not None and repr(dw.NAN_PARAM) in e["raise"], f"rank {rank}"
        for name in ("m", "v", "k"):
            assert torch.equal(e["raise_state_before"][name], e["raise_state_after"][name])
        for before, after in zip(e["raise_grads_before"], e["raise_grads_after"]):
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# HuggingFace Trainer + DeepSpeed (tests/deepspeed_hf_worker.py)


@pytest.fixture(scope="module")
def hf_ranks(tmp_path_factory) -> list[dict]:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install 'gradstab[hf]')")
    return launch(ROOT / "tests" / "deepspeed_hf_worker.py", tmp_path_factory.mktemp("ds_hf"))


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_with_deepspeed_equals_single_process(hf_ranks, stage):
    """transformers.Trainer with a ZeRO-2/ZeRO-3 DeepSpeed config and GradientStabilizerCallback,
    6 steps with a 1e4 loss spike, every step over the whole data set (16 samples per rank): the
    weights equal one process with GradientStabilizer + AdamW on all 32 samples (1e-5 relative),
    every parameter's statistics counted 6 steps, identical on both ranks, and the figures are
    in the Trainer's logs."""
    from tests import deepspeed_hf_worker as hw

    single = hw.train_single()
    for rank, r in enumerate(hf_ranks):
        run = r[f"zero{stage}"]["straight"]
        msg = f"zero{stage} rank {rank} ({run['optimizer']})"
        for name, w in single["weights"].items():
            _assert_close(run["weights"][name], w, TRAIN_RTOL, f"{msg}, {name}")
        assert run["state"]["keys"] == single["state"]["keys"], msg
        assert run["state"]["k"].tolist() == [hw.STEPS] * len(single["state"]["keys"]), msg
        for name in ("m", "v", "k"):
            first = hf_ranks[0][f"zero{stage}"]["straight"]["state"][name]
            assert torch.equal(run["state"][name], first), msg
        assert [len(batch) for batch in run["seen"]] == [hw.SAMPLES // WORLD] * hw.STEPS, msg
        logs = run["logs"]
        assert len(logs) == hw.STEPS and all("gradstab/grad_norm_before" in e for e in logs), logs
        spike = logs[hw.SPIKE_STEP]
        assert spike["gradstab/grad_norm_before"] > 1e3 * spike["gradstab/grad_norm_after"], spike
        assert run["hook_removed"], msg
    steps = zip(*(r[f"zero{stage}"]["straight"]["seen"] for r in hf_ranks))
    for step, batches in enumerate(steps):
        assert len(set(batches[0]) | set(batches[1])) == hw.SAMPLES, f"step {step}"


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_steps_deepspeed_before_on_pre_optimizer_step(hf_ranks, stage):
    """Why the callback hooks DeepSpeed's optimizer: when the Trainer calls
    on_pre_optimizer_step, accelerate has already run engine.step() (AdamW has taken this step)
    and DeepSpeed holds no gradients any more."""
    for r in hf_ranks:
        for record in r[f"zero{stage}"]["straight"]["at_pre_optimizer_step"]:
            assert record["adamw_steps"] == record["global_step"] + 1, record
            assert not record["gradients"], record


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_with_deepspeed_resume_is_bit_exact(hf_ranks, stage):
    """3 steps, the Trainer's checkpoint (DeepSpeed's and trainer_state.json with the
    callback's statistics), a fresh Trainer resuming to step 6: weights and statistics equal the
    uninterrupted run bit for bit."""
    for rank, r in enumerate(hf_ranks):
        straight, resumed = r[f"zero{stage}"]["straight"], r[f"zero{stage}"]["resumed"]
        for name, w in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], w), f"rank {rank}: {name}"
        for name in ("m", "v", "k"):
            assert torch.equal(resumed["state"][name], straight["state"][name]), f"rank {rank}"


def test_pre_step_hook_wraps_once_and_restores():
    """The hook the Trainer integration puts on DeepSpeed's optimizer: runs before each step,
    refuses a second installation, and remove() restores what was there (the class's step, or
    an instance attribute such as torch's LR schedulers leave)."""
    from gradstab.integrations.deepspeed import PreStepHook

    p = torch.nn.Parameter(torch.ones(3))
    for wrapped_before in (False, True):
        opt = torch.optim.SGD([p], lr=0.1)
        if wrapped_before:
            original = opt.step
            opt.step = lambda *a, original=original, **k: original(*a, **k)
        previous = vars(opt).get("step")
        calls = []
        hook = PreStepHook(opt, lambda calls=calls: calls.append(float(p.grad.sum())))
        p.grad = torch.ones(3)
        opt.step()
        assert calls == [3.0]
        with pytest.raises(RuntimeError, match="already stabilizes"):
            PreStepHook(opt, lambda: None)
        hook.remove()
        hook.remove()
        assert vars(opt).get("step") is previous
        opt.step()
        assert calls == [3.0]


def test_deepspeed_trainer_example(tmp_path):
    """examples/deepspeed_trainer.py starts itself on 2 CPU ranks, trains with ZeRO-3 and the
    callback, and its resumed run ends with the same weights."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install 'gradstab[hf]')")
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": _extensions_dir(),
        "MASTER_PORT": str(free_port()),
    }
    env.pop("RANK", None)
    args = ["--zero", "3", "--steps", "4", "--output-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "deepspeed_trainer.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "ZeRO-3 on 2 ranks" in out.stdout, out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("step ")]) == 4
    assert "resumed from checkpoint-2: final weights identical" in out.stdout, out.stdout
