"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv 2504.02507), written here from its published rule, for comparison only.

The rule, on the total gradient norm ``n_t`` (all gradients together, like ``clip_grad_norm_``),
in the paper's "z-score" mode with its "adaptive scaling" (reciprocal) threshold:

- **warm-up**, the first ``warmup_steps`` steps: collect the norms; the gradients are clipped to
  the fixed ``warmup_max_norm`` (the reference code's ``max_grad_norm``, 1.0 in its usage
  example), as ``clip_grad_norm_`` would. At the last warm-up step the statistics start as the
  mean ``mu`` and the population variance ``s2`` of the collected norms.
- **after**: ``sigma = sqrt(s2)``, ``z = (n - mu) / (sigma + eps)``. If ``z > z_thresh`` the
  gradient is clipped to ``c = mu + z_thresh^2 * sigma / z`` (the larger the outlier, the closer
  to the mean it is clipped), that is multiplied by ``c / (n + 1e-6)``; otherwise ``c = n`` and it
  is left alone. Then ``mu <- alpha mu + (1 - alpha) c`` and ``s2 <- alpha s2 + (1 - alpha)
  (c - mu)^2`` with the *updated* ``mu``: the statistics see the clipped norm.

Defaults are the paper's: ``alpha=0.97, z_thresh=2.5, warmup_steps=25, eps=1e-6``.

Two choices where the rule is silent, both documented in docs/evidence.md:

- after warm-up no fixed ceiling applies. The reference code, given ``max_grad_norm``, also caps
  every later threshold at it; with 1.0 that would make this arm ``clip_grad_norm_(1.0)`` plus the
  z-score rule, not a threshold-free alternative;
- a non-finite norm (a float16 overflow, which a GradScaler will skip) changes neither the
  gradients nor the statistics. The reference code feeds it to the statistics, which then stay
  NaN for good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ZClip"]


class ZClip:
    """Adaptive clipping of the total gradient norm by its z-score (see the module docstring).

    Args:
        alpha: decay of the EMA of the norm's mean ``mu`` and variance ``s2`` (default 0.97).
        z_thresh: z-score above which a norm is clipped (default 2.5).
        warmup_steps: steps whose norms initialize ``mu`` and ``s2`` (default 25).
        warmup_max_norm: fixed ``clip_grad_norm_`` threshold during warm-up (default 1.0;
            ``None``: no clipping during warm-up).
        eps: added to ``sigma`` in the z-score (default 1e-6).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        warmup_max_norm: float | None = 1.0,
        eps: float = 1e-6,
    ) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"ZClip: alpha must be in [0, 1), got {alpha}")
        if not z_thresh > 0.0:
            raise ValueError(f"ZClip: z_thresh must be > 0, got {z_thresh}")
        if warmup_steps < 1:
            raise ValueError(f"ZClip: warmup_steps must be >= 1, got {warmup_steps}")
        if warmup_max_norm is not None and not warmup_max_norm > 0.0:
            raise ValueError(f"ZClip: warmup_max_norm must be > 0, got {warmup_max_norm}")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.warmup_max_norm = warmup_max_norm
        self.eps = eps
        self.warmup_norms: list[float] = []
        self.mean: float | None = None  # mu; None until warm-up is over
        self.var: float | None = None  # s2

    def target_norm(self, norm: float) -> float:
        """Feeds one step's total norm to the rule; returns the norm to clip the gradient to
        (``norm`` itself: leave it alone)."""
        if not math.isfinite(norm):
            return norm
        if self.mean is None or self.var is None:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) == self.warmup_steps:
                count = len(self.warmup_norms)
                self.mean = sum(self.warmup_norms) / count
                self.var = sum((x - self.mean) ** 2 for x in self.warmup_norms) / count
                self.warmup_norms = []
            if self.warmup_max_norm is None:
                return norm
            return min(norm, self.warmup_max_norm)
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        clipped = self.mean + self.z_thresh**2 * std / z if z > self.z_thresh else norm
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (clipped - self.mean) ** 2
        return clipped

    @torch.no_grad()
    def apply_(self, grads: Sequence[Tensor], norm: float) -> float:
        """Clips ``grads`` (whose total norm is ``norm``) in place; returns the factor applied."""
        target = self.target_norm(norm)
        if not math.isfinite(norm) or norm <= target:
            return 1.0
        factor = target / (norm + 1e-6)
        torch._foreach_mul_(list(grads), factor)
        return factor
