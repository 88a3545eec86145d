"""Installing and loading gradstab: what the sdist and the wheels carry, the CUDA choice, the
compile on first use (concurrency, its cache, the switch), and every fallback to the torch
backend with its one warning.

The subprocess tests run with a fresh GRADSTAB_CACHE_DIR, never the user's cache. One build, made
by two processes starting at once (``compiled_cache``), serves every test that needs compiled
kernels. A process "without the library built at install" is one where a meta-path finder hides
the checkout's gradstab._C (HIDE_C).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import gradstab
from gradstab import _build, _jit, _ops

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "packaging_probe.py"

HIDE_C = """
import sys
class HideC:
    def find_spec(self, name, path=None, target=None):
        if name == "gradstab._C":
            raise ModuleNotFoundError("hidden by the test", name=name)
sys.meta_path.insert(0, HideC())
"""

# A GPU that is not there: torch.cuda answers as if one sm_120 card were visible.
FAKE_GPU = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda device=None: (12, 0)
torch.cuda.get_device_name = lambda device=None: "Fake GPU"
"""

# Apply under every warning, then report the backend and gradstab's warnings.
APPLY = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradstab, torch
    stab = gradstab.GradientStabilizer()
    p = torch.nn.Parameter(torch.randn(4)); p.grad = torch.randn(4) * 5
    stab.apply([p])
from gradstab import _ops
result = _ops.load()
print(json.dumps({
    "backend": stab.backend,
    "norm": p.grad.norm().item(),
    "warnings": [(w.category.__name__, str(w.message), w.filename) for w in caught
                 if "gradstab" in str(w.message)],
    "origin": (result.record or {}).get("origin"),
    "path": result.path,
    "cpu": _ops.has_kernel("cpu"),
    "cuda": _ops.has_kernel("cuda"),
}))
"""


def env_with(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess: a minimal PATH (no venv bin/, as when a venv's python is
    run without activating it), the given cache, no inherited gradstab switches."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GRADSTAB_") and k not in ("CXX", "TORCH_CUDA_ARCH_LIST")
    }
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", GRADSTAB_CACHE_DIR=str(cache), **extra)
    return env


def run_python(code: str, env: dict[str, str], *args: str, check: bool = True):
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def apply_report(code_prefix: str, env: dict[str, str]) -> tuple[dict, str]:
    out = run_python(code_prefix + APPLY, env)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# ------------------------------------------------------------------------------------------------
# the CUDA choice and the architectures


@pytest.mark.parametrize(
    ("torch_cuda", "nvcc", "version", "disabled", "use", "says"),
    [
        ("13.0", "/cuda/bin/nvcc", (13, 0), False, True, "is CUDA 13.0"),
        ("13.0", "/cuda/bin/nvcc", (13, 2), False, True, "is CUDA 13.2"),
        ("13.0", "/cuda/bin/nvcc", (12, 4), False, False, "major versions must match"),
        ("12.8", "/cuda/bin/nvcc", (13, 0), False, False, "built with CUDA 12.8"),
        ("13.0", None, None, False, False, "no nvcc was found"),
        ("13.0", "/cuda/bin/nvcc", None, False, False, "does not print its version"),
        (None, "/cuda/bin/nvcc", (13, 0), False, False, "CPU build"),
        ("13.0", "/cuda/bin/nvcc", (13, 0), True, False, "GRADSTAB_NO_CUDA=1"),
    ],
)
def test_cuda_is_chosen_only_with_an_nvcc_of_torchs_major_version(
    torch_cuda, nvcc, version, disabled, use, says
):
    choice = _build.choose_cuda(torch_cuda, nvcc, version, disabled)
    assert choice.use is use
    assert says in choice.reason, choice.reason


def fake_cuda_home(tmp_path: Path, nvcc_output: str | None, complete: bool = True) -> Path:
    """A CUDA toolkit folder whose bin/nvcc prints ``nvcc_output`` (none if None); ``complete``:
    with the runtime's header and library."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    if nvcc_output is not None:
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho '{nvcc_output}'\n")
        nvcc.chmod(0o755)
    if complete:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
        (home / "lib64").mkdir()
        (home / "lib64" / "libcudart.so.13").write_text("")
    return home


@pytest.mark.parametrize(
    ("output", "complete", "use", "says"),
    [
        ("Cuda compilation tools, release 13.0, V13.0.88", True, True, "is CUDA 13.0"),
        ("Cuda compilation tools, release 12.4, V12.4.131", True, False, "major versions must"),
        ("something else", True, False, "does not print its version"),
        (None, True, False, "no nvcc was found"),
        # an nvcc wrapper in /usr/local/bin: torch takes /usr/local for the toolkit
        ("Cuda compilation tools, release 13.0, V13.0.88", False, False, "no include/cuda_runtime"),
    ],
)
def test_probe_runs_the_nvcc_of_cuda_home(tmp_path, monkeypatch, output, complete, use, says):
    monkeypatch.delenv("GRADSTAB_NO_CUDA", raising=False)
    choice = _build.probe_cuda("13.0", str(fake_cuda_home(tmp_path, output, complete)))
    assert (choice.use, says in choice.reason) == (use, True), choice


def test_toolkit_without_the_runtime_library_is_refused(tmp_path):
    assert not _build.choose_cuda("13.0", "/cuda/bin/nvcc", (13, 0), False, "it lacks x").use
    home = fake_cuda_home(tmp_path, "release 13.0", complete=True)
    assert _build.cuda_toolkit_problem(str(home)) is None
    (home / "lib64" / "libcudart.so.13").unlink()
    problem = _build.cuda_toolkit_problem(str(home))
    if problem is not None:  # a system-wide libcudart (Debian's toolkit) would do
        assert "no libcudart" in problem


def test_parse_nvcc_version():
    assert _build.parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == (13, 0)
    assert _build.parse_nvcc_version("release 12.4, V12.4.131") == (12, 4)
    assert _build.parse_nvcc_version("nvcc: command not found") is None


@pytest.mark.parametrize(
    ("arch_list", "capability", "runs"),
    [
        ("8.0;9.0+PTX", (8, 0), True),
        ("8.0;9.0+PTX", (8, 6), True),  # sm_80 code runs on 8.x
        ("8.0;9.0+PTX", (8, 9), True),
        ("8.0;9.0+PTX", (9, 0), True),
        ("8.0;9.0+PTX", (10, 0), True),  # compute_90 PTX, compiled by the driver
        ("8.0;9.0+PTX", (12, 0), True),
        ("8.0;9.0+PTX", (7, 5), False),  # older than everything
        ("8.0;9.0", (10, 0), False),  # no PTX: the "no kernel image" of the issue
        ("8.0;9.0", (12, 0), False),
        ("8.0 9.0", (9, 0), True),  # torch also takes spaces
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),  # arch-specific code runs only on its architecture
        ("9.0a+PTX", (10, 0), False),
        ("7.5;Hopper", (7, 5), True),
        ("Hopper", (9, 0), None),  # named architectures: cannot tell
    ],
)
def test_arch_runs_on(arch_list, capability, runs):
    assert _build.arch_runs_on(capability, arch_list) is runs


def test_default_architectures_carry_ptx_for_newer_gpus():
    for capability in [(8, 0), (8, 6), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)]:
        assert _build.arch_runs_on(capability, _build.DEFAULT_CUDA_ARCH_LIST), capability


def test_compiled_architectures_add_the_visible_gpus_the_default_misses(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    default = _build.DEFAULT_CUDA_ARCH_LIST
    assert _jit.arch_list_for([(9, 0), (12, 0)]) == default
    assert _jit.arch_list_for([(7, 5), (7, 5), (8, 6)]) == default + ";7.5"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _jit.arch_list_for([(7, 5)]) == "8.6"


def gpu(capability, name="Fake GPU"):
    return _ops._Gpu(0, name, capability)


def test_a_library_is_judged_by_its_record_before_it_is_loaded():
    cpu_only = {"cuda": False, "cuda_reason": "no nvcc"}
    cuda = {"cuda": True, "arch_list": "8.0;9.0"}
    assert _ops._uncovered(cpu_only, []) is None
    assert "no CUDA kernels: no nvcc" in _ops._uncovered(cpu_only, [gpu((9, 0))])
    assert _ops._uncovered(cuda, [gpu((9, 0)), gpu((8, 6))]) is None
    problem = _ops._uncovered(cuda, [gpu((9, 0)), gpu((12, 0), "RTX")])
    assert "sm_120 (RTX, cuda:0)" in problem and "8.0;9.0" in problem
    assert _ops._uncovered(None, [gpu((12, 0))]) is None  # no record: the dispatcher decides


# ------------------------------------------------------------------------------------------------
# the cache key, the record


def test_cache_key_follows_everything_that_changes_the_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSTAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    base = _jit.build_spec(False)
    assert base.directory.parent == tmp_path / "cache"
    assert _jit.build_spec(False) == base
    default_cuda = _jit.build_spec(True)
    assert default_cuda.key != base.key
    assert _jit.build_spec(True, [(7, 5)]).key != default_cuda.key
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _jit.build_spec(True).arch_list == "8.0"
    assert _jit.build_spec(True).key not in (base.key, default_cuda.key)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(_build, "CXX_FLAGS", [*_build.CXX_FLAGS, "-DNEW_FLAG"])
    assert _jit.build_spec(False).key != base.key
    monkeypatch.undo()
    monkeypatch.setenv("GRADSTAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other_torch = _jit.build_spec(False)
    assert other_torch.key != base.key and "torch9.9.9" in other_torch.directory.name
    monkeypatch.undo()
    monkeypatch.setenv("GRADSTAB_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "src"
    for name in _build.source_files(_build.source_root()):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((_build.source_root() / name).read_bytes())
    assert _jit.build_spec(False, root=copy).key == base.key
    header = copy / "csrc" / "stabilize_math.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _jit.build_spec(False, root=copy).key != base.key


def test_build_record_round_trip(tmp_path):
    choice = _build.CudaChoice(True, "torch has CUDA 13.0 and nvcc is CUDA 13.0")
    record = _build.make_record("first-use", "2.14.1+cu130", "13.0", choice, "8.0;9.0+PTX", 61.26)
    _build.write_record(tmp_path / "_C.json", record)
    assert _build.read_record(tmp_path / "_C.json") == record
    line = _build.describe_record(record)
    assert line.startswith("compiled on first use for torch 2.14.1+cu130")
    assert "CUDA kernels for 8.0;9.0+PTX" in line and "61.3 s" in line
    assert _build.read_record(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert _build.read_record(tmp_path / "bad.json") is None
    with pytest.raises(ValueError, match="origin"):
        _build.make_record("elsewhere", "2", None, choice, None, 1.0)


# ------------------------------------------------------------------------------------------------
# what the release artifacts carry


def test_build_requirements_never_pull_torch():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = pyproject["build-system"]["requires"]
    assert not [r for r in requires if r.lower().startswith("torch")], requires
    assert any(d.startswith("ninja") for d in pyproject["project"]["dependencies"])


def test_sdist_and_its_wheel_carry_every_source(tmp_path):
    """The sdist holds all of csrc/; a wheel built from it (here without _C) holds it as
    gradstab/_csrc/csrc, so that the first use can compile it."""
    # A `build/` folder in the checkout imports as a namespace package: ask for pypa/build's
    # entry point, and fail rather than skip (make setup installs it).
    assert importlib.util.find_spec("build.__main__") is not None, (
        "pypa/build is not installed (make setup installs it: pip install build)"
    )
    sources = _build.source_files(ROOT)
    assert "csrc/ops.cpp" in sources and "csrc/cuda/multi_tensor.cuh" in sources
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), ROOT],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (sdist,) = tmp_path.glob("gradstab-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(sources) <= names, sorted(set(sources) - names)
    assert {"setup.py", "pyproject.toml", "gradstab/_build.py", "MANIFEST.in"} <= names
    assert not [n for n in names if n.endswith((".so", ".o"))]

    env = {**os.environ, "GRADSTAB_NO_EXTENSION": "1"}
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation"),
            *("--no-deps", "--no-cache-dir", "-w", str(tmp_path), str(sdist)),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gradstab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gradstab/stabilizer.py", "gradstab/py.typed", "gradstab/_jit.py"} <= names
    missing = {f"gradstab/_csrc/{s}" for s in sources} - names
    assert not missing, sorted(missing)
    assert not [n for n in names if n.endswith(".so")], names


# ------------------------------------------------------------------------------------------------
# loading: the fallbacks


def test_broken_extension_falls_back_to_torch_with_one_warning(tmp_path):
    """A gradstab._C that cannot load and no way to compile: one RuntimeWarning that names both
    and the command that fixes it, pointing at the user's line; the torch backend runs."""
    broken = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "gradstab._C":
            raise ImportError("libcudart.so.13: cannot open shared object file (simulated)")
sys.meta_path.insert(0, Broken())
"""
    report, _ = apply_report(broken, env_with(tmp_path, GRADSTAB_NO_JIT="1"))
    assert report["backend"] == "torch"
    assert abs(report["norm"] - 1.0) < 1e-5
    (warning,) = report["warnings"]
    category, message, filename = warning
    assert category == "RuntimeWarning"
    assert "simulated" in message and "GRADSTAB_NO_JIT=1" in message
    assert "python -m gradstab build" in message
    assert filename == "<string>"  # the user's apply(), not gradstab's insides


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    env = env_with(tmp_path / "cache", CXX=str(tmp_path / "no-such-c++"))
    start = time.monotonic()
    report, stderr = apply_report(HIDE_C, env)
    assert report["backend"] == "torch" and abs(report["norm"] - 1.0) < 1e-5
    (warning,) = report["warnings"]
    assert "needs a C++ compiler" in warning[1] and "no-such-c++ is not an executable" in warning[1]
    assert "apt-get install g++" in warning[1] and "python -m gradstab build" in warning[1]
    assert "compiling" not in stderr
    assert time.monotonic() - start < 60


def test_a_failed_compile_is_reported_and_not_retried_by_every_process(tmp_path):
    calls = tmp_path / "calls"
    cxx = tmp_path / "g++-broken"
    cxx.write_text(
        f'#!/bin/sh\necho x >> {calls}\necho "broken-g++: error: simulated failure"\nexit 1\n'
    )
    cxx.chmod(0o755)
    env = env_with(tmp_path / "cache", CXX=str(cxx))
    report, stderr = apply_report(HIDE_C, env)
    assert report["backend"] == "torch"
    (warning,) = report["warnings"]
    assert "compiling the kernels failed: broken-g++: error: simulated failure" in warning[1]
    log = Path(warning[1].split("full log: ")[1].split(")")[0])
    assert "simulated failure" in log.read_text()
    assert "compiling the CPU kernels" in stderr
    tries = calls.read_text().count("x")
    assert tries > 0

    report, stderr = apply_report(HIDE_C, env)
    assert report["backend"] == "torch"
    (warning,) = report["warnings"]
    assert "an earlier attempt" in warning[1] and "simulated failure" in warning[1]
    assert calls.read_text().count("x") == tries  # the compiler did not run again
    assert "compiling" not in stderr


def test_unwritable_cache_falls_back_with_one_warning(tmp_path):
    report, _ = apply_report(HIDE_C, env_with(Path("/proc/gradstab-cache")))
    assert report["backend"] == "torch"
    (warning,) = report["warnings"]
    assert "the build cache /proc/gradstab-cache cannot be written" in warning[1]
    assert "set GRADSTAB_CACHE_DIR to a writable folder" in warning[1]


def test_no_extension_switch_runs_the_torch_backend_silently(tmp_path):
    report, _ = apply_report("", env_with(tmp_path, GRADSTAB_NO_EXTENSION="1"))
    assert report["backend"] == "torch" and report["warnings"] == []
    assert not report["cpu"]


def test_installed_library_is_preferred_and_says_so(tmp_path):
    record = _build.read_record(ROOT / "gradstab" / _build.RECORD_NAME)
    if record is None:
        pytest.skip("gradstab._C was not built at install here (make setup builds it)")
    report, stderr = apply_report("", env_with(tmp_path))
    assert report["backend"] == "cpu" and report["origin"] == "install"
    assert report["warnings"] == [] and "compiling" not in stderr
    assert record["torch"] == torch.__version__
    assert record["cuda"] is (torch.version.cuda is not None)


def test_gpu_without_cuda_kernels_gets_the_torch_backend_with_one_warning(tmp_path):
    """A visible GPU and a library with CPU kernels only (no CUDA here): the CPU kernels stay,
    CUDA grads go to the torch backend, one warning says why and how to fix it."""
    if _build.read_record(ROOT / "gradstab" / _build.RECORD_NAME) is None:
        pytest.skip("gradstab._C was not built at install here (make setup builds it)")
    report, _ = apply_report(FAKE_GPU, env_with(tmp_path))
    assert report["cpu"] and not report["cuda"]
    assert report["backend"] == "cpu"  # the grads are on the CPU
    (warning,) = report["warnings"]
    assert "gradients on the GPU use the slower pure-torch backend" in warning[1]
    assert "no CUDA kernels" in warning[1] and "python -m gradstab build" in warning[1]


def installed_elsewhere(folder: Path, record: dict) -> str:
    """Code that makes ``import gradstab._C`` find this checkout's library in ``folder``, beside
    the build record ``record``: an installed library whose record says what the test needs."""
    (library,) = (ROOT / "gradstab").glob("_C.*.so")
    folder.mkdir()
    (folder / library.name).symlink_to(library)
    _build.write_record(folder / _build.RECORD_NAME, record)
    return f"""
import importlib.util, sys
class Elsewhere:
    def find_spec(self, name, path=None, target=None):
        if name == "gradstab._C":
            return importlib.util.spec_from_file_location(name, {str(folder / library.name)!r})
sys.meta_path.insert(0, Elsewhere())
"""


def test_gpu_architecture_without_code_is_named_in_the_one_warning(tmp_path):
    """A library built for 8.0;9.0 without PTX, and an sm_120 GPU: the GPU gets the torch
    backend and the warning names its architecture, instead of "no kernel image" mid-training."""
    record = _build.read_record(ROOT / "gradstab" / _build.RECORD_NAME)
    if record is None:
        pytest.skip("gradstab._C was not built at install here (make setup builds it)")
    record.update(cuda=True, arch_list="8.0;9.0")
    finder = installed_elsewhere(tmp_path / "pkg", record)
    report, _ = apply_report(FAKE_GPU + finder, env_with(tmp_path / "cache"))
    assert report["cpu"] and not report["cuda"] and report["backend"] == "cpu"
    (warning,) = report["warnings"]
    assert "no code for sm_120 (Fake GPU, cuda:0)" in warning[1], warning[1]
    assert "8.0;9.0" in warning[1] and "no CUDA kernels can be compiled here" in warning[1]


# ------------------------------------------------------------------------------------------------
# the compile on first use


@pytest.fixture(scope="session")
def compiled_cache(tmp_path_factory):
    """Two processes without a library built at install start at once on an empty cache: the
    compile every later test of this file reuses. Returns the cache and both outputs."""
    cache = tmp_path_factory.mktemp("gradstab-cache")
    env = env_with(cache)
    code = (
        HIDE_C
        + "import runpy, sys; sys.argv = ['probe', '--backend', 'cpu']\n"
        + (f"runpy.run_path({str(PROBE)!r}, run_name='__main__')")
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [(p.communicate(timeout=900), p.returncode) for p in procs]
    return cache, outs


@pytest.mark.slow
def test_processes_starting_together_compile_once_and_match_the_torch_backend(compiled_cache):
    cache, outs = compiled_cache
    for (stdout, stderr), code in outs:
        assert code == 0, stdout + stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["backend"] == "cpu" and report["origin"] == "first-use", report
        assert report["library"].startswith(str(cache))
    stderrs = [stderr for (_, stderr), _ in outs]
    compiling = [s for s in stderrs if "gradstab: compiling the CPU kernels" in s]
    assert len(compiling) == 1, stderrs
    (builder,) = compiling
    assert "once (10 files" in builder or "files, about" in builder
    assert "[1/" in builder and "compiled the kernels in" in builder
    (waiter,) = [s for s in stderrs if s is not builder]
    assert "waiting for another process" in waiter, waiter
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    record = _build.read_record(folder / _build.RECORD_NAME)
    assert record["origin"] == "first-use" and record["torch"] == torch.__version__


def test_a_compiled_library_is_imported_without_compiling(compiled_cache):
    cache, _ = compiled_cache
    start = time.monotonic()
    report, stderr = apply_report(HIDE_C, env_with(cache, GRADSTAB_NO_JIT="1"))
    assert report["backend"] == "cpu" and report["origin"] == "first-use"
    assert report["warnings"] == [] and "compiling" not in stderr and "waiting" not in stderr
    assert time.monotonic() - start < 60


def test_a_library_built_for_another_torch_is_not_imported(compiled_cache, tmp_path):
    """A library whose record names another torch is never imported (a wrong ABI can crash
    rather than fail to import), even one that would load: the first use compiles instead."""
    cache, _ = compiled_cache
    other_torch = _build.make_record(
        "install", "1.0.0", None, _build.CudaChoice(False, "cpu"), None, 1.0
    )
    report, _ = apply_report(installed_elsewhere(tmp_path / "pkg", other_torch), env_with(cache))
    assert report["backend"] == "cpu" and report["origin"] == "first-use", report
    assert report["path"].startswith(str(cache)) and report["warnings"] == []


def test_info_says_how_the_library_came_to_be(compiled_cache, tmp_path):
    cache, _ = compiled_cache
    info = HIDE_C + "import runpy, sys; sys.argv = ['gradstab', 'info']\n"
    info += "runpy.run_module('gradstab', run_name='__main__')"
    out = run_python(info, env_with(cache))
    assert "backend: cpu" in out.stdout
    assert f"extension: compiled on first use for torch {torch.__version__}" in out.stdout
    assert "cuda architectures: none" in out.stdout and f"library: {cache}" in out.stdout

    out = run_python(info, env_with(tmp_path / "empty"))
    assert "backend: torch" in out.stdout
    assert "extension: absent: not compiled yet for this torch" in out.stdout
    assert "fix: run `python -m gradstab build`" in out.stdout
    assert "compiling" not in out.stderr and "Warning" not in out.stderr  # info compiles nothing

    if _build.read_record(ROOT / "gradstab" / _build.RECORD_NAME) is not None:
        out = run_python(info.replace(HIDE_C, ""), env_with(tmp_path / "empty"))
        assert f"extension: built at install for torch {torch.__version__}" in out.stdout


def test_build_command_has_nothing_to_do_when_the_library_is_there(compiled_cache, tmp_path):
    cache, _ = compiled_cache
    build = "import runpy, sys; sys.argv = ['gradstab', 'build']\n"
    build += "runpy.run_module('gradstab', run_name='__main__')"
    out = run_python(HIDE_C + build, env_with(cache))
    assert "compiling" not in out.stderr
    assert f"{cache}" in out.stderr and "compiled on first use for torch" in out.stderr
    if _build.read_record(ROOT / "gradstab" / _build.RECORD_NAME) is not None:
        out = run_python(build, env_with(tmp_path / "empty"))
        assert "nothing to compile" in out.stderr and "built at install" in out.stderr


def test_public_names():
    for name in ("GradientStabilizer", "StabilizerStats", "functional", "__version__"):
        assert hasattr(gradstab, name)
    for name in ("init_state", "stabilize_", "StabilizerState"):
        assert hasattr(gradstab.functional, name)
