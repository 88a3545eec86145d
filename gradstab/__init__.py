"""gradstab: GradientStabilizer for PyTorch (Huang et al., ICML 2026, arXiv 2502.17055).

Keep each gradient's direction and replace its norm with a statistically stabilized estimate from
running norm statistics, so that rare gradient-norm spikes cannot blow up an update::

    stab = gradstab.GradientStabilizer()
    loss.backward()
    stab.apply(model)
    optimizer.step()
"""

from gradstab import functional
from gradstab.adamw import StabilizedAdamW
from gradstab.optim import StabilizedOptimizer
from gradstab.stabilizer import GradientStabilizer, StabilizerStats

__version__ = "0.1.0"

__all__ = [
    "GradientStabilizer",
    "StabilizedAdamW",
    "StabilizedOptimizer",
    "StabilizerStats",
    "__version__",
    "functional",
]
