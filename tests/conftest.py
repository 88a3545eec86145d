import os
import random

import pytest
import torch

from gradstab import _ops
from gradstab.selfcheck import GRAD_TOLERANCE

# Backends of gradstab.functional.stabilize_ that this machine can run on CPU tensors.
CPU_BACKENDS = ["torch"] + (["compiled"] if _ops.has_kernel("cpu") else [])

# Tolerances against the float64 reference: the relative error a correct kernel can make in the
# output dtype (its rounding plus the factor's), applied elementwise with atol = rtol * max|x|;
# `python -m gradstab check` holds the kernels to the same table.
RTOL = GRAD_TOLERANCE
DTYPES = list(RTOL)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or GRADSTAB_TEST_SEED), printed so that a failure can be replayed."""
    value = int(os.environ.get("GRADSTAB_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed: GRADSTAB_TEST_SEED={value}")
    torch.manual_seed(value)
    return value
