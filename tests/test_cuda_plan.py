"""The index arithmetic of the CUDA kernels, run on the host (no GPU needed).

csrc/cuda/multi_tensor_plan.h is free of CUDA and torch headers so that the host compiler can
build the very functions the kernels call; tests/cuda_plan_harness.cpp exercises them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_launcher_index_arithmetic(tmp_path):
    exe = tmp_path / "cuda_plan_harness"
    subprocess.run(
        [
            CXX,
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{ROOT / 'csrc'}",
            str(ROOT / "tests" / "cuda_plan_harness.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("checks passed"), out.stdout
