"""GPU tests carry @pytest.mark.gpu and are skipped where no GPU or no kernel library is present."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A random stream of its own for every test and parametrisation, the same on every run (seeded by the test's
    node id, not by Python's per-process string hash)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def gpu_available() -> bool:
    try:
        from fastdm.runtime import cuda

        from fastdm import kernels
    except ImportError:
        return False
    return cuda.is_available() and kernels.available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the fastdm kernel library")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
