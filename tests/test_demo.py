"""The demo (python -m gradstab demo), its metrics, and the command line."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from gradstab import __main__ as cli
from gradstab import demo

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# metrics on synthetic eval curves whose answers are known by construction


def decreasing_curve(gen: torch.Generator, length: int) -> list[float]:
    """A strictly decreasing loss curve from about 4.6, with random step sizes."""
    drops = torch.rand(length - 1, generator=gen, dtype=torch.float64) * 0.05 + 1e-3
    return [4.6, *(4.6 - drops.cumsum(0)).tolist()]


def test_jump_and_recovery_of_a_known_bump(seed):
    """A bump of known height `d` steps after the spike: jump and recovery follow exactly."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        length = int(torch.randint(20, 200, (), generator=gen))
        curve = decreasing_curve(gen, length)
        step = int(torch.randint(0, length - 3, (), generator=gen))
        end = int(torch.randint(step + 2, length, (), generator=gen))
        d = int(torch.randint(1, end - step, (), generator=gen))
        height = float(torch.rand((), generator=gen)) * 3 + 0.01
        peak = curve[step] + height
        curve[step + d] = peak
        assert demo.spike_jump(curve, step, end) == pytest.approx(height, rel=1e-12)
        assert demo.recovery_steps(curve, step, end) == d + 1


def test_loss_that_first_dips_then_rises_counts_the_rise():
    # The bad update follows that batch's own gradient: the loss dips, then overshoots.
    curve = [4.0, 3.0, 2.9, 3.6, 3.2, 2.95, 2.8]
    assert demo.spike_jump(curve, 1, 6) == pytest.approx(0.6)
    assert demo.recovery_steps(curve, 1, 6) == 4  # above at steps 3 and 4, back at step 5


def test_no_rise_means_no_jump_and_zero_recovery(seed):
    curve = decreasing_curve(torch.Generator().manual_seed(seed), 50)
    assert demo.spike_jump(curve, 10, 49) == 0.0
    assert demo.recovery_steps(curve, 10, 49) == 0


def test_still_above_at_the_end_of_the_window_is_not_recovered():
    curve = [4.0, 3.0, 3.5, 2.5, 3.1]
    assert demo.recovery_steps(curve, 1, 4) is None
    assert demo.recovery_steps(curve, 1, 3) == 2  # the window ends before the second rise


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_is_an_infinite_jump_and_no_recovery(bad):
    curve = [4.0, 3.0, bad, 2.0]
    assert demo.spike_jump(curve, 1, 3) == math.inf
    assert demo.recovery_steps(curve, 1, 3) == 2  # NaN/Inf is "above"; 2.0 is back
    assert demo.recovery_steps([4.0, 3.0, 2.0, bad], 1, 3) is None
    assert demo.recovery_steps([4.0, bad, 2.0], 1, 2) is None
    assert demo.diverged(curve)


def test_diverged():
    assert not demo.diverged([4.6, 3.0, 2.5])
    assert demo.diverged([4.6, 3.0, 4.6])  # not below the start
    assert demo.diverged([4.6, 3.0, 38.0])
    assert demo.diverged([4.6, math.nan])
    assert demo.diverged([4.6, math.inf, 2.0])


def test_summary_takes_the_worst_spike_and_windows_up_to_the_next_spike():
    #        0    1    2    3    4    5    6    7    8    9
    curve = [4.6, 4.0, 3.9, 4.2, 3.5, 3.4, 3.45, 3.3, 3.35, 3.41]
    s = demo.summarize_spikes(curve, [5, 1])  # order does not matter
    assert s.jumps == pytest.approx([0.2, 0.05])  # spike 1: window 2..5; spike 5: window 6..9
    assert s.recoveries == [3, None]
    assert s.windows == [4, 4]
    assert s.worst_jump == pytest.approx(0.2)
    assert s.recovery_text() == ">4"
    assert s.final_loss == 3.41 and not s.diverged
    recovered = demo.summarize_spikes(curve[:8], [1, 5])
    assert recovered.recoveries == [3, 2] and recovered.recovery_text() == "3"


@pytest.mark.parametrize("steps", [[], [9], [-1]])
def test_summary_refuses_spikes_outside_the_curve(steps):
    with pytest.raises(ValueError, match="spike steps"):
        demo.summarize_spikes([4.0] * 10, steps)


def test_encode_maps_every_character_into_the_vocabulary():
    ids = demo.encode("a\n~ \té")
    assert ids.tolist() == [ord("a") - 31, 0, ord("~") - 31, 1, 96, ord("?") - 31]
    assert ids.max() < demo.VOCAB_SIZE


# ------------------------------------------------------------------------------------------------
# training: deterministic, and the stabilizer's result does not depend on the gradient scale

TINY = dataclasses.replace(
    demo.QUICK, steps=12, spikes=((4, 1e2), (8, 1e4)), hidden=32, eval_size=64
)


@pytest.fixture(scope="module")
def corpus():
    return demo.load_corpus(TINY.context, TINY.eval_size)


def test_training_is_deterministic(corpus):
    a = demo.train("guard", corpus, TINY, lr=3e-3, spikes=dict(TINY.spikes))
    b = demo.train("guard", corpus, TINY, lr=3e-3, spikes=dict(TINY.spikes))
    assert len(a.curve) == TINY.steps + 1
    assert a.curve == b.curve


@pytest.mark.parametrize("method", ["stab", "guard"])
def test_stabilizer_does_not_care_about_the_gradient_scale(corpus, method):
    runs = [
        demo.train(method, corpus, TINY, lr=3e-3, grad_scale=s, spikes=dict(TINY.spikes))
        for s in (1.0, 100.0, 0.01)
    ]
    for run in runs[1:]:
        assert run.curve == pytest.approx(runs[0].curve, rel=1e-4)


def test_clipping_does_care_about_the_gradient_scale(corpus):
    small = demo.train("clip", corpus, TINY, lr=3e-3, grad_scale=0.01, spikes=dict(TINY.spikes))
    large = demo.train("clip", corpus, TINY, lr=3e-3, grad_scale=100.0, spikes=dict(TINY.spikes))
    assert max(abs(a - b) for a, b in zip(small.curve, large.curve)) > 1e-2


def test_a_nonfinite_loss_stops_the_run(corpus):
    run = demo.train("none", corpus, TINY, lr=3e-3, spikes={3: math.inf})
    assert len(run.curve) == 5 and math.isnan(run.curve[-1])
    assert demo.diverged(run.curve)


def fake_results(finals: dict[str, dict[float, list[float]]], unigram: float):
    lrs = tuple(next(iter(finals.values())))
    seeds = tuple(range(len(next(iter(next(iter(finals.values())).values())))))
    cfg = dataclasses.replace(TINY, sweep_lrs=lrs, sweep_seeds=seeds)
    results = demo.DemoResults(cfg, unigram)
    results.sweep = {
        m: {lr: [demo.Run([4.6, x], 0.0) for x in xs] for lr, xs in by_lr.items()}
        for m, by_lr in finals.items()
    }
    return results


def test_sweep_median_range_and_divergence_count():
    nan = math.nan
    results = fake_results(
        {
            "none": {0.01: [2.5, 2.7, 2.6], 0.1: [3.0, 3.1, 2.9], 1.0: [3.0, 40.0, nan]},
            "clip": {0.01: [2.5, 2.6, 3.3], 0.1: [2.9, 2.9, 2.9], 1.0: [2.9, 1111.0, 1111.0]},
        },
        unigram=3.2,
    )
    assert results.sweep_median("none", 0.01) == pytest.approx(2.6)
    assert results.sweep_median("none", 1.0) == 40.0  # NaN sorts as +inf
    table = demo.sweep_table(results)
    assert (
        "| no protection | 2.60 (2.50-2.70) | 3.00 (2.90-3.10) | 40.00 (3.00-inf) | 2/9 |" in table
    )
    assert (
        "| clip_grad_norm_(1.0) | 2.60 (2.50-3.30) | 2.90 (2.90-2.90) "
        "| 1.11e+03 (2.90-1.11e+03) | 2/9 |" in table
    )


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        demo.make_protection("adam", torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# the whole demo and the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradstab", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_quick_demo_prints_the_tables_and_writes_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub" / "demo.png"
    proc = run_cli("demo", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    cfg = demo.QUICK
    lines = len(demo.METHODS) * (len(cfg.grad_scales) + len(cfg.sweep_lrs))
    assert len(re.findall(r"^\[\s*\d+/\d+\] ", text, re.M)) == lines  # progress
    row = re.compile(
        r"^\| (spikes[^|]*) \| ([^|]+) \| (\d+\.\d{3}|nan) \| (\d+\.\d{3}|inf) \| (>?\d+) \| "
        r"(yes|no) \|$",
        re.M,
    )
    rows = row.findall(text)
    assert len(rows) == len(demo.METHODS) * len(cfg.grad_scales)
    assert {r[1].strip() for r in rows} == set(demo.METHODS.values())
    sweep_part = text[text.index("Learning-rate sweep") :]
    sweep_rows = [line for line in sweep_part.splitlines() if line.startswith("| ")]
    assert len(sweep_rows) == len(demo.METHODS) + 1  # header + one row per method
    assert all(line.count("|") == len(cfg.sweep_lrs) + 3 for line in sweep_rows)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert f"wrote {out}" in text


def test_cli_info():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    import gradstab

    assert f"gradstab {gradstab.__version__}" in proc.stdout
    assert f"torch {torch.__version__}" in proc.stdout
    backend = gradstab.GradientStabilizer().backend
    assert f"backend: {backend}" in proc.stdout
    assert f"threads: {torch.get_num_threads()}" in proc.stdout
    assert "cuda available: " in proc.stdout and "extension: " in proc.stdout


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_cli_bench_dispatches_to_the_engine(monkeypatch):
    seen = []
    fake = types.ModuleType("gradstab.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "gradstab.bench", fake)
    assert cli.main(["bench", "--quick", "x"]) == 3
    assert seen == [["--quick", "x"]]


def test_cli_bench_without_the_engine_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradstab.bench", None)  # makes the import fail
    assert cli.main(["bench"]) == 2
    assert "no benchmark engine" in capsys.readouterr().err


def test_demo_without_matplotlib_says_so_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("trained anyway"))
    assert demo.main(["--quick"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_console_script_is_the_cli():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="gradstab")
    assert script.load() is cli.main
