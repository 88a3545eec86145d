"""The stability benchmark of docs/evidence.md: ``python -m gradstab experiment NAME``.

A small decoder-only GPT (byte-level, pre-LayerNorm, learned positions, no QK-norm) learns
Python's own standard-library sources with AdamW under six protections: none,
``clip_grad_norm_(1.0)``, ZClip (written here from its published rule), ``GradientStabilizer()``,
``GradientStabilizer(spike_guard=10)`` and ``StabilizedAdamW``; over a learning-rate grid, a
weight-decay grid and a few long runs, seeds paired across methods. Modules:

- ``model``: the GPT; ``data``: the text and its split; ``zclip``: ZClip;
- ``metrics``: the definitions (pure functions of the recorded curves);
- ``runner``: presets, one run, the resumable store (``runs.jsonl``), the run lists;
- ``report``: markdown tables and plots; ``cli``: the command line.
"""

from gradstab.experiment.cli import main

__all__ = ["main"]
