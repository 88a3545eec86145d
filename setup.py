"""Builds gradstab: the Python package, the C++/CUDA sources it carries, and gradstab._C.

Every wheel carries csrc/ (as gradstab/_csrc/csrc), so that gradstab can compile its kernels on
first use against the torch that runs it. gradstab._C itself is built here, at install, only when
torch is importable at build time (``pip install --no-build-isolation``); docs/install.md has the
routes.

Environment switches:
  GRADSTAB_NO_EXTENSION=1   do not build gradstab._C here (the sources are still carried)
  GRADSTAB_NO_CUDA=1        build the CPU kernels only, even where torch and nvcc have CUDA
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "8.0;9.0+PTX")
"""

import importlib.util
import os
import sys
import time

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """gradstab/_build.py, loaded by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location(
        "gradstab_build", os.path.join(ROOT, "gradstab", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the package, as gradstab/_csrc/csrc."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles from the checkout's csrc/
        names = build_config.source_files(ROOT)
        if "csrc/ops.cpp" not in names:
            raise RuntimeError(f"gradstab: no C++ sources in {ROOT}/csrc: this tree is incomplete")
        target = os.path.join(self.build_lib, "gradstab", "_csrc")
        for name in names:
            self.mkpath(os.path.dirname(os.path.join(target, name)))
            self.copy_file(os.path.join(ROOT, name), os.path.join(target, name))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = os.path.join(self.build_lib, "gradstab", "_csrc")
        return outputs + [os.path.join(target, n) for n in build_config.source_files(ROOT)]


def _extension_build():
    """Returns (ext_modules, cmdclass) for gradstab._C, or nothing where it is not built here."""
    if build_config.env_flag("GRADSTAB_NO_EXTENSION"):
        build_config.say(
            "GRADSTAB_NO_EXTENSION=1: gradstab._C is not built (the torch backend will run)"
        )
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        build_config.say(
            "torch is not importable at build time (an isolated build), so gradstab._C is not "
            "built now: gradstab compiles it on first use against the torch that runs it "
            "(`python -m gradstab build` does it ahead)"
        )
        return [], {}

    cuda = build_config.probe_cuda()
    arch_list = build_config.cuda_arch_list() if cuda.use else None
    sources = build_config.sources(ROOT, cuda=cuda.use)
    os.environ["PATH"] = build_config.ninja_search_path()

    class BuildExt(BuildExtension):
        """BuildExtension that says what it builds and writes the build record beside _C."""

        def build_extensions(self):
            kernels = f"CPU and CUDA kernels for {arch_list}" if cuda.use else "CPU kernels"
            build_config.say(f"building gradstab._C for torch {torch.__version__}: {kernels}")
            if not cuda.use:
                build_config.say(f"no CUDA kernels: {cuda.reason}")
            build_config.say(
                f"compiling {len(sources)} files with ninja (about "
                f"{'several minutes' if cuda.use else 'a minute'} on {os.cpu_count()} cores; "
                "pip shows the commands with -v)"
            )
            start = time.monotonic()
            super().build_extensions()
            seconds = time.monotonic() - start
            record = build_config.make_record(
                "install", torch.__version__, torch.version.cuda, cuda, arch_list, seconds
            )
            library = self.get_ext_fullpath("gradstab._C")
            build_config.write_record(
                os.path.join(os.path.dirname(library), build_config.RECORD_NAME), record
            )
            build_config.say(f"built gradstab._C in {seconds:.0f} s")

        def copy_extensions_to_source(self):
            # An editable install (or --inplace) copies _C into the checkout: its record too.
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("gradstab")
            self.copy_file(
                os.path.join(self.build_lib, "gradstab", build_config.RECORD_NAME),
                os.path.join(package_dir, build_config.RECORD_NAME),
            )

        def get_outputs(self):
            return [
                *super().get_outputs(),
                os.path.join(
                    os.path.dirname(self.get_ext_fullpath("gradstab._C")), build_config.RECORD_NAME
                ),
            ]

    if cuda.use:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        ext = CUDAExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": build_config.CXX_FLAGS, "nvcc": build_config.NVCC_FLAGS},
            extra_link_args=build_config.LINK_FLAGS,
        )
    else:
        ext = CppExtension(
            "gradstab._C",
            sources,
            extra_compile_args={"cxx": build_config.CXX_FLAGS},
            extra_link_args=build_config.LINK_FLAGS,
        )
    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
