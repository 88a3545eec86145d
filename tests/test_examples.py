"""The examples run (with few steps) and say what they should."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=EXAMPLES.parent,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


def test_plain_loop():
    out = run_example("plain_loop.py", "--steps", "30")
    labels = ["AdamW ", "AdamW + clip_grad_norm_(1)", "AdamW + GradientStabilizer"]
    lines = [line for line in out.splitlines() if any(map(line.startswith, labels))]
    assert len(lines) == 3, out
    for line in lines:
        float(line.split()[-1])


@pytest.mark.parametrize("api", ["wrapper", "apply"])
def test_amp(api):
    out = run_example("amp.py", "--steps", "12", "--api", api)
    found = re.search(
        rf"api {api}: (\d+) of 12 steps skipped.*\n.*counted (\d+)\.\.(\d+) updates", out
    )
    assert found, out
    skipped, k_min, k_max = map(int, found.groups())
    assert 0 < skipped < 12, "the example starts with a loss scale that overflows"
    assert k_min == k_max == 12 - skipped, out


@needs("transformers")
def test_huggingface_trainer(tmp_path):
    out = run_example("huggingface_trainer.py", "--steps", "4", "--output-dir", str(tmp_path))
    assert "grad norm" in out and "skipped 0" in out, out
    assert "resumed from checkpoint-2: final weights identical" in out, out


@needs("lightning")
def test_lightning_trainer(tmp_path):
    out = run_example("lightning_trainer.py", "--steps", "50", "--output-dir", str(tmp_path))
    assert "grad norm" in out, out
    assert "resumed after epoch 1: final weights identical" in out, out
