"""gradstab::integer_power (csrc/integer_power.h), the gamma^k of every backend's bias correction,
against the C library's pow and powl (tests/integer_power_harness.cpp, built with the host
compiler: no GPU needed). It replaces pow so that the CPU and CUDA kernels get the same bits."""

from __future__ import annotations

import re

import pytest

from tests import harness


@pytest.mark.skipif(harness.CXX is None, reason="no C++ compiler")
def test_within_one_ulp_of_pow_for_every_k_up_to_a_million(tmp_path):
    exe = harness.build("integer_power_harness.cpp", tmp_path)
    out = harness.run(exe, "300000")
    print(out)
    summary = re.search(r"max (\d+) ulp from pow, ([0-9.]+) ulp from powl", out)
    assert summary is not None, out
    assert int(summary.group(1)) <= 1
    # Normal results are the correctly rounded x^k, up to the long double reference's error.
    assert float(summary.group(2)) <= 0.5 + 2**-9
    passed = re.search(r"(\d+) checks passed", out)
    assert passed is not None and int(passed.group(1)) > 10 * 10**6, out
