"""Builds and runs the C++ harnesses of tests/ (host programs over csrc/'s CUDA-free headers)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from gradstab import _build

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


def build(source: str, out_dir: Path, include: list[str] | None = None) -> Path:
    """Compiles tests/<source> with the CPU build's flags (gradstab/_build.py CXX_FLAGS: no
    contraction into fused multiply-adds) and warnings as errors; returns the executable."""
    exe = out_dir / Path(source).stem
    includes = [f"-I{ROOT / 'csrc'}", *(f"-I{path}" for path in include or [])]
    subprocess.run(
        [
            CXX,
            "-std=c++17",
            *_build.CXX_FLAGS,
            "-Wall",
            "-Wextra",
            "-Werror",
            *includes,
            str(ROOT / "tests" / source),
            "-o",
            str(exe),
        ],
        check=True,
    )
    return exe


def run(exe: Path, *args: str, stdin: str | None = None) -> str:
    """Runs a harness; fails the test with its stderr when it exits non-zero."""
    out = subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"{exe.name} failed:\n{out.stderr}"
    return out.stdout
