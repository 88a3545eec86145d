"""Loads the compiled extension and registers what torch.compile needs to trace its ops.

``gradstab._C`` comes from one of two places (docs/install.md):

- built at install by setup.py, beside this file, when torch was importable at build time;
- compiled on first use by ``gradstab._jit`` into a cache, from the sources the package carries,
  against the torch that runs (every other install route, and a library built for another torch).

Nothing is loaded at import: the first call that needs the kernels (``has_kernel``, or reading
``HAS_EXTENSION``, ``LOAD_ERROR`` or ``_C``) runs ``load()`` once per process. Where no library
can be had, gradstab runs on its pure-torch backend and says so once, with a ``RuntimeWarning``
that names the reason and the command that fixes it. A GPU that the library has no code for
(neither machine code for its architecture nor PTX it can compile) gets the torch backend and one
warning that names its architecture, never a crash in the middle of training.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from gradstab import _build, _jit
from gradstab._warn import user_stacklevel

NO_EXTENSION_ENV = "GRADSTAB_NO_EXTENSION"
_OPS = ("stabilize_", "stabilized_adamw_")


@dataclass
class LoadResult:
    """What ``load()`` found: the library in use (``module``, its ``path`` and build ``record``),
    or why there is none (``error``); ``notes``: why other candidates were passed over."""

    module: ModuleType | None = None
    path: str | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    fix: str | None = None
    notes: list[str] = field(default_factory=list)
    cuda_problem: str | None = None
    kernels: dict[tuple[str, str], bool] = field(default_factory=dict)

    def describe(self) -> str:
        """How ``_C`` came to be, in one line (``python -m gradstab info``)."""
        if self.module is None:
            return f"absent: {self.error}"
        if self.record is None:
            return f"{self.path} (no build record: built by an older gradstab or by hand)"
        return _build.describe_record(self.record)


_result: LoadResult | None = None
_lock = threading.RLock()


@dataclass
class _Gpu:
    index: int
    name: str
    capability: tuple[int, int]

    def __str__(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]} ({self.name}, cuda:{self.index})"


def _visible_gpus() -> list[_Gpu]:
    try:
        if not torch.cuda.is_available():
            return []
        return [
            _Gpu(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # a broken driver: the CUDA path is out of reach either way
        return []


def _uncovered(record: dict[str, Any] | None, gpus: list[_Gpu]) -> str | None:
    """Why a library with build ``record`` cannot serve every GPU in ``gpus``; None if it can
    (or cannot be told before loading it)."""
    if not gpus or record is None:
        return None
    if not record.get("cuda"):
        return f"it has no CUDA kernels: {record.get('cuda_reason')}"
    archs = str(record.get("arch_list"))
    missing = [g for g in gpus if _build.arch_runs_on(g.capability, archs) is False]
    if missing:
        return (
            f"it has no code for {', '.join(map(str, missing))}: it was built for the CUDA "
            f"architectures {archs}"
        )
    return None


def _installed(notes: list[str]) -> tuple[str, dict[str, Any] | None] | None:
    """The library built at install (its path and record), or None where there is none for this
    torch."""
    try:
        spec = importlib.util.find_spec("gradstab._C")
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "gradstab._C":
            return None
        notes.append(f"gradstab._C could not be loaded ({type(err).__name__}: {err})")
        return None
    if spec is None or spec.origin is None:
        return None
    record = _build.read_record(Path(spec.origin).with_name(_build.RECORD_NAME))
    if record is not None and record.get("torch") != torch.__version__:
        notes.append(
            f"the gradstab._C built at install is for torch {record.get('torch')}, and this is "
            f"torch {torch.__version__}"
        )
        return None
    return spec.origin, record


def _cpu_only_reason(torch_has_cuda: bool) -> str:
    if _build.env_flag("GRADSTAB_NO_CUDA"):
        return "GRADSTAB_NO_CUDA=1 is set"
    if torch_has_cuda:
        return "no GPU is visible (`python -m gradstab build` compiles the CUDA kernels too)"
    return "this torch is a CPU build"


def _load(allow_compile: bool) -> LoadResult:
    if _build.env_flag(NO_EXTENSION_ENV):
        return LoadResult(error=f"{NO_EXTENSION_ENV}=1 is set", fix=f"unset {NO_EXTENSION_ENV}")
    notes: list[str] = []
    gpus = _visible_gpus()

    def attempt(path: str, record: dict[str, Any] | None, installed: bool) -> LoadResult | None:
        try:
            if installed:
                module = importlib.import_module("gradstab._C")
            else:
                module = _jit.import_library(path)
        except (ImportError, OSError) as err:
            notes.append(f"{path} could not be loaded ({type(err).__name__}: {err})")
            return None
        return LoadResult(module=module, path=path, record=record, notes=notes)

    # Candidates in order of preference. One with CPU kernels that cannot serve every visible GPU
    # is kept for after a compile that could.
    partial: list[tuple[str, dict[str, Any] | None, bool, str]] = []
    installed = _installed(notes)
    if installed is not None:
        problem = _uncovered(installed[1], gpus)
        if problem is None:
            result = attempt(*installed, installed=True)
            if result is not None:
                return result
        else:
            partial.append((*installed, True, f"the gradstab._C built at install: {problem}"))

    torch_has_cuda = bool(torch.version.cuda) and not _build.env_flag("GRADSTAB_NO_CUDA")
    try:
        specs = [_jit.build_spec(True, [g.capability for g in gpus])] if torch_has_cuda else []
        specs.append(_jit.build_spec(False))
    except FileNotFoundError as err:
        notes.append(f"this installation carries no C++ sources to compile ({err})")
        specs = []
    for spec in specs:
        record = _jit.ready(spec)
        if record is None:
            continue
        path = str(spec.directory / str(record["library"]))
        problem = _uncovered(record, gpus)
        if problem is None:
            result = attempt(path, record, installed=False)
            if result is not None:
                return result
        else:
            partial.append((path, record, False, f"the kernels compiled earlier: {problem}"))

    compile_error: _jit.BuildError | None = None
    if specs and not allow_compile:
        compile_error = _jit.BuildError(
            "not compiled yet for this torch (the first use compiles it)",
            f"run `{_jit.BUILD_COMMAND}` to compile it now",
        )
    elif specs and _build.env_flag(_jit.NO_JIT_ENV):
        compile_error = _jit.BuildError(
            f"the compile on first use is switched off ({_jit.NO_JIT_ENV}=1)",
            f"run `{_jit.BUILD_COMMAND}` (or unset {_jit.NO_JIT_ENV})",
        )
    elif specs:
        # The CUDA kernels only for a visible GPU (`python -m gradstab build` compiles them
        # without one); the CPU kernels alone where those cannot be had.
        plan: list[tuple[_jit.BuildSpec, _build.CudaChoice]] = []
        cpu_reason = _cpu_only_reason(torch_has_cuda)
        if gpus:
            cuda = _build.probe_cuda()
            if cuda.use:
                plan.append((specs[0], cuda))
                cpu_reason = "the CUDA build failed"
            else:
                cpu_reason = cuda.reason
                compile_error = _jit.BuildError(
                    f"no CUDA kernels can be compiled here: {cuda.reason}",
                    "install the CUDA toolkit of torch's CUDA major version "
                    f"({torch.version.cuda}) or point CUDA_HOME at it, then run "
                    f"`{_jit.BUILD_COMMAND}`",
                )
        if not partial:
            plan.append((specs[-1], _build.CudaChoice(False, cpu_reason)))
        for spec, choice in plan:
            if gpus and not spec.cuda:
                _build.say(f"no CUDA kernels: {cpu_reason}")
            try:
                record = _jit.compile_extension(spec, "first-use", choice)
            except _jit.BuildError as err:
                compile_error = err
                continue
            # The build loaded the library into this process: it is the one to use.
            result = attempt(str(spec.directory / str(record["library"])), record, False)
            if result is None:
                return LoadResult(error="; ".join(notes), fix=f"run `{_jit.BUILD_COMMAND}`")
            if gpus and not spec.cuda and compile_error is not None:
                result.cuda_problem = compile_error.reason
                result.fix = compile_error.fix
            return result

    for path, record, is_installed, problem in partial:
        result = attempt(path, record, is_installed)
        if result is not None:
            result.cuda_problem = problem
            if compile_error is not None:
                result.cuda_problem += f"; and {compile_error.reason}"
                result.fix = compile_error.fix
            return result

    if compile_error is not None:
        notes.append(compile_error.reason)
    return LoadResult(
        error="; ".join(notes) or "this installation has neither gradstab._C nor its sources",
        fix=compile_error.fix if compile_error is not None else "reinstall gradstab",
        notes=notes,
    )


def _warn(message: str) -> None:
    # Point at the user's call that needed the kernels.
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def _finish(result: LoadResult, warn: bool) -> None:
    global _C, HAS_EXTENSION, LOAD_ERROR
    _C = result.module
    HAS_EXTENSION = _C is not None
    LOAD_ERROR = result.error
    if _C is not None:
        sys.modules["gradstab._C"] = _C
        package = sys.modules.get("gradstab")
        if package is not None:
            package._C = _C
        _register_fakes()
    # The kernels are registered once, when the library loads. Asking the dispatcher now, not
    # per call, keeps has_kernel a plain lookup.
    result.kernels = {
        (op, device_type): _C is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"gradstab::{op}", key)
        for op in _OPS
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    }
    gpus = _visible_gpus() if _C is not None else []
    if gpus and result.cuda_problem is None and not result.kernels[("stabilize_", "cuda")]:
        result.cuda_problem = f"{result.path} has no CUDA kernels"
    if result.cuda_problem is not None:
        for op in _OPS:
            result.kernels[(op, "cuda")] = False
    if not warn:
        return
    if _C is None and not _build.env_flag(NO_EXTENSION_ENV):
        _warn(
            "gradstab: the compiled kernels are not available, so the slower pure-torch backend "
            f"runs: {result.error}. Fix: {result.fix}."
        )
    elif result.cuda_problem is not None:
        _warn(
            "gradstab: gradients on the GPU use the slower pure-torch backend: "
            f"{result.cuda_problem}. Fix: {result.fix or f'run `{_jit.BUILD_COMMAND}`'}."
        )


def load(*, allow_compile: bool = True, warn: bool = True) -> LoadResult:
    """Loads ``gradstab._C`` once per process (later calls return the first result).

    Args:
        allow_compile: compile the kernels when no library is there (default True; the compile
            still honours GRADSTAB_NO_JIT=1).
        warn: emit the one ``RuntimeWarning`` when there are no kernels (default True).
    """
    global _result
    with _lock:
        if _result is None:
            try:
                result = _load(allow_compile)
            except Exception as err:  # the kernels are an optimization: never fail training
                result = LoadResult(
                    error=f"loading them failed unexpectedly ({type(err).__name__}: {err})",
                    fix="please report it; GRADSTAB_NO_EXTENSION=1 skips the kernels",
                )
            _finish(result, warn)
            _result = result
        return _result


def __getattr__(name: str) -> Any:
    # _C, HAS_EXTENSION and LOAD_ERROR exist once load() has run.
    if name in ("_C", "HAS_EXTENSION", "LOAD_ERROR"):
        load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@torch.compiler.assume_constant_result
def has_kernel(device_type: str, op: str = "stabilize_") -> bool:
    """Whether the compiled op ``gradstab::<op>`` has a kernel for tensors on ``device_type``
    ("cpu", "cuda"). Loads the kernels on the first call; torch.compile takes the answer as a
    constant (it cannot trace a load)."""
    result = _result if _result is not None else load()
    return result.kernels.get((op, device_type), False)


def build_info() -> str:
    result = load()
    if result.module is None:
        return f"not loaded ({result.error})"
    return result.module.build_info()


def build(*, force: bool = False, verbose: bool = False) -> int:
    """``python -m gradstab build``: compiles the kernels for the running torch now (the CUDA
    kernels too where torch and nvcc have CUDA, GPU or not), unless the library built at install
    already has everything; then checks that they load. Returns the exit status."""
    if _result is not None and _result.module is not None:
        # A second library would register the gradstab ops twice.
        _build.say("the kernels are already loaded in this process: build in a new one")
        return 1
    notes: list[str] = []
    cuda = _build.probe_cuda()
    gpus = _visible_gpus()
    installed = _installed(notes)
    for note in notes:
        _build.say(note)
    if not force and installed is not None and (installed[1] or {}).get("origin") == "install":
        record = installed[1] or {}
        if _uncovered(record, gpus) is None and (record.get("cuda") or not cuda.use):
            _build.say(f"nothing to compile: {installed[0]} was {_build.describe_record(record)}")
            return 0
    try:
        spec = _jit.build_spec(cuda.use, [g.capability for g in gpus])
    except FileNotFoundError as err:
        _build.say(f"cannot compile: {err}")
        return 1
    if not cuda.use:
        _build.say(f"no CUDA kernels: {cuda.reason}")
    try:
        record = _jit.compile_extension(
            spec, "build-command", cuda, verbose=verbose, force=force, retry=True
        )
    except _jit.BuildError as err:
        _build.say(str(err))
        return 1
    path = spec.directory / str(record["library"])
    _build.say(f"{path}: {_build.describe_record(record)}")
    try:
        _jit.import_library(path)
    except (ImportError, OSError) as err:
        _build.say(f"the compiled kernels do not load: {type(err).__name__}: {err}")
        return 1
    return 0


def _register_fakes() -> None:
    @torch.library.register_fake("gradstab::stabilize_")
    def _stabilize_fake(
        grads: list[Tensor],
        m: Tensor,
        v: Tensor,
        k: Tensor,
        found_inf: Tensor | None,
        gamma1: float,
        gamma2: float,
        eps: float,
        bias_correction: bool,
        global_norm: bool,
        nonfinite: int,
        spike_guard: float | None,
    ) -> Tensor:
        return m.new_empty((len(grads),), dtype=torch.float64)

    @torch.library.register_fake("gradstab::stabilized_adamw_")
    def _stabilized_adamw_fake(
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        m: Tensor,
        v: Tensor,
        k: Tensor,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        group_sizes: list[int],
        lr: list[float],
        beta1: list[float],
        beta2: list[float],
        weight_decay: list[float],
        eps: list[float],
        amsgrad: bool,
        maximize: bool,
        gamma1: float,
        gamma2: float,
        stab_eps: float,
        bias_correction: bool,
        global_norm: bool,
        nonfinite: int,
        spike_guard: float | None,
    ) -> Tensor:
        return m.new_empty((len(params),), dtype=torch.float64)
