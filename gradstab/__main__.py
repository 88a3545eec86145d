"""Command line: ``python -m gradstab demo | bench | info | build | check | experiment``
(also installed as ``gradstab``)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

USAGE = """\
usage: python -m gradstab {demo,bench,info,build,check,experiment} [options]

  demo   train a small language model four ways (no protection, clip_grad_norm_,
         GradientStabilizer, GradientStabilizer(spike_guard=10)) with injected gradient
         spikes and a learning-rate sweep; print a table and write a PNG
         (python -m gradstab demo --help)
  bench  benchmark the implementations side by side (python -m gradstab bench --help)
  info   versions, the backend GradientStabilizer would use, how the compiled kernels came
         to be (built at install, compiled on first use, or absent and why), CUDA, threads
  build  compile the kernels for the running torch now, instead of on first use
         (python -m gradstab build --help)
  check  the compiled ops on this machine's GPU (or --device cpu) against a float64 reference
         of the contract: a pass/fail table, exit status 1 on any failure
         (python -m gradstab check --help)
  experiment NAME
         the stability benchmark of docs/evidence.md: a small GPT trained with no protection,
         clip_grad_norm_, ZClip, GradientStabilizer and StabilizedAdamW over learning-rate and
         weight-decay grids (python -m gradstab experiment --help)
"""


def info() -> int:
    """Prints what a bug report needs: versions, backend, how the compiled kernels came to be and
    their build flags, CUDA, threads. Compiles nothing."""
    import torch

    import gradstab
    from gradstab import _jit, _ops

    result = _ops.load(allow_compile=False, warn=False)
    cuda = torch.cuda.is_available()
    backend = gradstab.GradientStabilizer().backend
    lines = [
        f"gradstab {gradstab.__version__} ({gradstab.__file__})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"python {platform.python_version()} ({sys.executable})",
        f"backend: {backend}",
        f"extension: {result.describe()}",
    ]
    if result.module is not None:
        lines += [f"  library: {result.path}", f"  build: {result.module.build_info()}"]
        record = result.record or {}
        archs = record.get("arch_list") if record.get("cuda") else None
        lines.append(f"  cuda architectures: {archs or 'none'}")
        if result.cuda_problem:
            lines.append(f"  GPUs use the torch backend: {result.cuda_problem}")
    else:
        lines.append(f"  fix: {result.fix}")
    lines += [
        f"  compile cache: {_jit.cache_root()}",
        f"cuda available: {cuda}"
        + (
            f" ({torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)})"
            if cuda
            else ""
        ),
        f"threads: {torch.get_num_threads()}",
    ]
    print("\n".join(lines))
    return 0


def build(argv: Sequence[str]) -> int:
    """Compiles gradstab's kernels for the running torch now, into the cache the first use reads
    (GRADSTAB_CACHE_DIR, default ~/.cache/gradstab): the CPU kernels, and the CUDA kernels where
    torch has CUDA and an nvcc of the same major version exists (GPU or not; TORCH_CUDA_ARCH_LIST
    picks the architectures). Nothing to do where the gradstab._C built at install has them."""
    parser = argparse.ArgumentParser(prog="python -m gradstab build", description=build.__doc__)
    parser.add_argument("--force", action="store_true", help="compile again from scratch")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    from gradstab import _ops

    return _ops.build(force=args.force, verbose=args.verbose)


def bench(argv: Sequence[str]) -> int:
    try:
        bench_module = importlib.import_module("gradstab.bench")
    except ModuleNotFoundError as err:
        if err.name != "gradstab.bench":
            raise
        print(
            "gradstab bench: this installation has no benchmark engine (gradstab/bench.py); "
            "install gradstab from a checkout that has it",
            file=sys.stderr,
        )
        return 2
    code = bench_module.main(list(argv))
    return 0 if code is None else int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from gradstab import demo

        return demo.main(rest)
    if command == "bench":
        return bench(rest)
    if command == "check":
        from gradstab import selfcheck

        return selfcheck.main(rest)
    if command == "experiment":
        from gradstab import experiment

        return experiment.main(rest)
    if command == "info":
        argparse.ArgumentParser(
            prog="python -m gradstab info", description=info.__doc__
        ).parse_args(rest)
        return info()
    if command == "build":
        return build(rest)
    print(f"gradstab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
