"""Builds gradstab and its compiled extension gradstab._C against the installed torch.

Environment switches:
  GRADSTAB_NO_EXTENSION=1   install the pure-Python package only (the "torch" backend is used)
  GRADSTAB_NO_CUDA=1        build the CPU kernels only, even where torch and nvcc have CUDA
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "8.0;9.0")
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _extension_build():
    """Returns (ext_modules, cmdclass) for gradstab._C, or nothing when it cannot be built."""
    if _flag("GRADSTAB_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "gradstab: torch is not importable at build time, so gradstab._C is not built and the "
            "pure-torch backend will be used. Install torch first and build with "
            "`pip install --no-build-isolation .` to get the compiled kernels.",
            file=sys.stderr,
        )
        return [], {}

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # No -std flag: BuildExtension adds the standard the installed torch's headers need (C++20
    # from torch 2.14 on, whose headers no longer compile as C++17).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and not _flag("GRADSTAB_NO_CUDA")
        and bool(rel("csrc/cuda/*.cu"))
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources = [s for s in sources if not s.endswith("no_cuda.cpp")] + rel("csrc/cuda/*.cu")
        sources += rel("csrc/cuda/*.cpp")
        ext = CUDAExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
