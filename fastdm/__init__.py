"""fastdm: diffusion-model inference without PyTorch."""

from .runtime import dtypes
from .runtime.dtypes import bfloat16, float16, float32
from .runtime.errors import FastdmError

__version__ = "0.1.0"
__all__ = ["FastdmError", "bfloat16", "dtypes", "float16", "float32"]
