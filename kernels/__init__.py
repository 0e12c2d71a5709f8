"""The CUDA kernel library (libfastdm_kernels.so), loaded with ctypes, and the signature of every entry point.

Each entry point returns an int status (see kernels/common.cuh); `call` checks it and raises CudaError.
Where the library is missing (no nvcc at install time, or a CPU-only machine) `library()` raises NoGpuError
with what to do; nothing else in fastdm needs it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..runtime.errors import CudaError, NoGpuError

LIB_NAME = "libfastdm_kernels.so"

P = ctypes.c_void_p  # device pointer or stream handle
I = ctypes.c_int
I64 = ctypes.c_int64
F = ctypes.c_float
D = ctypes.c_double

# name -> argument types; every function returns int. Grouped by the .cu file that defines it.
SIGNATURES: dict[str, list] = {
    # status.cu
    "fdm_abi_version": [],
    "fdm_has_sm90": [],
    # -- elementwise.cu / norms.cu / rope.cu / misc (hand-written kernels) --
    # -- gemm (gemm_sm80.cu, sm90/gemm_sm90.cu) --
    # -- attention (attention.cu) --
}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    out = []
    if os.environ.get("FASTDM_KERNELS_LIB"):
        out.append(Path(os.environ["FASTDM_KERNELS_LIB"]))
    out.append(here / LIB_NAME)
    return out


def library() -> ctypes.CDLL:
    """The loaded kernel library; raises NoGpuError (once per call site, clearly) where it cannot be loaded."""
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is None:
        for path in _candidates():
            if path.exists():
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as e:
                    _load_error = f"could not load {path}: {e}"
                    break
                for name, argtypes in SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes = argtypes
                    fn.restype = I
                lib.fdm_error_name.argtypes = [I]
                lib.fdm_error_name.restype = ctypes.c_char_p
                lib.fdm_last_error_message.argtypes = []
                lib.fdm_last_error_message.restype = ctypes.c_char_p
                _lib = lib
                return lib
        else:
            _load_error = (
                f"the CUDA kernel library ({LIB_NAME}) is not built: fastdm was installed without nvcc, so only "
                "the CPU reference backend works. Install the CUDA toolkit and reinstall (pip install .), or set "
                "FASTDM_KERNELS_LIB to a built library; use device='cpu' meanwhile."
            )
    raise NoGpuError(_load_error)


def available() -> bool:
    try:
        library()
        return True
    except NoGpuError:
        return False


def call(name: str, *args) -> None:
    """Call entry point `name` and raise CudaError if it reports a failure."""
    lib = library()
    status = getattr(lib, name)(*args)
    if status != 0:
        err = lib.fdm_error_name(status).decode()
        detail = lib.fdm_last_error_message().decode() if status < 0 else "kernel launch or execution failed"
        raise CudaError(err, f"{name}: {detail}")
