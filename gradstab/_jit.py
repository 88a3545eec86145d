"""Compiles ``gradstab._C`` on first use, against the torch that runs, into a cache of builds.

NOTE: [compile on first use]
A wheel built without torch (pip's default isolated build) or for another torch has no usable
``gradstab._C``, but it carries ``csrc/`` (as ``gradstab/_csrc/csrc``). The first process that
needs the kernels compiles them with ``torch.utils.cpp_extension.load`` (ninja) into

    $GRADSTAB_CACHE_DIR (default ~/.cache/gradstab) / torch<version>-<python>-<cpu|cuXY>-<hash>/

where the hash covers everything that changes the binary: torch's version and CUDA, Python's ABI,
the sources, the flags of ``gradstab/_build.py``, CUDA or not, the architectures. An ``flock`` on
``<folder>.lock`` serializes the processes that start together (DDP ranks): one compiles, the
others wait and then import its result; the kernel drops the lock of a process that dies. A
finished build is marked by its record (``_C.json``), written last; a process that finds it imports
the library directly (no ninja, a few milliseconds). A failed build leaves ``failed.json`` with the
reason, so that later processes do not each spend a minute failing again;
``python -m gradstab build`` retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from gradstab import _build
from gradstab._build import say

NO_JIT_ENV = "GRADSTAB_NO_JIT"
CACHE_ENV = "GRADSTAB_CACHE_DIR"
BUILD_COMMAND = "python -m gradstab build"
FAILED_NAME = "failed.json"
LOG_NAME = "build.log"


class BuildError(RuntimeError):
    """The kernels cannot be compiled here: ``reason`` says why, ``fix`` what to do about it."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}. Fix: {fix}")
        self.reason = reason
        self.fix = fix


def cache_root() -> Path:
    """$GRADSTAB_CACHE_DIR, else $XDG_CACHE_HOME/gradstab, else ~/.cache/gradstab."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "gradstab"


@dataclass(frozen=True)
class BuildSpec:
    """One build of ``gradstab._C`` for the running torch: what it compiles and where it goes."""

    cuda: bool
    arch_list: str | None
    root: Path
    key: str
    directory: Path

    @property
    def record_path(self) -> Path:
        return self.directory / _build.RECORD_NAME

    @property
    def lock_path(self) -> Path:
        return self.directory.with_name(self.directory.name + ".lock")

    @property
    def kernels(self) -> str:
        return f"CPU and CUDA ({self.arch_list})" if self.cuda else "CPU"


def arch_list_for(capabilities: Sequence[tuple[int, int]] = ()) -> str:
    """TORCH_CUDA_ARCH_LIST if set; else the default list, plus the architecture of every visible
    GPU that it does not cover (an sm_75 card gets sm_75 code)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return _build.cuda_arch_list()
    arch_list = _build.DEFAULT_CUDA_ARCH_LIST
    for major, minor in sorted(set(capabilities)):
        if not _build.arch_runs_on((major, minor), arch_list):
            arch_list += f";{major}.{minor}"
    return arch_list


def build_spec(
    cuda: bool, capabilities: Sequence[tuple[int, int]] = (), root: Path | None = None
) -> BuildSpec:
    """The build of ``gradstab._C`` for the running torch, with or without the CUDA kernels.
    Raises ``FileNotFoundError`` when this installation carries no C++ sources."""
    root = (root or _build.source_root()).resolve()
    arch_list = arch_list_for(capabilities) if cuda else None
    identity = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "abi": sysconfig.get_config_var("SOABI"),
        "sources": _build.sources_digest(root),
        "cxx_flags": _build.CXX_FLAGS,
        "link_flags": _build.LINK_FLAGS,
        "nvcc_flags": _build.NVCC_FLAGS if cuda else None,
        "cuda": cuda,
        "arch_list": arch_list,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    flavor = "cu" + (torch.version.cuda or "").replace(".", "") if cuda else "cpu"
    name = f"torch{torch.__version__.replace('+', '_')}-{sys.implementation.cache_tag}-{flavor}"
    return BuildSpec(cuda, arch_list, root, key, cache_root() / f"{name}-{key[:12]}")


def ready(spec: BuildSpec) -> dict[str, object] | None:
    """The record of the finished build ``spec``, or None where it is not (yet) there."""
    record = _build.read_record(spec.record_path)
    if record is None or record.get("key") != spec.key:
        return None
    if not (spec.directory / str(record.get("library", ""))).is_file():
        return None
    return record


def import_library(path: str | os.PathLike[str]) -> ModuleType:
    """Imports the library at ``path`` as the module ``gradstab._C``."""
    spec = importlib.util.spec_from_file_location("gradstab._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"gradstab: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["gradstab._C"] = module
    return module


def check_toolchain(spec: BuildSpec) -> None:
    """Raises ``BuildError`` when the compiler or ninja that ``spec`` needs is missing."""
    cxx = os.environ.get("CXX", "").strip() or "c++"
    if shutil.which(cxx) is None:
        culprit = f"CXX={cxx} is not an executable" if "CXX" in os.environ else "no c++ on PATH"
        raise BuildError(
            f"compiling the kernels needs a C++ compiler, and there is none ({culprit})",
            "install one (Debian/Ubuntu: `apt-get install g++`) or point CXX at one, then run "
            f"`{BUILD_COMMAND}`",
        )
    if shutil.which("ninja", path=_build.ninja_search_path()) is None:
        raise BuildError(
            "compiling the kernels needs ninja, and there is none",
            f"`pip install ninja`, then run `{BUILD_COMMAND}`",
        )


@contextlib.contextmanager
def _locked(path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Holds an exclusive flock on ``path``; calls ``waiting()`` once if another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _build_environment(spec: BuildSpec) -> Iterator[None]:
    """PATH with ninja on it and the architectures of ``spec``, for the build only."""
    saved = {name: os.environ.get(name) for name in ("PATH", "TORCH_CUDA_ARCH_LIST")}
    os.environ["PATH"] = _build.ninja_search_path()
    if spec.arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _object_name(source: str) -> str:
    # The object file torch's ninja build writes for a source (cpp_extension's naming).
    stem = Path(source).stem
    return f"{stem}.cuda.o" if source.endswith(".cu") else f"{stem}.o"


class _Progress:
    """Says each source's name as its object file appears: a line per compiled file."""

    def __init__(self, spec: BuildSpec, sources: Sequence[str]) -> None:
        self._directory = spec.directory
        self._pending = {_object_name(s): s for s in sources}
        self._total = len(sources)
        self._done = 0
        self._start = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradstab-build", daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._scan()

    def _scan(self) -> None:
        for obj, source in list(self._pending.items()):
            with contextlib.suppress(OSError):
                if (self._directory / obj).stat().st_mtime >= self._start - 1:
                    del self._pending[obj]
                    self._done += 1
                    elapsed = time.time() - self._start
                    say(f"  [{self._done}/{self._total}] {source} ({elapsed:.0f} s)")


def estimate(spec: BuildSpec) -> str:
    """A rough duration of the build of ``spec`` on this machine, in words."""
    # Measured (docs/install.md): the CPU kernels take about 35 s of compiler time, the CUDA
    # kernels about 35 s more per nvcc target (sm_XY or PTX) on a 2-core x86 machine; ninja
    # runs one compiler per core.
    cpu_seconds = 35.0
    if spec.cuda and spec.arch_list:
        entries = [a for a in re.split(r"[;\s]+", spec.arch_list) if a]
        cpu_seconds += 35.0 * sum(2 if a.endswith("+PTX") else 1 for a in entries)
    cores = os.cpu_count() or 1
    seconds = cpu_seconds / min(cores, 8) * 1.3
    if seconds < 90:
        words = f"about {max(10, round(seconds / 10) * 10)} s"
    else:
        words = f"about {round(seconds / 60)} minutes"
    return f"{words} on {cores} idle cores"


def _first_error(text: str) -> str:
    """The first compiler or linker error of a build's output ("file.cpp:3:1: error: ..."),
    else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b\s*:", line, re.IGNORECASE) and not line.startswith(
            ("Error building extension", "[", "FAILED")
        ):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def compile_extension(
    spec: BuildSpec,
    origin: str,
    cuda: _build.CudaChoice,
    *,
    verbose: bool = False,
    force: bool = False,
    retry: bool = False,
) -> dict[str, object]:
    """Compiles ``spec`` unless a finished build of it is there; returns its record.

    Safe when several processes call it at once: one compiles, the others wait for it. A build
    that failed before is tried again only with ``retry`` or ``force`` (which also rebuilds a
    finished one). Raises ``BuildError``.
    """
    check_toolchain(spec)

    def waiting() -> None:
        say(f"waiting for another process that is compiling the kernels into {spec.directory}")

    try:
        spec.directory.parent.mkdir(parents=True, exist_ok=True)
        with _locked(spec.lock_path, waiting):
            return _compile_locked(spec, origin, cuda, verbose, force, retry)
    except OSError as err:
        raise BuildError(
            f"the build cache {spec.directory.parent} cannot be written ({err})",
            f"set {CACHE_ENV} to a writable folder, then run `{BUILD_COMMAND}`",
        ) from err


def _compile_locked(
    spec: BuildSpec,
    origin: str,
    cuda: _build.CudaChoice,
    verbose: bool,
    force: bool,
    retry: bool,
) -> dict[str, object]:
    """``compile_extension``'s work, under the lock of ``spec``."""
    if not force:
        record = ready(spec)
        if record is not None:
            return record
        failed = _build.read_record(spec.directory / FAILED_NAME)
        if failed is not None and not retry:
            raise BuildError(
                f"{failed.get('reason')} (an earlier attempt; not retried on import)",
                str(failed.get("fix")),
            )
    shutil.rmtree(spec.directory, ignore_errors=True)
    spec.directory.mkdir(parents=True)
    sources = _build.sources(spec.root, cuda=spec.cuda)
    hint = f". `{BUILD_COMMAND}` does this ahead; {NO_JIT_ENV}=1 turns it off"
    say(
        f"compiling the {spec.kernels} kernels for torch {torch.__version__}, once "
        f"({len(sources)} files, {estimate(spec)}); cached in {spec.directory}"
        + (hint if origin == "first-use" else "")
    )
    start = time.monotonic()
    try:
        from torch.utils import cpp_extension

        with _build_environment(spec), _Progress(spec, sources):
            library = cpp_extension.load(
                name="_C",
                sources=[str(spec.root / s) for s in sources],
                extra_cflags=_build.CXX_FLAGS,
                extra_cuda_cflags=_build.NVCC_FLAGS if spec.cuda else None,
                extra_ldflags=_build.LINK_FLAGS,
                build_directory=str(spec.directory),
                verbose=verbose,
                with_cuda=spec.cuda,
                is_python_module=False,
            )
    except Exception as err:
        log = spec.directory / LOG_NAME
        log.write_text(f"{type(err).__name__}: {err}\n")
        reason = f"compiling the kernels failed: {_first_error(str(err))} (full log: {log})"
        fix = f"fix what the log shows, then run `{BUILD_COMMAND}`"
        _build.write_record(spec.directory / FAILED_NAME, {"reason": reason, "fix": fix})
        raise BuildError(reason, fix) from err
    seconds = time.monotonic() - start
    record = _build.make_record(
        origin, torch.__version__, torch.version.cuda, cuda, spec.arch_list, seconds, spec.key
    )
    record["library"] = Path(str(library)).name
    _build.write_record(spec.record_path, record)
    say(f"compiled the kernels in {seconds:.0f} s")
    return record
