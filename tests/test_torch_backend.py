"""The torch backend's own paths: 16-bit CPU norms in pieces through a reused buffer."""

from __future__ import annotations

import pytest
import torch

from gradstab import _torch_backend
from gradstab import functional as F
from tests.helpers import assert_grads_close
from tests.reference import ReferenceStabilizer


def half_grads(dtype: torch.dtype, gen: torch.Generator, piece: int) -> list[torch.Tensor]:
    """Sizes around one piece and several, a large strided view, small and empty tensors."""
    sizes = [piece - 1, piece, piece + 1, 3 * piece + 7, 5, 0]
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 30).to(dtype) for n in sizes]
    wide = (torch.randn(2 * piece + 3, 2, generator=gen, dtype=torch.float64) * 30).to(dtype)
    return [*grads, wide[:, 1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("piece", "buffer"),
    [(64, 150), (64, 10_000), (None, None)],
    ids=["batches", "one-batch", "real-sizes"],
)
def test_half_norms_in_pieces_match_reference(dtype, piece, buffer, seed, monkeypatch):
    if piece is not None:
        monkeypatch.setattr(_torch_backend, "HALF_NORM_PIECE", piece)
        monkeypatch.setattr(_torch_backend, "HALF_NORM_BUFFER", buffer)
    gen = torch.Generator().manual_seed(seed)
    grads = half_grads(dtype, gen, _torch_backend.HALF_NORM_PIECE)
    state = F.init_state(grads)
    ref = ReferenceStabilizer(len(grads))
    for step in range(2):
        grads = half_grads(dtype, gen, _torch_backend.HALF_NORM_PIECE)
        expected, ref_norms = ref.step(grads)
        norms = F.stabilize_(grads, state, backend="torch")
        assert_grads_close(grads, expected, dtype, f"seed={seed} step={step}")
        # float32 accumulation: far tighter than a 16-bit result (2^-9 for bfloat16); torch's
        # float32 reduction of a piece of 2^20 elements is good to about 3e-5.
        rtol = 2e-6 if piece is not None else 1e-4
        torch.testing.assert_close(
            norms.double(), torch.tensor(ref_norms, dtype=torch.float64), rtol=rtol, atol=0
        )


def test_half_norms_do_not_change_the_gradients(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = half_grads(torch.bfloat16, gen, _torch_backend.HALF_NORM_PIECE)
    before = [g.clone() for g in grads]
    _torch_backend._half_norms_cpu(grads)
    assert all(torch.equal(a, b) for a, b in zip(before, grads))
