"""How ``gradstab._C`` is built: its sources and compiler flags, in one place.

setup.py (the ahead-of-time build), the compile on first use and ``make cuda-check`` all read
this module, so the three cannot build different things. It imports only the standard library at
module level: setup.py loads it by path in an isolated build environment that has no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

# Host compiler flags. No -std flag: torch's build helpers add the standard its headers need
# (C++20 from torch 2.14 on). -ffp-contract=off: no fused multiply-add, so the vector kernels give
# the generic loop's bits.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
# nvcc flags of ours; torch's build helpers add their own (COMMON_NVCC_FLAGS) and the -gencode
# list from TORCH_CUDA_ARCH_LIST. -fmad=false: no multiply-add contracted into a fused one, as
# -ffp-contract=off on the host, so the device computes the CPU's bits from the same norms
# (docs/cuda.md); `make cuda-check` fails on any fused or contractible float operation in the PTX.
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false"]
# Architectures when TORCH_CUDA_ARCH_LIST is not set.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def source_root(package_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds ``csrc/``: the checkout, or the copy inside an installed package."""
    package = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent):
        if (candidate / "csrc" / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"gradstab: no C++ sources (csrc/) next to {package}")


def sources(root: str | os.PathLike[str], cuda: bool) -> list[str]:
    """The translation units of ``gradstab._C``, relative to ``root``, in a fixed order."""
    root = Path(root)

    def rel(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.glob(pattern))

    files = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    if cuda:
        files = [f for f in files if not f.endswith("no_cuda.cpp")]
        files += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    return files


def nvcc_command_flags() -> list[str]:
    """Every nvcc flag of a build but the -gencode list and the include paths: ours and torch's
    (``make cuda-check`` compiles with these to see what the real build compiles)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*NVCC_FLAGS, *COMMON_NVCC_FLAGS]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["nvcc-flags"]:
        sys.exit("usage: python gradstab/_build.py nvcc-flags")
    print(" ".join(nvcc_command_flags()))
