"""The benchmark engine: presets, implementations doing the same work, the report and the CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradstab import _ops, bench
from tests.helpers import assert_grads_close, inject_faults, random_grads
from tests.reference import ReferenceStabilizer

ROOT = Path(__file__).resolve().parents[1]


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


@pytest.mark.parametrize(
    ("device", "name", "tensors", "values"),
    [
        ("cpu", "gpt2-small", 148, 124_439_808),
        ("cpu", "resnet50", 161, 25_557_032),
        ("cuda", "gpt2-small", 148, 124_439_808),
        ("cuda", "llama-1b", 146, 1_235_814_400),  # Llama-3.2-1B
        ("cuda", "llama-7b", 291, 6_738_415_616),  # Llama-2-7B
    ],
)
def test_model_presets_have_the_models_shapes(device, name, tensors, values):
    shapes = bench.PRESETS[device][name].shapes()
    assert (len(shapes), numel(shapes)) == (tensors, values)


@pytest.mark.parametrize(("device", "count"), [("cpu", 400), ("cuda", 2000)])
def test_many_small_preset(device, count):
    shapes = bench.PRESETS[device]["many-small"].shapes()
    assert len(shapes) == count
    assert all(len(s) in (1, 2) and math.prod(s) >= 1 for s in shapes)
    assert all(s[0] <= 64 and s[1] <= 256 for s in shapes if len(s) == 2)
    assert all(s[0] <= 256 for s in shapes if len(s) == 1)
    assert shapes == bench.PRESETS[device]["many-small"].shapes()  # the same every run


def test_llama_bf16_preset_fits_this_kind_of_machine():
    preset = bench.PRESETS["cpu"]["llama-bf16"]
    shapes = preset.shapes()
    assert preset.dtype == torch.bfloat16
    # Gradients, their pristine copy and the floor's copy target: under 3 GB in all.
    assert 3 * numel(shapes) * 2 < 3e9
    assert len(shapes) == 2 + 6 * 9 + 1


def test_per_parameter_loop_matches_reference(seed):
    """The loop baseline must do the transform (defaults), or the comparison means nothing."""
    gen = torch.Generator().manual_seed(seed)
    grads = random_grads(torch.float32, gen)
    ref = ReferenceStabilizer(len(grads))
    step = bench.per_parameter_loop(grads)
    for i in range(10):
        fresh = random_grads(torch.float32, gen)
        faults = inject_faults(fresh, gen)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        expected, _ = ref.step(grads)
        step()
        assert_grads_close(grads, expected, torch.float32, f"seed={seed} step={i} {faults}")


TINY = bench.Preset(
    "tiny-test",
    "cpu",
    "a few odd shapes, for the tests",
    lambda: [(3, 5), (7,), (0,), (1000,), (33, 17)],
    torch.float32,
)


@pytest.fixture
def tiny_preset():
    bench.register_preset(TINY)
    yield TINY
    del bench.PRESETS["cpu"][TINY.name]


def test_workload_restores_and_counts_floor_bytes(tiny_preset):
    w = tiny_preset.build(torch.device("cpu"))
    before = [g.clone() for g in w.tensors]
    for g in w.tensors:
        g.mul_(3.0)
    w.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, w.tensors))
    grad_bytes = 4 * numel(tiny_preset.shapes())
    assert w.floor_bytes == 3 * grad_bytes
    assert w.copy_bytes >= grad_bytes


def test_implementations_do_the_same_work(tiny_preset):
    """From the same gradients, loop, torch and compiled give the same result, and the
    clip_grad_norm_ stand-ins really rescale the gradients they carry."""
    device = torch.device("cpu")
    outputs = {}
    for name, impl in bench.IMPLEMENTATIONS.items():
        if impl.unavailable(device) is not None or tiny_preset.kind not in impl.kinds:
            continue
        w = tiny_preset.build(device)
        pristine = [g.clone() for g in w.tensors]
        step = impl.setup(w, device)
        for _ in range(3):
            w.restore()
            step()
        outputs[name] = w.tensors
    total = math.sqrt(sum(float(g.double().square().sum()) for g in pristine))
    clipped = math.sqrt(sum(float(g.double().square().sum()) for g in outputs["clip_grad_norm_"]))
    assert total > bench.CLIP_MAX_NORM
    assert clipped == pytest.approx(bench.CLIP_MAX_NORM, rel=1e-5)
    for name in ("torch", "compiled", "apply"):
        if name in outputs:
            for a, b in zip(outputs["loop"], outputs[name]):
                torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-7)


def test_main_prints_table_and_writes_csv_and_json(tiny_preset, tmp_path, capsys):
    csv_path, json_path = tmp_path / "out" / "r.csv", tmp_path / "r.json"
    argv = ["--preset", "tiny-test", "--repeats", "3", "--quiet", "--threads", "1"]
    assert bench.main([*argv, "--csv", str(csv_path), "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    assert "torch " + torch.__version__.split("+")[0] in table
    expected_rows = ["loop", "torch", "apply", "clip_grad_norm_", "floor"]
    if _ops.has_kernel("cpu"):
        expected_rows.append("compiled")
    for row in expected_rows:
        assert f"| tiny-test | {row} |" in table
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    by_impl = {r["implementation"]: r for r in rows}
    assert set(by_impl) == set(expected_rows)
    assert float(by_impl["clip_grad_norm_"]["vs_clip_grad_norm"]) == 1.0
    assert float(by_impl["floor"]["vs_floor"]) == 1.0
    assert float(by_impl["loop"]["loop_speedup"]) == 1.0
    # The CSV rounds the medians and the ratios to 4 decimals (each within half_unit of its
    # value): the ratio of two rounded medians of a few hundredths of a millisecond (this tiny
    # preset) can be 3e-3 off the ratio of the medians, so the bound is the rounding's.
    half_unit = 0.5e-4
    clip_ms = float(by_impl["clip_grad_norm_"]["median_ms"])
    for r in rows:
        median_ms = float(r["median_ms"])
        assert int(r["repeats"]) == 3 and median_ms > 0
        ratio = median_ms / clip_ms
        rounding = half_unit + ratio * (half_unit / median_ms + half_unit / clip_ms)
        assert abs(float(r["vs_clip_grad_norm"]) - ratio) <= 1.01 * rounding, (r, ratio)
    data = json.loads(json_path.read_text())
    assert data["machine"]["threads"] == 1 and len(data["results"]) == len(rows)


def test_floor_follows_the_copy_timings(tiny_preset):
    runs, _ = bench.run("cpu", ["tiny-test"], ["clip_grad_norm_"], repeats=3)
    (pr,) = runs
    floor = pr.results[bench.FLOOR]
    w = tiny_preset.build(torch.device("cpu"))
    copy_ms = 2 * w.copy_bytes / (pr.copy_gbps * 1e9) * 1e3
    assert floor.median_ms == pytest.approx(copy_ms * w.floor_bytes / (2 * w.copy_bytes))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "unknown cpu preset(s) ['nope']"),
        (["--impl", "nope"], "unknown implementation(s) ['nope']"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert bench.main([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_says_so(capsys):
    assert bench.main(["--device", "cuda", "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_list_names_every_preset(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for device, presets in bench.PRESETS.items():
        for name in presets:
            assert any(line.split()[:2] == [device, name] for line in out.splitlines())


def test_plot_script_draws_a_png(tiny_preset, tmp_path):
    pytest.importorskip("matplotlib")
    csv_path = tmp_path / "r.csv"
    argv = ["--preset", "tiny-test", "--repeats", "2", "--quiet", "--csv", str(csv_path)]
    assert bench.main(argv) == 0
    plot = ROOT / "benchmarks" / "plot.py"
    subprocess.run([sys.executable, str(plot), str(csv_path)], check=True)
    png = csv_path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
