"""Helpers shared by the ops.cuda tests: dtype names, uploads, random inputs and NaN-poisoned free memory."""

import ml_dtypes
import numpy as np
from fastdm.runtime import cuda, memory
from fastdm.runtime.tensor import Tensor
from numerics import randn

NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
DTYPES = list(NP)


def oc():
    """runtime.ops.cuda, imported only where a GPU test runs (it needs the kernel library)."""
    from fastdm.runtime.ops import cuda as ops_cuda

    return ops_cuda


def gpu(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a), device="cuda")


def rand(rng, dtype: str, *shape, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return (randn(rng, *shape, scale=scale) + np.float32(shift)).astype(NP[dtype])


def poisoned(fn, *args, **kwargs):
    """fn(*args, **kwargs) right after the pool's free memory (a block three times the size of all tensor
    arguments, at least 4 MiB) was filled with 0xFF bytes: NaN in every float type, so outputs and workspace the
    kernels leave unwritten show."""
    nbytes = 0
    for a in list(args) + list(kwargs.values()):
        for t in a if isinstance(a, (list, tuple)) else [a]:
            if isinstance(t, Tensor):
                nbytes += t.nbytes
    nbytes = max(3 * nbytes, 1 << 22)
    dev = cuda.current_device()
    stream = cuda.current_stream(dev)
    buf = memory.allocator(dev).alloc(nbytes, stream)
    cuda.memset_d8(buf.ptr, 0xFF, nbytes, stream)
    buf.free()
    return fn(*args, **kwargs)


def group_ids(cases) -> list[str]:
    """pytest ids of GroupNorm cases [(shape, groups), ...]: "2x32x32x640-g32"."""
    return ["x".join(map(str, s)) + f"-g{g}" for s, g in cases]
