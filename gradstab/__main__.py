"""Command line: ``python -m gradstab demo | bench | info | check | experiment`` (also
installed as ``gradstab``)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

USAGE = """\
usage: python -m gradstab {demo,bench,info,check,experiment} [options]

  demo   train a small language model four ways (no protection, clip_grad_norm_,
         GradientStabilizer, GradientStabilizer(spike_guard=10)) with injected gradient
         spikes and a learning-rate sweep; print a table and write a PNG
         (python -m gradstab demo --help)
  bench  benchmark the implementations side by side (python -m gradstab bench --help)
  info   versions, the backend GradientStabilizer would use, build flags, CUDA, threads
  check  the compiled ops on this machine's GPU (or --device cpu) against a float64 reference
         of the contract: a pass/fail table, exit status 1 on any failure
         (python -m gradstab check --help)
  experiment NAME
         the stability benchmark of docs/evidence.md: a small GPT trained with no protection,
         clip_grad_norm_, ZClip, GradientStabilizer and StabilizedAdamW over learning-rate and
         weight-decay grids (python -m gradstab experiment --help)
"""


def info() -> int:
    """Prints what a bug report needs: versions, backend, build flags, CUDA, threads."""
    import torch

    import gradstab
    from gradstab import _ops

    cuda = torch.cuda.is_available()
    lines = [
        f"gradstab {gradstab.__version__} ({gradstab.__file__})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"python {platform.python_version()} ({sys.executable})",
        f"backend: {gradstab.GradientStabilizer().backend}",
        f"extension: {_ops.build_info()}",
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
    print(f"gradstab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
