"""``python -m gradstab check`` (gradstab/selfcheck.py) on the CPU: it passes on the compiled
kernels, and it fails, with exit status 1 and the culprit named, when a result is wrong."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradstab
from gradstab import _ops, selfcheck
from gradstab import functional as F

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (_ops.has_kernel("cpu") and _ops.has_kernel("cpu", "stabilized_adamw_")),
    reason="needs the compiled CPU kernels",
)
DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16"]


def table_rows(out: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_the_command_passes_on_the_cpu_kernels():
    """The installed command, as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "gradstab", "check", "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = table_rows(out.stdout)
    checks = {(row[0], row[1]) for row in rows}
    for dtype in DTYPE_NAMES:
        assert ("stabilize_ vs float64 reference", dtype) in checks, out.stdout
        assert ("StabilizedAdamW vs StabilizedOptimizer(AdamW)", dtype) in checks, out.stdout
    assert all(row[4].startswith("pass") for row in rows), out.stdout
    assert re.search(r"all \d+ checks passed in [0-9.]+ s", out.stdout), out.stdout
    # Each row: an error within its tolerance, both numbers.
    for row in rows:
        assert float(row[2]) <= float(row[3]), row


def failed_quantities(row: selfcheck.Row) -> list[str]:
    """What a failed row names: "grads, k out of tolerance" -> ["grads", "k"]."""
    return row.note.split(" out of tolerance")[0].split(", ")


def test_a_wrong_gradient_fails_the_check(monkeypatch, capsys, seed):
    """The op's gradients off by 2% (twice bfloat16's tolerance): every stabilize_ row fails
    and names the gradients, exit status 1, and the line says how to replay the run."""
    real = F.stabilize_

    def off_by_a_bit(grads, state, **kwargs):
        norms = real(grads, state, **kwargs)
        for g in grads:
            g.mul_(1.02)
        return norms

    monkeypatch.setattr(F, "stabilize_", off_by_a_bit)
    code = selfcheck.main(["--device", "cpu", "--quick", "--seed", str(seed)])
    out = capsys.readouterr().out
    assert code == 1, out
    rows = table_rows(out)
    failed = [row for row in rows if row[4].startswith("FAIL")]
    for dtype in DTYPE_NAMES:
        assert ["stabilize_ vs float64 reference", dtype] in [row[:2] for row in failed], out
    assert any("grads out of tolerance" in row[4] for row in failed), out
    assert re.search(r"\d+ of \d+ checks FAILED .*--seed \d+", out), out


def test_wrong_weights_and_state_fail_the_adamw_check(monkeypatch, seed):
    """StabilizedAdamW's weights (or its statistics) off the composition's: its rows fail."""
    real_step = gradstab.StabilizedAdamW.step

    def nudged_step(self, closure=None):
        loss = real_step(self, closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1.1)
        return loss

    data = selfcheck._Data(torch.device("cpu"), seed, quick=True)
    monkeypatch.setattr(gradstab.StabilizedAdamW, "step", nudged_step)
    rows = list(selfcheck._check_adamw(data, steps=3))
    assert len(rows) == 4 and not any(r.passed for r in rows), rows
    assert all("weights" in failed_quantities(r) for r in rows), rows


def test_state_and_norms_are_checked(monkeypatch, seed):
    """Right gradients but a wrong k, or wrong norms, still fail."""
    real = F.stabilize_

    def miscounts(grads, state, **kwargs):
        norms = real(grads, state, **kwargs)
        state.k.add_(1)
        return norms * (1 + 1e-5)

    monkeypatch.setattr(F, "stabilize_", miscounts)
    data = selfcheck._Data(torch.device("cpu"), seed, quick=True)
    rows = list(selfcheck._check_stabilize(data, steps=2))
    assert not any(r.passed for r in rows)
    assert all({"norms", "k"} <= set(failed_quantities(r)) for r in rows), rows


def test_relative_error_sees_nonfinite_mismatches():
    t = torch.tensor
    nan, inf = math.nan, math.inf
    assert selfcheck._relative_error([t([1.0, nan, -inf])], [t([1.0, nan, -inf])]) == 0.0
    assert selfcheck._relative_error([t([1.0, 0.0])], [t([1.0, nan])]) == inf
    assert selfcheck._relative_error([t([1.0, inf])], [t([1.0, 2.0])]) == inf
    assert selfcheck._relative_error([t([1.0, inf])], [t([1.0, -inf])]) == inf
    # Per tensor: relative to that tensor's largest value.
    error = selfcheck._relative_error([t([100.0]), t([1.0, 2.0])], [t([100.0]), t([1.0, 2.2])])
    assert error == pytest.approx(0.2 / 2.2)


def test_no_kernel_for_the_device_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert selfcheck.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
