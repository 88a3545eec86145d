"""A float64 reference of GradientStabilizer (the contract of docs/design.md), written for reading.

Plain Python over one tensor at a time: no fusion, no foreach, no tricks. Every backend is
compared against this, by the test suite and by ``python -m gradstab check`` (gradstab.selfcheck).
The gradient values are taken exactly as given (whatever their dtype) and everything after that
is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RefState:
    m: float = 0.0
    v: float = 0.0
    k: int = 0


@dataclass
class ReferenceStabilizer:
    num_tensors: int
    gamma1: float = 0.6
    gamma2: float = 0.999
    eps: float = 1e-12
    bias_correction: bool = True
    granularity: str = "param"
    nonfinite: str = "zero"
    spike_guard: float | None = None
    states: list[RefState] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = 1 if self.granularity == "global" else self.num_tensors
        self.states = [RefState() for _ in range(count)]

    def _update(self, state: RefState, n: float) -> tuple[str, float]:
        """Returns ("scale", factor), ("zero", 0) or ("leave", 1) and updates ``state``."""
        if not math.isfinite(n):
            return ("zero", 0.0) if self.nonfinite == "zero" else ("leave", 1.0)
        if n == 0.0:
            return ("leave", 1.0)
        fed = min(n, 1e150)
        if self.spike_guard is not None and state.k > 0:
            v_prev = state.v
            if self.bias_correction:
                v_prev = v_prev / (1.0 - self.gamma2**state.k)
            fed = min(fed, self.spike_guard * math.sqrt(v_prev))
        state.k += 1
        state.m = self.gamma1 * state.m + (1.0 - self.gamma1) * fed
        state.v = self.gamma2 * state.v + (1.0 - self.gamma2) * fed * fed
        m_hat, v_hat = state.m, state.v
        if self.bias_correction:
            m_hat = m_hat / (1.0 - self.gamma1**state.k)
            v_hat = v_hat / (1.0 - self.gamma2**state.k)
        return ("scale", (m_hat / (math.sqrt(v_hat) + self.eps)) / max(n, self.eps))

    def step(
        self, grads: list[Tensor], found_inf: bool = False
    ) -> tuple[list[Tensor], list[float]]:
        """One step; returns the expected float64 gradients and the per-tensor norms."""
        g64 = [g.detach().to(torch.float64).clone() for g in grads]
        norms = [math.sqrt(float((g * g).sum())) for g in g64]
        if found_inf:
            return g64, norms
        if self.nonfinite == "raise" and not all(math.isfinite(n) for n in norms):
            raise FloatingPointError("reference: non-finite norm")
        if self.granularity == "global":
            total = math.sqrt(sum(n * n for n in norms))
            actions = [self._update(self.states[0], total)] * len(g64)
        else:
            actions = [self._update(s, n) for s, n in zip(self.states, norms)]
        out = []
        for g, (action, factor) in zip(g64, actions):
            if action == "zero":
                out.append(torch.zeros_like(g))
            elif action == "scale":
                out.append(g * factor)
            else:
                out.append(g)
        return out, norms
