"""Builds gradstab and its compiled extension gradstab._C against the installed torch.

Environment switches:
  GRADSTAB_NO_EXTENSION=1   install the pure-Python package only (the "torch" backend is used)
  GRADSTAB_NO_CUDA=1        build the CPU kernels only, even where torch and nvcc have CUDA
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "8.0;9.0")
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """gradstab/_build.py, loaded by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location(
        "gradstab_build", os.path.join(ROOT, "gradstab", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


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

    use_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and not _flag("GRADSTAB_NO_CUDA")
    )
    sources = build_config.sources(ROOT, cuda=use_cuda)
    cxx_flags = build_config.CXX_FLAGS
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCH_LIST)
        ext = CUDAExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": build_config.NVCC_FLAGS},
            extra_link_args=build_config.LINK_FLAGS,
        )
    else:
        ext = CppExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=build_config.LINK_FLAGS,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
