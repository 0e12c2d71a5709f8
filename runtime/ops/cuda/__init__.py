"""GPU backend of runtime.ops: the same functions as ops.cpu, on device Tensors, running library kernels."""

from .attention import attention
from .conv import conv2d
from .elementwise import add, gated_residual, gelu, gelu_mul, modulate, mul, quick_gelu, silu, softmax
from .gemm import linear, linear_gated_residual, matmul
from .layout import cast, concat, contiguous, embedding, permute, timestep_embedding, upsample_nearest2x
from .norms import (
    add_group_stats,
    concat_group_stats,
    group_norm,
    layer_norm,
    layer_norm_modulate,
    qk_norm_rope,
    rms_norm,
    rope,
)

__all__ = [
    "add", "add_group_stats", "attention", "cast", "concat", "concat_group_stats", "contiguous", "conv2d", "embedding",
    "gated_residual", "gelu", "gelu_mul", "group_norm", "layer_norm", "layer_norm_modulate", "linear",
    "linear_gated_residual", "matmul", "modulate", "mul", "permute", "qk_norm_rope", "quick_gelu", "rms_norm", "rope",
    "silu", "softmax", "timestep_embedding", "upsample_nearest2x",
]
