"""How ``gradstab._C`` is built: its sources, compiler flags, the CUDA choice and the build record.

setup.py (the build at install), the compile on first use (``gradstab/_jit.py``) and
``make cuda-check`` all read this module, so they cannot build different things. It imports only
the standard library at module level: setup.py loads it by path, before torch may be importable.

Every build writes a record (``_C.json``, a JSON object) beside the library it made: how it came to
be, for which torch, with or without CUDA and why, for which CUDA architectures. The loader reads
it before it imports the library (a library built for another torch is never imported), and
``python -m gradstab info`` shows it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
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
# Architectures when TORCH_CUDA_ARCH_LIST is not set: machine code for sm_80 (A100) and sm_90
# (H100), and sm_90's PTX, which the driver compiles for any newer GPU (sm_100, sm_120) on load.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# The build record's file name, beside the library.
RECORD_NAME = "_C.json"
# What made a library: setup.py at install, the first use of gradstab, `python -m gradstab build`.
ORIGINS = {
    "install": "built at install",
    "first-use": "compiled on first use",
    "build-command": "compiled by `python -m gradstab build`",
}
# Files of csrc/ that the build reads (sources and headers), for the sdist, the wheel and the
# cache key of the compile on first use.
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def say(message: str) -> None:
    """One progress line of a build on stderr (pip shows a build's output with -v, and always
    when the build fails)."""
    print(f"gradstab: {message}", file=sys.stderr, flush=True)


def ninja_search_path() -> str:
    """PATH with the folder of the ``ninja`` package's binary in front (the venv's bin/, which
    is on PATH only in an activated venv); PATH as it is where that package is not installed."""
    path = os.environ.get("PATH", "")
    try:
        import ninja
    except ImportError:
        return path
    ninja_dir = getattr(ninja, "BIN_DIR", None)
    return ninja_dir + os.pathsep + path if ninja_dir else path


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than 0/false/no."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def source_root(package_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds ``csrc/``: the copy inside an installed package, or the checkout."""
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


def source_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file of ``csrc/`` a build reads (sources and headers), relative to ``root``."""
    root = Path(root)
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "csrc").rglob("*")
        if p.suffix in SOURCE_SUFFIXES and p.is_file()
    )


def sources_digest(root: str | os.PathLike[str]) -> str:
    """SHA-256 over the names and contents of ``source_files(root)``."""
    digest = hashlib.sha256()
    for name in source_files(root):
        digest.update(name.encode() + b"\0")
        digest.update((Path(root) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def nvcc_command_flags() -> list[str]:
    """Every nvcc flag of a build but the -gencode list and the include paths: ours and torch's
    (``make cuda-check`` compiles with these to see what the real build compiles)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*NVCC_FLAGS, *COMMON_NVCC_FLAGS]


# ------------------------------------------------------------------------------------------------
# CUDA: whether to build it, and which architectures the result runs on


@dataclass(frozen=True)
class CudaChoice:
    """Whether a build compiles the CUDA kernels (``use``), and why, in words (``reason``)."""

    use: bool
    reason: str


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from the output of ``nvcc --version`` ("... release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """The version of the nvcc at ``nvcc``, or None where it does not run or says no version."""
    try:
        out = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_version(out.stdout + out.stderr)


def choose_cuda(
    torch_cuda: str | None,
    nvcc: str | None,
    nvcc_ver: tuple[int, int] | None,
    disabled: bool = False,
    toolkit_problem: str | None = None,
) -> CudaChoice:
    """Whether to compile the CUDA kernels: only where torch has CUDA and an nvcc of the same
    major version exists (torch refuses to build with another major version) in a toolkit that
    has the CUDA runtime's header and library.

    Args:
        torch_cuda: ``torch.version.cuda`` ("13.0"), or None for a CPU build of torch.
        nvcc: the path of the nvcc the build would run, or None when there is none.
        nvcc_ver: that nvcc's (major, minor), or None when it did not say.
        disabled: GRADSTAB_NO_CUDA=1 was set.
        toolkit_problem: what the toolkit around that nvcc lacks (``cuda_toolkit_problem``).
    """
    if disabled:
        return CudaChoice(False, "GRADSTAB_NO_CUDA=1 is set")
    if not torch_cuda:
        return CudaChoice(False, "this torch is a CPU build")
    if nvcc is None:
        return CudaChoice(
            False,
            f"torch has CUDA {torch_cuda} but no nvcc was found (set CUDA_HOME, or put nvcc on "
            "PATH)",
        )
    if nvcc_ver is None:
        return CudaChoice(False, f"{nvcc} does not run or does not print its version")
    torch_major = int(torch_cuda.split(".")[0])
    found = f"{nvcc_ver[0]}.{nvcc_ver[1]}"
    if nvcc_ver[0] != torch_major:
        return CudaChoice(
            False,
            f"{nvcc} is CUDA {found} but torch was built with CUDA {torch_cuda} "
            "(the major versions must match)",
        )
    if toolkit_problem is not None:
        return CudaChoice(False, toolkit_problem)
    return CudaChoice(True, f"torch has CUDA {torch_cuda} and {nvcc} is CUDA {found}")


def cuda_toolkit_problem(cuda_home: str) -> str | None:
    """What the CUDA toolkit at ``cuda_home`` lacks for torch's build helpers (the runtime's
    header in include/, libcudart in lib64/ or lib/ or the system's library folders), or None.
    An nvcc wrapper on PATH (/usr/local/bin/nvcc) makes torch take /usr/local for the toolkit."""
    home = Path(cuda_home)
    if not (home / "include" / "cuda_runtime.h").is_file():
        return (
            f"CUDA_HOME={cuda_home} (torch's guess, from where nvcc is) has no "
            "include/cuda_runtime.h: set CUDA_HOME to the CUDA toolkit's folder"
        )
    folders = [home / "lib64", home / "lib", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64")]
    if not any(any(folder.glob("libcudart.so*")) for folder in folders if folder.is_dir()):
        return (
            f"CUDA_HOME={cuda_home} (torch's guess, from where nvcc is) has no libcudart in "
            "lib64/ or lib/: set CUDA_HOME to the CUDA toolkit's folder"
        )
    return None


def probe_cuda(torch_cuda: str | None = None, cuda_home: str | None = None) -> CudaChoice:
    """``choose_cuda`` for this machine: torch's CUDA version and the nvcc torch's build helpers
    would run (``$CUDA_HOME/bin/nvcc``, CUDA_HOME as torch finds it). Imports torch unless both
    arguments are given."""
    if torch_cuda is None or cuda_home is None:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        torch_cuda = torch.version.cuda if torch_cuda is None else torch_cuda
        cuda_home = CUDA_HOME if cuda_home is None else cuda_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is not None and not os.access(nvcc, os.X_OK):
        nvcc = None
    return choose_cuda(
        torch_cuda,
        nvcc,
        nvcc_version(nvcc) if nvcc and torch_cuda else None,
        env_flag("GRADSTAB_NO_CUDA"),
        cuda_toolkit_problem(cuda_home) if nvcc else None,
    )


def cuda_arch_list() -> str:
    """The CUDA architectures a build compiles for: TORCH_CUDA_ARCH_LIST, else the default."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST


_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


def arch_runs_on(capability: tuple[int, int], arch_list: str) -> bool | None:
    """Whether code built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax, "8.0;9.0+PTX") runs on
    a GPU of compute ``capability`` (major, minor); None if an entry is not understood (a named
    architecture such as "Hopper").

    Machine code for X.Y runs on X.Z with Z >= Y (X.Ya only on X.Y); PTX for X.Y is compiled by
    the driver for any GPU of capability >= X.Y.
    """
    unknown = False
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = _ARCH.match(entry)
        if match is None:
            unknown = True
            continue
        arch = (int(match.group(1)), int(match.group(2)))
        specific = match.group(3) == "a"
        if specific:
            if arch == tuple(capability):
                return True
            continue
        if arch[0] == capability[0] and arch[1] <= capability[1]:
            return True
        if match.group(4) and arch <= tuple(capability):
            return True
    return None if unknown else False


# ------------------------------------------------------------------------------------------------
# the build record


def make_record(
    origin: str,
    torch_version: str,
    torch_cuda: str | None,
    cuda: CudaChoice,
    arch_list: str | None,
    seconds: float,
    key: str | None = None,
) -> dict[str, object]:
    """The record of one build (see the module's docstring)."""
    if origin not in ORIGINS:
        raise ValueError(f"gradstab: unknown build origin {origin!r}")
    return {
        "origin": origin,
        "torch": torch_version,
        "torch_cuda": torch_cuda,
        "cuda": cuda.use,
        "cuda_reason": cuda.reason,
        "arch_list": arch_list if cuda.use else None,
        "python": platform.python_version(),
        "platform": sys.platform,
        "cxx_flags": CXX_FLAGS,
        "nvcc_flags": NVCC_FLAGS if cuda.use else None,
        "seconds": round(seconds, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "key": key,
    }


def write_record(path: str | os.PathLike[str], record: dict[str, object]) -> None:
    """Writes ``record`` to ``path`` atomically (a reader sees all of it or nothing)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The record at ``path``, or None where there is none or it cannot be read."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_record(record: dict[str, object]) -> str:
    """One line: how the library came to be, for which torch, with which CUDA architectures."""
    origin = ORIGINS.get(str(record.get("origin")), str(record.get("origin")))
    cuda = (
        f"CUDA kernels for {record.get('arch_list')}"
        if record.get("cuda")
        else f"no CUDA kernels: {record.get('cuda_reason')}"
    )
    when = str(record.get("date", "?"))[:16].replace("T", " ")
    return (
        f"{origin} for torch {record.get('torch')} ({when} UTC, {record.get('seconds')} s): "
        f"CPU kernels, {cuda}"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["nvcc-flags"]:
        sys.exit("usage: python gradstab/_build.py nvcc-flags")
    print(" ".join(nvcc_command_flags()))
