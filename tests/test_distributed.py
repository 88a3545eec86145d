"""GradientStabilizer under torch.distributed: DDP, FSDP2, HSDP and DTensor gradients.

Two processes on the CPU with gloo run tests/distributed_worker.py once for the whole module
(start-up dominates the cost); each test then compares what the ranks saw with one process
training on the whole batch, with the float64 reference, or with the other rank.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch

from tests import distributed_worker as worker
from tests.conftest import RTOL
from tests.helpers import assert_grads_close, run_ranks
from tests.reference import ReferenceStabilizer

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD = 2
TRAIN_RTOL = 1e-5  # relative to the largest entry of each tensor
TRAINING = [(mode, g) for mode in ("ddp", "fsdp2", "hsdp") for g in ("param", "global")]
DTENSOR_RUNS = [
    f"dtensor/{dtype}/{config}"
    for dtype in ("float32", "float64", "float16", "bfloat16")
    for config in ("param/zero", "global/skip")
]


def _launch(world: int, out: Path) -> list[dict]:
    """Runs the worker on ``world`` ranks; returns what each rank saved (and the seed used)."""
    seed = int(os.environ.get("GRADSTAB_TEST_SEED", random.SystemRandom().randrange(2**31)))
    script = str(Path(worker.__file__))
    what = f"the distributed worker (GRADSTAB_TEST_SEED={seed})"
    results = run_ranks([script, "--seed", str(seed)], out, world, {}, 240, what)
    for r in results:
        r["seed"] = seed
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario of the worker, on 2 ranks."""
    return _launch(WORLD, tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def ranks_2x2(tmp_path_factory) -> list[dict]:
    """The DTensor scenarios on a (2, 2) mesh of 4 ranks."""
    return _launch(4, tmp_path_factory.mktemp("distributed_2x2"))


@pytest.fixture(scope="module")
def single() -> dict[str, dict]:
    """One process training on the whole batch, per granularity."""
    return {g: worker.train_single(g) for g in ("param", "global")}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str) -> None:
    scale = expected[torch.isfinite(expected)].abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{msg}: {m}"
    )


def _assert_state_close(actual: dict, expected: dict, rtol: float, msg: str) -> None:
    assert [str(k).removeprefix("module.") for k in actual["keys"]] == expected["keys"], msg
    assert torch.equal(actual["k"], expected["k"]), f"{msg}: k {actual['k']} != {expected['k']}"
    for name in ("m", "v"):
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=0.0, msg=msg)


@pytest.mark.parametrize(("mode", "granularity"), TRAINING)
def test_training_equals_single_process(ranks, single, mode, granularity):
    """DDP, FSDP2 (1-D mesh, uneven and empty shards) and HSDP (replicated over 2 ranks) with
    AdamW, a 1e4 spike and a NaN on one rank's shard: every rank's weights and stabilizer state
    after 8 steps equal those of one process on the whole batch (1e-5 relative)."""
    expected = single[granularity]
    for rank, r in enumerate(ranks):
        run = r[f"train/{mode}/{granularity}"]
        msg = f"{mode}/{granularity} rank {rank} (GRADSTAB_TEST_SEED={r['seed']})"
        assert run["weights"].keys() == expected["weights"].keys()
        for name, w in expected["weights"].items():
            _assert_close(run["weights"][name], w, TRAIN_RTOL, f"{msg}, {name}")
        _assert_state_close(run["state"], expected["state"], TRAIN_RTOL, msg)
    if granularity == "param":
        # the NaN step left the poisoned parameter's statistics alone, and only them
        k = dict(zip(expected["state"]["keys"], expected["state"]["k"].tolist()))
        assert k[worker.NAN_PARAM] == worker.STEPS - 1
        assert all(v == worker.STEPS for key, v in k.items() if key != worker.NAN_PARAM)


def test_sharded_runs_really_shard(ranks):
    """The FSDP2 and HSDP runs did see DTensor gradients with the intended placements."""
    for r in ranks:
        assert r["train/fsdp2/param"]["placements"]["0.weight"] == "(Shard(dim=0),)"
        assert r["train/hsdp/param"]["placements"]["0.weight"] == "(Replicate(), Shard(dim=0))"
        assert r["train/ddp/param"]["placements"]["0.weight"] == "None"


def _states(r: dict) -> dict[str, dict]:
    keys = [f"train/{mode}/{g}" for mode, g in TRAINING] + ["resume", *DTENSOR_RUNS]
    return {key: r[key]["state"] for key in keys}


def test_state_identical_on_every_rank(ranks):
    """The replicated statistics stay bit-identical across ranks in every scenario."""
    first, second = (_states(r) for r in ranks)
    for key, state in first.items():
        other = second[key]
        assert state["keys"] == other["keys"], key
        for name in ("m", "v", "k"):
            assert torch.equal(state[name], other[name]), f"{key}: {name} differs between ranks"


def test_all_reduces_per_step(ranks):
    """What gradstab's apply() adds to a step: nothing under DDP, nothing under HSDP whose shard
    group is one rank, one all-reduce over the 2 ranks under FSDP2 (not one per tensor), and
    one per distinct shard group for DTensors spread over two meshes."""
    for r in ranks:
        for granularity in ("param", "global"):
            assert r[f"train/ddp/{granularity}"]["all_reduce_calls"] == [[]] * worker.STEPS
            assert r[f"train/hsdp/{granularity}"]["all_reduce_calls"] == [[]] * worker.STEPS
            fsdp = r[f"train/fsdp2/{granularity}"]["all_reduce_calls"]
            assert fsdp == [[WORLD]] * worker.STEPS
        for key in DTENSOR_RUNS:
            run = r[key]
            # the 1-D mesh, and dimension 0 of the 2-D mesh (unless torch shares their group)
            assert run["shard_groups"] >= 1
            for step in run["steps"]:
                assert step["all_reduce_calls"] == [WORLD] * run["shard_groups"]


def test_fsdp2_resume_from_rank0_checkpoint(ranks, single):
    """FSDP2 stopped after 4 steps, checkpointed (torch.distributed.checkpoint for the model and
    AdamW, torch.save of the stabilizer from rank 0 only), rebuilt, loaded on both ranks and
    finished: bit-identical to the uninterrupted FSDP2 run, and equal to one process."""
    for rank, r in enumerate(ranks):
        resumed, straight = r["resume"], r["train/fsdp2/param"]
        for name, w in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], w), f"rank {rank}: {name}"
            _assert_close(
                resumed["weights"][name],
                single["param"]["weights"][name],
                TRAIN_RTOL,
                f"rank {rank}: {name}",
            )
        for name in ("m", "v", "k"):
            assert torch.equal(resumed["state"][name], straight["state"][name]), f"rank {rank}"
        assert resumed["state"]["keys"] == straight["state"]["keys"]


def _check_against_reference(ranks: list[dict], run: str) -> None:
    """Whole stabilized gradients, state and stats of every rank against the float64 reference,
    with the found_inf of one rank skipping the step on all of them."""
    _, dtype_name, granularity, nonfinite = run.split("/")
    dtype = getattr(torch, dtype_name)
    rtol = RTOL[dtype]
    stats_rtol = max(rtol, 1e-5)  # the stats are float32
    for rank, r in enumerate(ranks):
        result = r[run]
        steps = result["steps"]
        count = len(steps[0]["input"])
        ref = ReferenceStabilizer(count, granularity=granularity, nonfinite=nonfinite)
        for i, step in enumerate(steps):
            msg = f"{run} rank {rank} step {i} {step['faults']} (GRADSTAB_TEST_SEED={r['seed']})"
            expected, norms = ref.step(step["input"], found_inf=i == worker.FOUND_INF_STEP)
            assert_grads_close(step["output"], expected, dtype, msg)
            before = math.sqrt(sum(n * n for n in norms))
            after = math.sqrt(sum(float((e * e).sum()) for e in expected))
            for name, value in (("norm_before", before), ("norm_after", after)):
                torch.testing.assert_close(
                    torch.tensor(step["stats"][name], dtype=torch.float64),
                    torch.tensor(value, dtype=torch.float64),
                    rtol=stats_rtol,
                    atol=0.0,
                    equal_nan=True,
                    msg=lambda m, name=name, msg=msg: f"{msg}, {name}: {m}",
                )
        state = result["state"]
        for name in ("m", "v", "k"):
            want = torch.tensor([getattr(s, name) for s in ref.states], dtype=state[name].dtype)
            torch.testing.assert_close(state[name], want, rtol=rtol, atol=0.0, msg=f"{run} {name}")
        assert steps[worker.FOUND_INF_STEP]["stats"]["skipped"] == count


@pytest.mark.parametrize("run", DTENSOR_RUNS)
def test_dtensor_grads_match_reference(ranks, run):
    """DTensor gradients (Shard(0), Shard(1), Replicate on a 1-D mesh; (Replicate, Shard),
    (Shard, Replicate), (Shard, Shard) on a (2, 1) mesh; plain tensors among them) of odd shapes
    with NaN/Inf/zero/spike faults, 6 steps, one of which only rank 1 flags with found_inf: the
    whole stabilized gradients, the state and the stats equal the float64 reference on the whole
    tensors (tolerance RTOL of the dtype)."""
    _check_against_reference(ranks, run)


@pytest.mark.parametrize("run", ["dtensor/float32/param/zero", "dtensor/float32/global/skip"])
def test_dtensor_on_2x2_mesh(ranks_2x2, run):
    """4 ranks, a (dp, tp) = (2, 2) mesh as FSDP2 + tensor parallelism makes: tensors sharded on
    both dimensions (summed over both groups in turn), on one, or on none, and plain tensors.
    Against the float64 reference as above; exactly one all-reduce per group (2 per step); the
    state is bit-identical on the 4 ranks."""
    _check_against_reference(ranks_2x2, run)
    for r in ranks_2x2:
        assert r[run]["shard_groups"] == 2
        for step in r[run]["steps"]:
            assert step["all_reduce_calls"] == [2, 2]
        for name in ("m", "v", "k"):
            assert torch.equal(r[run]["state"][name], ranks_2x2[0][run]["state"][name])


def test_nonfinite_raise_raises_on_every_rank(ranks):
    """A NaN in rank 1's shard only, nonfinite='raise': both ranks raise (none is left waiting in
    a collective), naming the whole parameter, and neither gradients nor state change."""
    for rank, r in enumerate(ranks):
        result = r["raise"]
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert repr(worker.NAN_PARAM) in result["error"]
        for name in ("m", "v", "k"):
            assert torch.equal(result["state_before"][name], result["state_after"][name])
        for name, g in result["grads_before"].items():
            assert torch.equal(g.isnan(), result["grads_after"][name].isnan()), name
            torch.testing.assert_close(
                result["grads_after"][name], g, rtol=0, atol=0, equal_nan=True
            )


def test_partial_placement_is_refused(ranks):
    for r in ranks:
        error = r["partial"]["error"]
        assert error is not None and "'weight'" in error and "Partial" in error
        assert r["partial"]["grad_untouched"]


def test_compiled_backend_refuses_dtensor(ranks):
    for r in ranks:
        assert r["compiled"] is not None and "DTensor" in r["compiled"]


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(ranks):
    """FullyShardedDataParallel (flat parameters, with and without use_orig_params), passed as a
    module or through its optimizer: a TypeError naming the parameter and FSDP2."""
    for r in ranks:
        assert len(r["fsdp1"]) == 4
        for (use_orig_params, target), error in r["fsdp1"].items():
            where = f"use_orig_params={use_orig_params}, {target}"
            assert error is not None, f"FSDP1 was not refused ({where})"
            assert "FSDP1" in error and "fully_shard" in error, where
            expected_label = "param_groups[0]" if target == "optimizer" else "_fsdp_wrapped_module"
            assert expected_label in error, where
