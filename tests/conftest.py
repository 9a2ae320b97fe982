"""Shared test fixtures and the skip rules for GPU and CuTeDSL tests (each skip says why)."""
import os

import pytest
import torch

from nvfp4lib.kernels.cute_compile import cute_available

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (Hopper sm_90 for our kernels); this machine has none. Run on a GPU host: see README",
)
requires_cute = pytest.mark.skipif(
    not cute_available(), reason="nvidia-cutlass-dsl is not installed (pip install -e '.[cute]')"
)
requires_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU (sm_90): the sm_90a kernels run only there",
)
requires_blackwell = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10),
    reason="needs a Blackwell GPU (sm_100): none exists here, the sm_100a path is compile-verified only",
)


@pytest.fixture
def fresh_seed(request):
    """A seed that differs per test and per run (printed on failure), so inputs are never the same twice."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed
