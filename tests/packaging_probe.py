"""An installation's first use, checked: run with the python of a venv where gradstab is installed
(by tests/test_packaging.py and .ci/packaging_check.sh), from outside the checkout.

It imports gradstab, takes a few GradientStabilizer steps (spikes, a zero and a NaN gradient among
them) with the default backend and with the pure-torch backend on copies of the same gradients,
fails unless both give the same gradients and statistics, and prints one JSON line: the backend,
how gradstab._C came to be, and the wall time of the import and of the first apply.

    python tests/packaging_probe.py [--backend cpu] [--origin install|first-use|...]
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402

import gradstab  # noqa: E402

IMPORTED = time.perf_counter()

SHAPES = [(0,), (1,), (7, 13), (1023,), (97, 3)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", help="fail unless GradientStabilizer().backend is this")
    parser.add_argument("--origin", help="fail unless gradstab._C's build record says this")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(20261206)
    stab = gradstab.GradientStabilizer(spike_guard=10.0)
    oracle = gradstab.GradientStabilizer(spike_guard=10.0, backend="torch")
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    twins = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    first_apply = None
    for step in range(args.steps):
        for i, (p, q) in enumerate(zip(params, twins)):
            g = torch.randn(p.shape, generator=gen) * 10 ** (step % 3 - 1)
            if step == 3 and i == 2:
                g *= 1e4
            if step == 4 and i == 3:
                g.zero_()
            if step == 5 and i == 4:
                g[0, 0] = float("nan")
            p.grad, q.grad = g.clone(), g.clone()
        begin = time.perf_counter()
        stab.apply(params)
        if first_apply is None:
            first_apply = time.perf_counter() - begin
        oracle.apply(twins)
        for i, (p, q) in enumerate(zip(params, twins)):
            where = f"step {step}, grad {i}"
            torch.testing.assert_close(
                p.grad, q.grad, rtol=3e-6, atol=1e-7, msg=lambda m, where=where: f"{where}: {m}"
            )
    state, twin_state = stab.state_dict(), oracle.state_dict()
    # The norms are float32 sums in different orders: the statistics agree to float32 rounding.
    for name in ("m", "v", "k"):
        torch.testing.assert_close(state[name], twin_state[name], rtol=1e-6, atol=0.0)

    from gradstab import _ops

    result = _ops.load()
    record = result.record or {}
    out = {
        "backend": stab.backend,
        "origin": record.get("origin"),
        "extension": result.describe(),
        "library": result.path,
        "import_s": round(IMPORTED - START, 2),
        "first_apply_s": round(first_apply, 2),
        "first_use_s": round(IMPORTED - START + first_apply, 2),
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    failures = [
        f"{name} is {out[name]!r}, expected {wanted!r}"
        for name, wanted in (("backend", args.backend), ("origin", args.origin))
        if wanted is not None and out[name] != wanted
    ]
    if failures:
        print("packaging_probe: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
