"""Installing and importing gradstab: with, without and with a broken compiled extension."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import gradstab

ROOT = Path(__file__).resolve().parents[1]

BLOCK_C = """
import sys, warnings
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "gradstab._C":
            raise ImportError("libcudart.so.13: cannot open shared object file (simulated)")
sys.meta_path.insert(0, Broken())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradstab
    import gradstab.functional
    import torch
    stab = gradstab.GradientStabilizer()
    p = torch.nn.Parameter(torch.randn(4)); p.grad = torch.randn(4) * 5
    stab.apply([p])
ours = [w for w in caught if "gradstab._C" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert issubclass(ours[0].category, RuntimeWarning)
assert "simulated" in str(ours[0].message)
assert stab.backend == "torch", stab.backend
assert abs(p.grad.norm().item() - 1.0) < 1e-5
print("ok")
"""


def test_broken_extension_falls_back_to_torch_with_one_warning():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_C], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_wheel_without_extension(tmp_path):
    env = {**__import__("os").environ, "GRADSTAB_NO_EXTENSION": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gradstab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradstab/stabilizer.py" in names and "gradstab/py.typed" in names
    assert not [n for n in names if n.endswith(".so")], names


def test_public_names():
    for name in ("GradientStabilizer", "StabilizerStats", "functional", "__version__"):
        assert hasattr(gradstab, name)
    for name in ("init_state", "stabilize_", "StabilizerState"):
        assert hasattr(gradstab.functional, name)
