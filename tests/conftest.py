"""GPU tests carry @pytest.mark.gpu and are skipped where no GPU or no kernel library is present."""

import pytest


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
