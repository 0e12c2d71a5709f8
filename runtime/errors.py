"""Exception types a user can trigger. One class per cause; each message says what to do."""


class FastdmError(Exception):
    """Base class of every error fastdm raises on purpose."""


class CudaError(FastdmError):
    """A CUDA driver or kernel call failed; `name` is the CUDA error name (e.g. CUDA_ERROR_ILLEGAL_ADDRESS)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


class NoGpuError(FastdmError):
    """A GPU operation was asked for where no GPU or no kernel library is available."""


class OutOfMemoryError(FastdmError):
    """The GPU could not hold an allocation."""


class UnsupportedDtypeError(FastdmError):
    """A tensor or checkpoint uses a dtype this operation cannot take."""


class ShapeError(FastdmError):
    """Tensor shapes do not fit an operation or a model."""


class SafetensorsError(FastdmError):
    """A .safetensors file or index is unreadable, truncated, or does not hold what was asked for."""


class ModelLayoutError(FastdmError):
    """A model folder or checkpoint is not in a layout fastdm knows, or lacks a component or tensor."""


class InvalidArgumentError(FastdmError, ValueError):
    """An option has a value the operation does not accept (unknown activation, stride < 1, ...)."""


class CaptureError(FastdmError):
    """Work could not be recorded into a CUDA graph (it synchronised, copied from pageable host memory, kept a
    tensor it allocated during the capture, ...). Run it eagerly: set FASTDM_CUDA_GRAPHS=0."""
