"""The index arithmetic of the CUDA kernels, run on the host (no GPU needed).

csrc/cuda/multi_tensor_plan.h is free of CUDA and torch headers so that the host compiler can
build the very functions the kernels call; tests/cuda_plan_harness.cpp exercises them.
"""

from __future__ import annotations

import pytest

from tests import harness


@pytest.mark.skipif(harness.CXX is None, reason="no C++ compiler")
def test_launcher_index_arithmetic(tmp_path):
    out = harness.run(harness.build("cuda_plan_harness.cpp", tmp_path))
    assert out.strip().endswith("checks passed"), out
