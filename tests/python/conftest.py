import os
import random

import pytest
import torch

import flowformer  # noqa: F401  (loads torch.ops.flowformer)


@pytest.fixture
def gen(request):
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("FLOWFORMER_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed {seed} ({request.node.name})")
    return torch.Generator().manual_seed(seed)
