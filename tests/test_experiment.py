"""The stability benchmark (python -m gradstab experiment): data, model, runs, store, resume, CLI.

The tests check what the pipeline produces, never what the training outcomes are."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from gradstab import __main__ as cli
from gradstab.experiment import cli as experiment_cli
from gradstab.experiment import data, report, runner
from gradstab.experiment.model import GPT, GPTConfig
from tests.test_demo import ROOT
from tests.test_demo import run_cli as run_gradstab

QUICK = runner.QUICK["cpu"]
TINY_GPU = runner.QUICK["gpu"]

# ------------------------------------------------------------------------------------------------
# the text


def test_the_split_is_by_file_deterministic_and_about_a_tenth():
    paths = [f"pkg{i % 7}/module_{i}.py" for i in range(5000)]
    held = [p for p in paths if data.is_heldout(p)]
    assert held == [p for p in paths if data.is_heldout(p)]
    assert 0.08 < len(held) / len(paths) < 0.12
    assert data.is_heldout("a.py", fraction=1.0) and not data.is_heldout("a.py", fraction=0.0)


def fake_stdlib(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_corpus_reads_the_sources_split_by_file_and_digests_them(tmp_path):
    files = {f"m{i}.py": f"x_{i} = {i}\n".encode() * (i + 1) for i in range(60)}
    files["pkg/sub/deep.py"] = b"def f():\n    return 1\n"
    files["site-packages/third_party.py"] = b"NOT STDLIB"
    files["pkg/__pycache__/cached.py"] = b"NOT SOURCE"
    files["notes.txt"] = b"NOT PYTHON"
    corpus = data.load_corpus(str(fake_stdlib(tmp_path / "a", files)))
    sources = {k: v for k, v in files.items() if k.endswith(".py") and "NOT" not in v.decode()}
    held = [k for k in sorted(sources) if data.is_heldout(k)]
    assert 0 < corpus.heldout_files == len(held) < len(sources)
    assert corpus.train_files + corpus.heldout_files == len(sources)
    assert bytes(corpus.heldout.tolist()) == b"".join(sources[k] for k in held)
    assert b"NOT" not in bytes(corpus.train.tolist())
    assert corpus.describe()["sha256"] == corpus.digest and len(corpus.digest) == 64
    # same text elsewhere: same digest; one byte changed: another
    again = data.load_corpus(str(fake_stdlib(tmp_path / "b", files)))
    assert again.digest == corpus.digest
    files["m3.py"] += b"#"
    assert data.load_corpus(str(fake_stdlib(tmp_path / "c", files))).digest != corpus.digest


def test_a_library_without_sources_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.py file under"):
        data.load_corpus(str(tmp_path))


def test_the_real_corpus_records_what_it_is():
    corpus = data.load_corpus()
    assert corpus.train_files > 100 and corpus.heldout_files > 10
    assert corpus.python == ".".join(map(str, sys.version_info[:3]))
    assert corpus.train.dtype == torch.uint8


def test_unigram_loss_is_the_cross_entropy_of_the_byte_frequencies(tmp_path):
    text = bytes([65] * 255 + [66] * 255 + list(range(256)))  # 65, 66: 256 times; others once
    corpus = data.load_corpus(str(fake_stdlib(tmp_path, {f"{i}.py": text for i in range(40)})))
    counts = corpus.train_counts
    assert counts.tolist() == (torch.bincount(corpus.train.long(), minlength=256)).tolist()
    assert counts[65] == counts[66] == 256 * corpus.train_files
    # add-one: p(65) = p(66) = (256 f + 1) / (766 f + 256), every other byte (f + 1) / (...)
    f = corpus.train_files
    total = 766 * f + 256
    want = -math.log((256 * f + 1) / total)
    assert data.unigram_loss(counts, torch.tensor([65, 66])) == pytest.approx(want)
    assert data.unigram_loss(counts, torch.tensor([[0]])) == pytest.approx(
        -math.log((f + 1) / total)
    )


# ------------------------------------------------------------------------------------------------
# the model


def test_the_model_is_causal(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(context=12, n_layer=2, n_head=2, d_model=16))
    ids = torch.randint(256, (3, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(256, (3, 5))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (3, 12, 256)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_the_output_layer_is_the_token_embedding():
    model = GPT(GPTConfig(context=8, n_layer=1, n_head=1, d_model=8))
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    assert not any("q_norm" in n or "k_norm" in n for n in names)  # no QK-norm
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(context=8, n_layer=1, n_head=3, d_model=8)


def test_preset_sizes():
    # "~100k parameters" on the CPU, "tens of millions" with context 512 on a GPU
    assert 80_000 < GPT(runner.CPU.model).num_params() < 150_000
    assert runner.GPU.model.context == 512
    assert 10_000_000 < GPT(runner.GPU.model).num_params() < 100_000_000
    assert runner.CPU.lrs[0] == 1e-3 and runner.CPU.lrs[-1] == 10.0 and len(runner.CPU.lrs) == 9
    ratios = [b / a for a, b in zip(runner.CPU.lrs, runner.CPU.lrs[1:])]
    assert ratios == pytest.approx([10**0.5] * 8, rel=1e-3)
    assert runner.CPU.wds == (0.0, 0.1, 0.3, 1.0) and len(runner.CPU.seeds) == 3
    assert runner.GPU.precisions == ("fp16", "bf16")


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine():
    factor = runner.lr_factor(100, 0.1, 0.1)
    values = [factor(t) for t in range(100)]
    assert values[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert values[10] == pytest.approx(1.0) and values[99] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.55, abs=0.01)  # half-way down the cosine
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


# ------------------------------------------------------------------------------------------------
# one run


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus()


@pytest.fixture(autouse=True)
def one_thread():
    """As the benchmark trains: one thread (tiny matrices; a busy machine makes two crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_run(corpus, method, **kw):
    spec = runner.RunSpec(method, kw.pop("lr", 1e-2), kw.pop("wd", 0.1), kw.pop("seed", 0), 12)
    return runner.train_run(spec, dataclasses.replace(QUICK, eval_every=4), corpus, **kw)


def test_a_run_records_curves_metrics_and_provenance(corpus):
    record = quick_run(corpus, "zclip")
    assert len(record["train_loss"]) == len(record["grad_norm"]) == 12
    assert record["eval_steps"] == [0, 4, 8, 12]
    assert record["final_loss"] == record["eval_loss"][-1]
    assert record["best_loss"] == min(record["eval_loss"])
    assert record["diverged"] is False and record["stopped_at"] == 12
    assert record["corpus"]["sha256"] == corpus.digest
    assert record["corpus"]["python"] == corpus.python
    assert record["env"]["torch"] == torch.__version__
    assert record["unigram_loss"] < data.UNIFORM_LOSS
    json.dumps(record, allow_nan=False)


def test_runs_are_deterministic_and_paired_across_methods(corpus):
    first = {m: quick_run(corpus, m) for m in runner.METHODS}
    again = quick_run(corpus, "guard")
    assert again["train_loss"] == first["guard"]["train_loss"]
    assert again["eval_loss"] == first["guard"]["eval_loss"]
    # same initial weights and first batch: the same first loss and gradient for every method
    assert len({r["train_loss"][0] for r in first.values()}) == 1
    assert len({r["grad_norm"][0] for r in first.values()}) == 1
    assert len({r["eval_loss"][0] for r in first.values()}) == 1
    # and the methods do differ afterwards
    assert len({r["final_loss"] for r in first.values()}) > 2
    other_seed = quick_run(corpus, "none", seed=1)
    assert other_seed["train_loss"][0] != first["none"]["train_loss"][0]


def test_stabilized_adamw_is_the_stabilizer_before_adamw(corpus):
    fused = quick_run(corpus, "sadamw", lr=3e-2)
    composed = quick_run(corpus, "stab", lr=3e-2)
    clipped = quick_run(corpus, "clip", lr=3e-2)
    assert fused["train_loss"] == pytest.approx(composed["train_loss"], rel=1e-4)
    assert fused["train_loss"] != pytest.approx(clipped["train_loss"], rel=1e-4)


def test_weight_decay_reaches_the_matrices_only():
    model = GPT(GPTConfig(context=8, n_layer=1, n_head=1, d_model=8))
    decayed, other = runner.param_groups(model, 0.3)
    assert decayed["weight_decay"] == 0.3 and other["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in other["params"])
    assert len(decayed["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_a_nonfinite_loss_stops_the_run_and_counts_as_diverged(corpus, monkeypatch):
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] == 4 else loss  # eval, eval... the 3rd batch

    monkeypatch.setattr(runner.F, "cross_entropy", poisoned)
    record = quick_run(corpus, "none")
    assert record["stopped_at"] == len(record["train_loss"]) < 12
    assert record["train_loss"][-1] is None  # NaN is null in JSON
    assert record["diverged"] is True
    assert record["blow_up_step"] == record["stopped_at"] - 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", list(runner.METHODS))
def test_the_gpu_preset_path_runs_on_the_cpu(corpus, method, precision):
    """The GPU preset's code (autocast, GradScaler for fp16) for a few steps of a tiny model."""
    spec = runner.RunSpec(method, 1e-3, 0.1, 0, TINY_GPU.steps, precision)
    record = runner.train_run(spec, TINY_GPU, corpus, "cpu")
    assert record["precision"] == precision and len(record["train_loss"]) == TINY_GPU.steps
    assert all(x is not None for x in record["eval_loss"])
    assert record["env"]["device"].startswith("cpu")


def test_run_spec_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        runner.RunSpec("adam", 1e-3, 0.1, 0, 10)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        runner.RunSpec("none", 1e-3, 0.1, 0, 10, "fp8")


# ------------------------------------------------------------------------------------------------
# the protocol's learning rate for the weight-decay sweep


def fake(lr, final, *, diverged=False, blow_up=None, unigram=3.0):
    return {
        "lr": lr,
        "final_loss": final,
        "diverged": diverged,
        "blow_up_step": blow_up,
        "unigram_loss": unigram,
    }


def test_wd_sweep_lr_is_the_top_of_the_baselines_stable_learning_range():
    preset = dataclasses.replace(QUICK, lrs=(1e-3, 1e-2, 1e-1, 1.0))
    runs = [
        *(fake(1e-3, x) for x in (2.9, 2.8, 2.95)),
        *(fake(1e-2, x) for x in (2.5, 2.6, 2.4)),
        fake(1e-1, 2.3),
        fake(1e-1, 2.2),
        fake(1e-1, 2.1, blow_up=40),
        *(fake(1.0, x) for x in (2.0, 2.0, 2.0)),  # stable again above an unstable point
    ]
    assert runner.choose_wd_lr(preset, runs) == 1e-2
    # the smallest lr learns too little (median above unigram): no answer
    slow = [fake(1e-3, x) for x in (3.1, 3.2, 2.0)] + runs[3:]
    assert runner.choose_wd_lr(preset, slow) is None
    assert runner.choose_wd_lr(preset, [*runs[:6], fake(1e-1, None, diverged=True)]) == 1e-2
    assert runner.long_lrs(preset, 1e-2) == [1e-2, 1e-1]
    assert runner.long_lrs(preset, 1.0) == [1.0]


# ------------------------------------------------------------------------------------------------
# the store and the resume


def test_the_store_drops_a_half_written_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    lines = [json.dumps({"key": f"k{i}", "v": i}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n" + lines[0][:10])
    store = runner.RunStore(path)
    assert sorted(store.records) == ["k0", "k1", "k2"] and store.dropped == 1
    assert path.read_text() == "\n".join(lines) + "\n"
    store.add({"key": "k3", "v": 3})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == [
        "k0",
        "k1",
        "k2",
        "k3",
    ]


def test_the_store_skips_a_garbled_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"no key": 1}\n{"key": "b"}\n')
    store = runner.RunStore(path)
    assert sorted(store.records) == ["a", "b"] and store.dropped == 2


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    specs = runner.lr_sweep_specs(QUICK, methods=["none", "stab"], lrs=[1e-3, 1e-1])
    store = runner.RunStore(tmp_path / "runs.jsonl")
    lines: list[str] = []
    first = runner.Trainer(QUICK, store, log=lines.append).run(specs)
    assert len(first) == 4 and len(lines) == 4
    assert all(re.search(r"ETA \d+:\d\d:\d\d$", line) for line in lines)

    # interrupted: the last two runs never finished, the process died writing the second
    text = store.path.read_text().splitlines(keepends=True)
    store.path.write_text("".join(text[:2]) + text[2][: len(text[2]) // 2])
    trained = []
    real = runner._train_job

    def counting(spec, *args):
        trained.append(spec)
        return real(spec, *args)

    monkeypatch.setattr(runner, "_train_job", counting)
    resumed_store = runner.RunStore(store.path)
    lines.clear()
    again = runner.Trainer(QUICK, resumed_store, log=lines.append).run(specs)
    assert trained == specs[2:]
    assert lines[0].startswith(f"2 of 4 runs already in {store.path}; training the other 2")
    assert [r["key"] for r in again] == [r["key"] for r in first]
    for a, b in zip(again, first):
        assert a["train_loss"] == b["train_loss"]  # the retrained runs are the same runs
    assert len(store.path.read_text().splitlines()) == 4

    # a third time: nothing left to train
    trained.clear()
    runner.Trainer(QUICK, runner.RunStore(store.path), log=lines.append).run(specs)
    assert trained == []


def test_runs_of_another_setup_are_not_reused(tmp_path, corpus):
    spec = runner.RunSpec("none", 1e-3, 0.1, 0, 30)
    key = runner.run_key(spec, QUICK, "cpu", corpus.digest)
    assert runner.run_key(spec, QUICK, "cpu", "0" * 64) != key
    assert runner.run_key(spec, dataclasses.replace(QUICK, batch=9), "cpu", corpus.digest) != key
    assert runner.run_key(dataclasses.replace(spec, seed=1), QUICK, "cpu", corpus.digest) != key
    # the grids only choose which runs exist
    assert runner.run_key(spec, dataclasses.replace(QUICK, lrs=(5.0,)), "cpu", corpus.digest) == key


# ------------------------------------------------------------------------------------------------
# tables


def record(method, lr, seed, final, *, wd=0.1, diverged=False, blow_up=None, spikes=()):
    return {
        "method": method,
        "lr": lr,
        "wd": wd,
        "seed": seed,
        "steps": 10,
        "precision": "fp32",
        "final_loss": final,
        "diverged": diverged,
        "blow_up_step": blow_up,
        "loss_spikes": list(spikes),
        "grad_norm": [1.0, 2.0, 8.0],
        "unigram_loss": 3.0,
    }


def test_headline_table_from_hand_made_records():
    records = [
        record("none", 0.01, 0, 2.5),
        record("none", 0.01, 1, 2.7),
        record("none", 0.1, 0, 2.2, spikes=[40]),
        record("none", 0.1, 1, None, diverged=True, blow_up=50),
        record("clip", 0.01, 0, 2.4),
        record("clip", 0.01, 1, 2.7),
        record("clip", 0.1, 0, 2.0),
        record("clip", 0.1, 1, 2.1, spikes=[3, 9]),
    ]
    table = report.headline_table(records)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    # none: medians 2.6 (lr .01) and (2.2 + 5.545) / 2 at lr .1; stable only at .01
    assert rows["no protection"] == (
        "| no protection | 2.600 (0.01) | 0.01-0.01 (1) | 1/4 | 1/4 | 1 | "
        f"{(3.8725 - 2.6) / 2:.3f} | - |"
    )
    # clip: gaps -0.1, 0, -0.2, 2.1 - 5.545 -> median -0.15, 3 wins 1 tie
    assert rows["clip_grad_norm_(1.0)"] == (
        "| clip_grad_norm_(1.0) | 2.050 (0.1) | 0.01-0.1 (2) | 0/4 | 0/4 | 2 | 0.250 "
        "| -0.150, 3-1-0 |"
    )


def test_grid_tables_have_a_row_per_method_and_a_column_per_point():
    records = [
        record(m, lr, s, 2.0 + lr) for m in ("none", "stab") for lr in (0.1, 1.0) for s in (0, 1)
    ]
    records[-1] = record("stab", 1.0, 1, None, diverged=True)
    label = lambda x: f"lr {x:g}"  # noqa: E731
    final = report.by_grid_table(records, "lr", label)
    assert "| GradientStabilizer() | 2.10 (2.10-2.10) | 4.27 (3.00-5.55) |" in final
    unstable = report.instability_table(records, "lr", label)
    assert "| GradientStabilizer() | 0/2 | 1/2 (1d) |" in unstable
    gaps = report.paired_table(records, "lr", label)
    assert gaps.count("\n") == 2 and "no protection" not in gaps
    assert "| GradientStabilizer() | 4 | 4 |" in report.norm_table(records, "lr", label)


def test_weight_decay_spreads_of_the_medians_and_of_each_seed():
    finals = {(0.0, 0): 3.0, (1.0, 0): 2.5, (0.0, 1): 2.8, (1.0, 1): 2.7, (0.0, 2): 2.9}
    records = [record("none", 0.3, s, x, wd=wd) for (wd, s), x in finals.items()]
    records.append(record("none", 0.3, 2, None, wd=1.0, diverged=True))
    table = report.wd_spread_table(records)
    # medians: wd 0 -> 2.9, wd 1 -> 2.7 (2.5, 2.7, 5.545); per seed: 0.5, 0.1, 5.545 - 2.9
    assert "| spread of each seed (seed 0, seed 1, seed 2) |" in table
    per_seed = [0.5, 0.1, data.UNIFORM_LOSS - 2.9]
    row = ", ".join(f"{x:.3f}" for x in per_seed)
    assert f"| no protection | 0.200 | {row} | {sum(per_seed) / 3:.3f} |" in table


def test_the_twin_table_measures_how_far_rounding_moves_a_run():
    records = [
        record("stab", 0.1, 0, 2.00),
        record("stab", 0.1, 1, 2.10),
        record("sadamw", 0.1, 0, 2.03),
        record("sadamw", 0.1, 1, 2.05),
        record("stab", 1.0, 0, 3.0),
        record("sadamw", 1.0, 0, 3.0),
    ]
    table = report.twin_table(records, "lr", lambda x: f"lr {x:g}")
    assert table.splitlines()[-1] == "| max over seeds | 0.050 | 0.000 |"


# ------------------------------------------------------------------------------------------------
# the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_gradstab("experiment", *args)


def test_quick_runs_the_whole_pipeline(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    proc = run_cli("all", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    lines = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    chosen = float(re.search(r"^learning rate ([0-9.e+-]+)", text, re.M).group(1))
    want = {
        runner.run_key(s, QUICK, "cpu", data.load_corpus().digest)
        for s in (
            *runner.lr_sweep_specs(QUICK),
            *runner.wd_sweep_specs(QUICK, chosen),
            *runner.long_specs(QUICK, runner.long_lrs(QUICK, chosen)),
        )
    }
    assert {r["key"] for r in lines} == want and len(lines) == len(want)
    progress = re.findall(r"^\[\s*\d+/\d+\] .* ETA \d+:\d\d:\d\d$", text, re.M)
    assert len(progress) == len(want)
    for name in ("lr-sweep", "wd-sweep", "long", "summary"):
        table = (out / f"{name}.md").read_text()
        assert table.startswith("<!-- written by: python -m gradstab experiment all --quick")
        for label in runner.METHODS.values():
            assert f"| {label} |" in table
    headline = (out / "summary.md").read_text()
    assert "| stable lr range (points) |" in headline and "| wd sensitivity |" in headline
    for name in ("lr-sweep", "lr-sweep-traces", "wd-sweep", "long"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # run again: everything is found, nothing trained
    again = run_cli("all", "--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert not re.search(r"^\[\s*\d+/\d+\]", again.stdout, re.M)
    assert "runs already in" in again.stdout
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(want)


def test_a_slice_of_the_grid(tmp_path):
    proc = run_cli("lr-sweep", "--quick", "--lr", "0.001", "--workers", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in records} == {0.001} and len(records) == len(runner.METHODS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "invalid choice: 'nope'"),
        (["lr-sweep", "--workers", "0"], "--workers must be >= 1"),
        (["lr-sweep", "--lr", "-1"], "--lr must be > 0"),
        (["lr-sweep", "--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiment_cli.parse(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_gpu_preset_without_a_gpu_says_how_to_run_it(capsys):
    with pytest.raises(SystemExit):
        experiment_cli.parse(["lr-sweep", "--preset", "gpu"])
    assert "--device cpu runs the preset on the CPU" in capsys.readouterr().err


def test_the_wheel_carries_the_experiment(tmp_path):
    """``python -m gradstab experiment`` must work from a plain install, not only a checkout."""
    env = {**os.environ, "GRADSTAB_NO_EXTENSION": "1"}
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation"]
    command += ["--no-deps", "-w", str(tmp_path), str(ROOT)]
    subprocess.run(command, check=True, env=env, cwd=tmp_path)
    (wheel,) = tmp_path.glob("gradstab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"gradstab/experiment/{p.name}" for p in (ROOT / "gradstab/experiment").glob("*.py")}
    assert "gradstab/experiment/__init__.py" in modules and modules <= names


def test_the_main_command_lists_and_dispatches_experiment(monkeypatch, capsys):
    import gradstab.experiment

    assert cli.main(["--help"]) == 0
    assert "experiment NAME" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(gradstab.experiment, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["experiment", "lr-sweep", "--quick"]) == 7
    assert seen == [["lr-sweep", "--quick"]]
