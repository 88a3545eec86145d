"""The benchmark engine: gradient stabilization side by side with ``clip_grad_norm_`` and the floor.

``python -m gradstab.bench`` (or ``python -m gradstab bench``) builds gradient lists with the tensor
shapes of real models (the *presets*) and times, in one run with interleaved repetitions, every
registered *implementation* on them:

- ``loop``: a per-parameter Python loop written from the formula with the structure of the
  authors' code: per tensor one norm, one host-side check of it (``.item()``), a Python update
  of (m, v, k), one ``mul_``;
- ``torch``: ``gradstab.functional.stabilize_(backend="torch")`` (``torch._foreach_*`` ops);
- ``compiled``: ``gradstab.functional.stabilize_(backend="compiled")`` (the ``gradstab._C`` op);
- ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(foreach=True)``, the cost reference: it
  moves the same bytes (one read of every gradient for the norm, one read and one write to scale);
- ``floor``: those bytes divided by the copy bandwidth measured in the same run, by timing a
  ``copy_`` of a buffer as large as all the gradients (which reads and writes it once) the same way
  as the implementations.

Every repetition first restores the gradients from a pristine copy (not timed), so each timed step
sees the same values. The table reports the median over the repetitions and three ratios: time
over ``clip_grad_norm_``, time over the floor, and the loop's time over this one (speed-up).

Presets and implementations are registries (``register_preset``, ``register_implementation``):
a preset names the device it is for and builds a ``Workload``; an implementation says which
workload kinds it handles. The ``"adamw"`` kind (presets ``*-adamw``) times whole optimizer
steps instead: ``torch.optim.AdamW(fused=True)`` alone (the reference), AdamW(foreach) after
``clip_grad_norm_``, ``StabilizedOptimizer(AdamW(fused=True))`` and ``StabilizedAdamW``
(docs/adamw.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradstab import _ops
from gradstab import functional as F

__all__ = [
    "IMPLEMENTATIONS",
    "PRESETS",
    "Implementation",
    "Preset",
    "Result",
    "Workload",
    "main",
    "register_implementation",
    "register_preset",
    "run",
]

Shape = tuple[int, ...]
DEFAULT_REPEATS = 9
MIN_REPEATS = 1
# Every tensor of a workload starts at a multiple of this many bytes in the pristine buffer.
ALIGN_BYTES = 64
# The paper's defaults, used by every implementation.
GAMMA1, GAMMA2, EPS = 0.6, 0.999, 1e-12
CLIP_MAX_NORM = 1.0


# ----------------------------------------------------------------------------------------------
# Workloads and presets


@dataclass
class Workload:
    """What one preset gives the implementations.

    Attributes:
        kind: which implementations apply ("grads": a list of gradients to stabilize).
        tensors: the gradients; every implementation changes them in place.
        floor_bytes: the bytes a perfect implementation must move through memory.
        restore: puts ``tensors`` back to their pristine values (between repetitions, not timed).
        copy: copies ``copy_bytes`` bytes from one buffer to another (reads and writes each byte
            once): the bandwidth probe that the floor is derived from.
        copy_bytes: the size of that copy.
        params: for the "adamw" kind, the parameters whose ``.grad`` are ``tensors``.
        moments: for the "adamw" kind, AdamW's ``exp_avg``/``exp_avg_sq`` of each parameter,
            shared by every implementation (so the moments take memory once).
    """

    kind: str
    tensors: list[Tensor]
    floor_bytes: int
    restore: Callable[[], None]
    copy: Callable[[], None]
    copy_bytes: int
    params: list[Tensor] = field(default_factory=list)
    moments: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class Preset:
    """A named benchmark input for one device type.

    Attributes:
        name: what ``--preset`` selects.
        device: ``"cpu"`` or ``"cuda"``.
        description: one line for the table header (what the shapes are taken from).
        shapes: the tensor shapes, in model order.
        dtype: the dtype of every gradient.
        kind: the workload kind (default ``"grads"``).
        make_workload: builds the workload (default: ``gradient_workload``).
    """

    name: str
    device: str
    description: str
    shapes: Callable[[], list[Shape]]
    dtype: torch.dtype
    kind: str = "grads"
    make_workload: Callable[[Preset, torch.device, int], Workload] | None = None

    def build(self, device: torch.device, seed: int = 0) -> Workload:
        maker = self.make_workload or gradient_workload
        return maker(self, device, seed)


PRESETS: dict[str, dict[str, Preset]] = {"cpu": {}, "cuda": {}}


def register_preset(preset: Preset) -> Preset:
    """Adds ``preset`` to ``PRESETS[preset.device]`` (replacing one of the same name)."""
    if preset.device not in PRESETS:
        raise ValueError(f"gradstab.bench: unknown device type {preset.device!r}")
    PRESETS[preset.device][preset.name] = preset
    return preset


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def gradient_workload(preset: Preset, device: torch.device, seed: int = 0) -> Workload:
    """Random gradients of ``preset.shapes`` (each with its own log-uniform scale) on ``device``.

    The pristine values live in one flat byte buffer; the floor's copy reads that buffer and
    writes a second one of the same size. Floor bytes: one read of every gradient for the norms
    plus one read and one write to rescale it.
    """
    shapes = preset.shapes()
    dtype = preset.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += _aligned(math.prod(shape) * elem)
    total = max(total, ALIGN_BYTES)
    pristine = torch.empty(total, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    grads, views = [], []
    for shape, offset in zip(shapes, offsets):
        numel = math.prod(shape)
        view = pristine[offset : offset + numel * elem].view(dtype).view(shape)
        scale = 10 ** (torch.rand((), generator=gen, device=device).item() * 4 - 2)
        torch.randn(shape, generator=gen, device=device, dtype=dtype, out=view)
        view.mul_(scale)
        views.append(view)
        grads.append(torch.empty_like(view))
    scratch = torch.empty_like(pristine)
    # Copy as 4-byte words: the probe then runs the same vectorized copy loop as a float32 copy_.
    src, dst = pristine.view(torch.int32), scratch.view(torch.int32)

    def restore() -> None:
        torch._foreach_copy_(grads, views)

    restore()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return Workload(
        kind="grads",
        tensors=grads,
        floor_bytes=3 * grad_bytes,
        restore=restore,
        copy=lambda: dst.copy_(src),
        copy_bytes=total,
    )


def gpt2_small_shapes() -> list[Shape]:
    """GPT-2 small (124M): 148 tensors, 124,439,808 values (HF order; lm_head tied to wte)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, c_proj
    return [*shapes, (d,), (d,)]  # ln_f


def resnet50_shapes() -> list[Shape]:
    """torchvision ResNet-50: 161 tensors, 25,557,032 values."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = 4 * width
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # downsample
            in_ch = out_ch
    return [*shapes, (1000, 2048), (1000,)]  # fc


def many_small_shapes(count: int, seed: int = 0) -> list[Shape]:
    """``count`` shapes, a fixed pseudo-random mix: matrices up to 64x256, vectors up to 256."""
    rng = random.Random(seed)
    shapes: list[Shape] = []
    for i in range(count):
        if i % 3 == 2:
            shapes.append((rng.randint(1, 256),))
        else:
            shapes.append((rng.randint(1, 64), rng.randint(1, 256)))
    return shapes


def llama_shapes(
    hidden: int, intermediate: int, kv_dim: int, vocab: int, layers: int, tied: bool
) -> list[Shape]:
    """A Llama-style decoder in HF order: embed, per layer (norm, q, k, v, o, norm, gate, up,
    down), final norm, and lm_head unless tied to the embedding."""
    shapes: list[Shape] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden, hidden), (kv_dim, hidden), (kv_dim, hidden)]
        shapes += [(hidden, hidden), (hidden,)]
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    shapes.append((hidden,))
    if not tied:
        shapes.append((vocab, hidden))
    return shapes


GPT2_DESCRIPTION = "GPT-2 small (124M): 148 fp32 tensors"
register_preset(Preset("gpt2-small", "cpu", GPT2_DESCRIPTION, gpt2_small_shapes, torch.float32))
register_preset(
    Preset("resnet50", "cpu", "ResNet-50: 161 fp32 tensors", resnet50_shapes, torch.float32)
)
register_preset(
    Preset(
        "many-small",
        "cpu",
        "400 fp32 tensors of at most 64x256",
        lambda: many_small_shapes(400),
        torch.float32,
    )
)
register_preset(
    Preset(
        "llama-bf16",
        "cpu",
        "TinyLlama-1.1B shapes (hidden 2048, MLP 5632, 4 KV heads, vocab 32000) "
        "with 6 of its 22 layers: 57 bf16 tensors",
        lambda: llama_shapes(2048, 5632, 256, 32000, layers=6, tied=False),
        torch.bfloat16,
    )
)
register_preset(Preset("gpt2-small", "cuda", GPT2_DESCRIPTION, gpt2_small_shapes, torch.float32))
register_preset(
    Preset(
        "llama-1b",
        "cuda",
        "Llama-3.2-1B shapes (hidden 2048, MLP 8192, 8 KV heads, vocab 128256, tied): "
        "146 bf16 tensors",
        lambda: llama_shapes(2048, 8192, 512, 128256, layers=16, tied=True),
        torch.bfloat16,
    )
)
register_preset(
    Preset(
        "llama-7b",
        "cuda",
        "Llama-2-7B shapes (hidden 4096, MLP 11008, vocab 32000): 291 bf16 tensors",
        lambda: llama_shapes(4096, 11008, 4096, 32000, layers=32, tied=False),
        torch.bfloat16,
    )
)
register_preset(
    Preset(
        "many-small",
        "cuda",
        "2000 fp32 tensors of at most 64x256",
        lambda: many_small_shapes(2000),
        torch.float32,
    )
)


# ----------------------------------------------------------------------------------------------
# Implementations


@dataclass(frozen=True)
class Implementation:
    """One way of doing the work of a workload kind.

    Attributes:
        name: the row label.
        kinds: the workload kinds it handles.
        setup: ``setup(workload, device)`` prepares (state, helpers) and returns the step that
            is timed; the step changes ``workload.tensors`` in place.
        unavailable: ``unavailable(device)`` returns why it cannot run there, or ``None``.
    """

    name: str
    kinds: tuple[str, ...]
    setup: Callable[[Workload, torch.device], Callable[[], Any]]
    unavailable: Callable[[torch.device], str | None] = lambda device: None


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register_implementation(impl: Implementation) -> Implementation:
    """Adds ``impl`` to ``IMPLEMENTATIONS`` (replacing one of that name); rows keep this order."""
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def per_parameter_loop(grads: Sequence[Tensor]) -> Callable[[], None]:
    """The transform as the authors' code is structured: one tensor at a time, with a host sync.

    Per gradient g: n = ||g|| (float32 accumulation), ``n.item()`` (the host-side check of the
    norm), the update of that gradient's (m, v, k) in Python floats, one ``g.mul_``. Non-finite
    norms zero the gradient, zero norms leave it alone (DESIGN.md section 1, default options).
    """
    m = [0.0] * len(grads)
    v = [0.0] * len(grads)
    k = [0] * len(grads)

    def step() -> None:
        for i, g in enumerate(grads):
            n = torch.linalg.vector_norm(g, dtype=torch.float32).item()
            if not math.isfinite(n):
                g.zero_()
                continue
            if n == 0.0:
                continue
            k[i] += 1
            m[i] = GAMMA1 * m[i] + (1 - GAMMA1) * n
            v[i] = GAMMA2 * v[i] + (1 - GAMMA2) * n * n
            m_hat = m[i] / (1 - GAMMA1 ** k[i])
            v_hat = v[i] / (1 - GAMMA2 ** k[i])
            g.mul_(m_hat / (math.sqrt(v_hat) + EPS) / max(n, EPS))

    return step


def _functional(backend: str) -> Callable[[Workload, torch.device], Callable[[], Any]]:
    def setup(workload: Workload, device: torch.device) -> Callable[[], Any]:
        grads = workload.tensors
        state = F.init_state(grads, device=device)
        return lambda: F.stabilize_(
            grads, state, gamma1=GAMMA1, gamma2=GAMMA2, eps=EPS, backend=backend
        )

    return setup


def _grad_holders(workload: Workload) -> list[Tensor]:
    """Stand-ins for parameters, owning no memory, whose ``.grad`` are the workload's tensors
    (for what reads the gradients of parameters: clip_grad_norm_, GradientStabilizer.apply)."""
    holders = []
    for g in workload.tensors:
        holder = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
        holder.grad = g
        holders.append(holder)
    return holders


def _clip_setup(workload: Workload, device: torch.device) -> Callable[[], Any]:
    holders = _grad_holders(workload)
    return lambda: torch.nn.utils.clip_grad_norm_(holders, CLIP_MAX_NORM, foreach=True)


def _apply_setup(workload: Workload, device: torch.device) -> Callable[[], Any]:
    """What users call: ``GradientStabilizer().apply(params)`` (backend "auto"), whose Python
    work per parameter (finding the gradients, checks, state keys) adds to the op's."""
    from gradstab.stabilizer import GradientStabilizer

    holders = _grad_holders(workload)
    stabilizer = GradientStabilizer(gamma1=GAMMA1, gamma2=GAMMA2, eps=EPS)
    return lambda: stabilizer.apply(holders)


def _compiled_unavailable(device: torch.device) -> str | None:
    if not _ops.HAS_EXTENSION:
        return f"gradstab._C {_ops.build_info()}"
    if not _ops.has_kernel(device.type):
        return f"gradstab._C has no {device.type} kernel"
    return None


register_implementation(
    Implementation("loop", ("grads",), lambda w, d: per_parameter_loop(w.tensors))
)
register_implementation(Implementation("torch", ("grads",), _functional("torch")))
register_implementation(
    Implementation("compiled", ("grads",), _functional("compiled"), _compiled_unavailable)
)
register_implementation(Implementation("apply", ("grads",), _apply_setup))
register_implementation(Implementation("clip_grad_norm_", ("grads",), _clip_setup))

# ----------------------------------------------------------------------------------------------
# Whole AdamW steps (the "adamw" kind)


def adamw_workload(preset: Preset, device: torch.device, seed: int = 0) -> Workload:
    """Parameters of ``preset.shapes`` with the gradients of ``gradient_workload`` and shared
    AdamW moments. ``restore`` puts the gradients back (the composition and clipping rescale
    them). Floor bytes: StabilizedAdamW's, AdamW's own traffic (read and write the parameter
    and both moments, read the gradient) plus one more read of the gradient for its norm."""
    workload = gradient_workload(preset, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for g in workload.tensors:
        p = torch.randn(g.shape, generator=gen, device=device, dtype=g.dtype)
        p.grad = g
        workload.params.append(p)
        workload.moments.append({"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
    grad_bytes = sum(g.numel() * g.element_size() for g in workload.tensors)
    workload.kind = "adamw"
    workload.floor_bytes = 8 * grad_bytes
    return workload


def _with_moments(optimizer: torch.optim.Optimizer, workload: Workload, step_device) -> None:
    """Hands ``optimizer`` the workload's moments, with its own step counts on ``step_device``
    (a float32 tensor per parameter, as torch's AdamW keeps them)."""
    for p, moments in zip(workload.params, workload.moments):
        step = torch.zeros((), dtype=torch.float32, device=step_device)
        optimizer.state[p] = {"step": step, **moments}


def _adamw_fused(workload: Workload, device: torch.device) -> Callable[[], Any]:
    opt = torch.optim.AdamW(workload.params, fused=True)
    _with_moments(opt, workload, device)
    return opt.step


def _adamw_foreach_clip(workload: Workload, device: torch.device) -> Callable[[], Any]:
    opt = torch.optim.AdamW(workload.params, foreach=True)
    _with_moments(opt, workload, "cpu")

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(workload.params, CLIP_MAX_NORM, foreach=True)
        opt.step()

    return step


def _stabilized_optimizer(workload: Workload, device: torch.device) -> Callable[[], Any]:
    from gradstab.optim import StabilizedOptimizer

    inner = torch.optim.AdamW(workload.params, fused=True)
    _with_moments(inner, workload, device)
    return StabilizedOptimizer(inner).step


def _stabilized_adamw(workload: Workload, device: torch.device) -> Callable[[], Any]:
    from gradstab.adamw import StabilizedAdamW

    opt = StabilizedAdamW(workload.params)
    _with_moments(opt, workload, device)
    return opt.step


def _adamw_kernel_unavailable(device: torch.device) -> str | None:
    if not _ops.has_kernel(device.type, "stabilized_adamw_"):
        return f"gradstab._C has no {device.type} kernel of stabilized_adamw_"
    return None


register_implementation(Implementation("adamw_fused", ("adamw",), _adamw_fused))
register_implementation(Implementation("adamw_foreach_clip", ("adamw",), _adamw_foreach_clip))
register_implementation(Implementation("stabilized_optimizer", ("adamw",), _stabilized_optimizer))
register_implementation(
    Implementation("stabilized_adamw", ("adamw",), _stabilized_adamw, _adamw_kernel_unavailable)
)


def _adamw_preset(base: Preset) -> Preset:
    """The AdamW-step twin of a gradient preset: ``<name>-adamw``, same shapes and dtype."""
    return register_preset(
        Preset(
            f"{base.name}-adamw",
            base.device,
            f"one AdamW step on {base.description}",
            base.shapes,
            base.dtype,
            kind="adamw",
            make_workload=adamw_workload,
        )
    )


_adamw_preset(PRESETS["cpu"]["gpt2-small"])
for _name in ("gpt2-small", "llama-1b", "llama-7b"):
    _adamw_preset(PRESETS["cuda"][_name])

REFERENCE = "clip_grad_norm_"
BASELINE = "loop"
FLOOR = "floor"
# Per workload kind: (reference, its column title, baseline, its column title). Every time is
# divided by the reference's; the baseline's time is divided by every time.
RATIOS = {
    "grads": (REFERENCE, "vs clip", BASELINE, "loop speed-up"),
    "adamw": ("adamw_fused", "vs AdamW(fused)", "adamw_foreach_clip", "foreach+clip speed-up"),
}
COPY = "copy"  # the bandwidth probe's own row of timings, turned into the floor


# ----------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Times one call on the device: wall clock on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds that ``fn()`` takes, from a quiet device to the end of its work."""
        self.sync()
        if self.cuda:
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


@dataclass
class Result:
    """The timings of one implementation (or the floor) on one preset."""

    preset: str
    implementation: str
    times_ms: list[float] = field(default_factory=list)
    median_ms: float = math.nan
    note: str = ""

    def finish(self) -> None:
        if self.times_ms:
            self.median_ms = statistics.median(self.times_ms)


@dataclass
class PresetRun:
    """Everything measured on one preset."""

    preset: Preset
    tensors: int
    elements: int
    grad_bytes: int
    copy_gbps: float
    results: dict[str, Result]

    def ratio(self, name: str, other: str) -> float:
        a, b = self.results.get(name), self.results.get(other)
        if a is None or b is None or not (b.median_ms > 0):
            return math.nan
        return a.median_ms / b.median_ms


def run_preset(
    preset: Preset,
    device: torch.device,
    impl_names: Sequence[str],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> PresetRun:
    """Times ``impl_names`` and the copy probe on ``preset``, interleaved, ``repeats`` times each.

    Each repetition visits the implementations in a rotated order (so none always runs first
    after the restore), restores the gradients before every timed step, and times only the step.
    """
    workload = preset.build(device)
    timer = Timer(device)
    steps: dict[str, Callable[[], Any]] = {}
    results: dict[str, Result] = {}
    for name in impl_names:
        impl = IMPLEMENTATIONS[name]
        if workload.kind not in impl.kinds:
            continue
        reason = impl.unavailable(device)
        if reason is not None:
            results[name] = Result(preset.name, name, note=f"n/a: {reason}")
            continue
        steps[name] = impl.setup(workload, device)
        results[name] = Result(preset.name, name)
    steps[COPY] = workload.copy
    results[COPY] = Result(preset.name, COPY)

    order = list(steps)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for name in order:
                workload.restore()
                timer(steps[name])
        for rep in range(repeats):
            shift = rep % len(order)
            for name in order[shift:] + order[:shift]:
                workload.restore()
                results[name].times_ms.append(timer(steps[name]))
            log(f"  {preset.name}: repetition {rep + 1}/{repeats}")
    finally:
        if gc_was_enabled:
            gc.enable()
    for r in results.values():
        r.finish()

    copy = results.pop(COPY)
    gbps = 2 * workload.copy_bytes / (copy.median_ms * 1e-3) / 1e9
    floor = Result(preset.name, FLOOR, note=f"copy bandwidth {gbps:.1f} GB/s")
    # The floor's "repetitions" are the copy's, scaled to the floor's bytes.
    scale = workload.floor_bytes / (2 * workload.copy_bytes)
    floor.times_ms = [t * scale for t in copy.times_ms]
    floor.finish()
    results[FLOOR] = floor
    grads = workload.tensors
    return PresetRun(
        preset=preset,
        tensors=len(grads),
        elements=sum(g.numel() for g in grads),
        grad_bytes=sum(g.numel() * g.element_size() for g in grads),
        copy_gbps=gbps,
        results=results,
    )


# ----------------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict[str, Any]:
    """Hardware, versions, threads, date and load: the header of every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "torch": torch.__version__,
        "gradstab_build": _ops.build_info(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_before"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return info


def _fmt_ms(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"


def records(runs: Sequence[PresetRun], info: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per (preset, implementation): the CSV rows."""
    out = []
    for pr in runs:
        for name, r in pr.results.items():
            out.append(
                {
                    "date": info["date"],
                    "device": info["device"],
                    "threads": info["threads"],
                    "torch": info["torch"],
                    "preset": pr.preset.name,
                    "dtype": str(pr.preset.dtype).replace("torch.", ""),
                    "tensors": pr.tensors,
                    "elements": pr.elements,
                    "grad_bytes": pr.grad_bytes,
                    "implementation": name,
                    "median_ms": round(r.median_ms, 4) if math.isfinite(r.median_ms) else "",
                    "min_ms": round(min(r.times_ms), 4) if r.times_ms else "",
                    "max_ms": round(max(r.times_ms), 4) if r.times_ms else "",
                    "repeats": len(r.times_ms),
                    "vs_clip_grad_norm": _round(pr.ratio(name, REFERENCE)),
                    "vs_floor": _round(pr.ratio(name, FLOOR)),
                    "loop_speedup": _round(pr.ratio(BASELINE, name)),
                    "reference": RATIOS[pr.preset.kind][0],
                    "vs_reference": _round(pr.ratio(name, RATIOS[pr.preset.kind][0])),
                    "baseline": RATIOS[pr.preset.kind][2],
                    "baseline_speedup": _round(pr.ratio(RATIOS[pr.preset.kind][2], name)),
                    "copy_gbps": round(pr.copy_gbps, 2),
                    "note": r.note,
                }
            )
    return out


def _round(x: float) -> float | str:
    return round(x, 4) if math.isfinite(x) else ""


def markdown(runs: Sequence[PresetRun], info: dict[str, Any], repeats: int) -> str:
    """The header and the table of milliseconds and ratios."""
    lines = [
        f"- Date: {info['date']}; device: {info['device']}"
        + (f" ({info['gpu']}, CUDA {info['cuda']})" if "gpu" in info else ""),
        f"- CPU: {info['cpu']}; torch {info['torch']} ({info['threads']} threads); "
        f"Python {info['python']}",
        f"- gradstab._C: {info['gradstab_build']}",
    ]
    if "load_before" in info:
        lines.append(
            f"- Load average (1, 5, 15 min): {info['load_before']} before, "
            f"{info.get('load_after', '?')} after"
        )
    lines.append(f"- Median of {repeats} interleaved repetitions.")
    lines += ["", "Presets:", ""]
    for pr in runs:
        mb = pr.grad_bytes / 1e6
        lines.append(
            f"- `{pr.preset.name}`: {pr.preset.description}; {pr.tensors} tensors, "
            f"{pr.elements / 1e6:.1f}M values, {mb:.1f} MB; copy bandwidth {pr.copy_gbps:.1f} GB/s"
        )
    for kind in dict.fromkeys(pr.preset.kind for pr in runs):
        reference, vs_title, baseline, speedup_title = RATIOS[kind]
        lines += [
            "",
            f"`{vs_title}` = time / {reference} time, `vs floor` = time / floor time, "
            f"`{speedup_title}` = {baseline} time / time.",
            "",
            f"| preset | implementation | median ms | {vs_title} | vs floor | {speedup_title} |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for pr in runs:
            if pr.preset.kind != kind:
                continue
            for name, r in pr.results.items():
                ms = _fmt_ms(r.median_ms) if r.times_ms else r.note
                ratios = (
                    pr.ratio(name, reference),
                    pr.ratio(name, FLOOR),
                    pr.ratio(baseline, name),
                )
                lines.append(
                    f"| {pr.preset.name} | {name} | {ms} | "
                    + " | ".join(_fmt_ratio(x) for x in ratios)
                    + " |"
                )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradstab bench",
        description="Time gradient stabilization against clip_grad_norm_ and the memory floor.",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)"
    )
    parser.add_argument(
        "--preset",
        action="append",
        dest="presets",
        metavar="NAME",
        help="a preset to run (repeatable; default: every preset of the device)",
    )
    parser.add_argument(
        "--impl",
        action="append",
        dest="impls",
        metavar="NAME",
        help=f"an implementation to time (repeatable; default: all of {list(IMPLEMENTATIONS)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed repetitions per implementation (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument("--csv", metavar="FILE", help="also write one row per result to FILE")
    parser.add_argument("--json", metavar="FILE", help="also write header and results to FILE")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run(
    device: str = "cpu",
    presets: Sequence[str] | None = None,
    impls: Sequence[str] | None = None,
    repeats: int = DEFAULT_REPEATS,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[PresetRun], dict[str, Any]]:
    """Runs the benchmark; returns the per-preset runs and the machine header."""
    available = PRESETS[device]
    names = list(presets) if presets else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"gradstab.bench: unknown {device} preset(s) {unknown}; available: {list(available)}"
        )
    impl_names = list(impls) if impls else list(IMPLEMENTATIONS)
    bad = [n for n in impl_names if n not in IMPLEMENTATIONS]
    if bad:
        raise ValueError(
            f"gradstab.bench: unknown implementation(s) {bad}; available: {list(IMPLEMENTATIONS)}"
        )
    if repeats < MIN_REPEATS:
        raise ValueError(f"gradstab.bench: --repeats must be >= {MIN_REPEATS}, got {repeats}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gradstab.bench: --device cuda, but torch sees no CUDA device")
    dev = (
        torch.device(device, torch.cuda.current_device())
        if device == "cuda"
        else torch.device(device)
    )
    info = machine_info(dev)
    runs = []
    with torch.no_grad():
        for name in names:
            log(f"gradstab.bench: {name} on {device}")
            runs.append(run_preset(available[name], dev, impl_names, repeats, log=log))
            if device == "cuda":
                torch.cuda.empty_cache()
    if hasattr(os, "getloadavg"):
        info["load_after"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return runs, info


def main(argv: list[str] | None = None) -> int:
    """``python -m gradstab bench``: prints the markdown table; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        for device, presets in PRESETS.items():
            for p in presets.values():
                print(f"{device:5s} {p.name:12s} {p.description}")
        return 0
    if args.threads is not None and args.threads < 1:
        print("gradstab.bench: --threads must be >= 1", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        runs, info = run(args.device, args.presets, args.impls, args.repeats, log)
    except (ValueError, RuntimeError) as err:
        print(err, file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (or a test)
    print(markdown(runs, info, args.repeats))
    rows = records(runs, info)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": args.repeats, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
