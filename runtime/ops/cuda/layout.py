"""ops.cuda copies and layout: contiguous, permute, concat, cast, embedding, upsample_nearest2x,
timestep_embedding (kernels/layout.cu). Copies move raw elements, so they take every dtype."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ... import dtypes
from ...errors import ShapeError, UnsupportedDtypeError
from ...tensor import Tensor, empty
from .. import cpu
from ._common import FLOATS, MAX_DIMS, call, check_float, collapse, contig, empty_like, gpu_device, int64_array, stream

_CASTABLE = FLOATS + (dtypes.float8_e4m3fn, dtypes.float8_e5m2)
_IDS = (dtypes.int32, dtypes.int64)


def _copy(src: Tensor, dst: Tensor) -> None:
    """dst[...] = src[...] for two same-shape, same-dtype GPU tensors with any strides (dst must not overlap src)."""
    if src.numel == 0:
        return
    shape, (ss, ds) = collapse(src.shape, src.strides, dst.strides)
    if len(shape) > MAX_DIMS:  # rare: peel the outermost dim until the rest fits the kernel
        for i in range(src.shape[0]):
            _copy(src[i], dst[i])
        return
    call("fdm_copy_strided", src.data_ptr, dst.data_ptr, len(shape), int64_array(shape), int64_array(ss),
         int64_array(ds), src.itemsize, stream(src.device))


def contiguous(x: Tensor) -> Tensor:
    """A C-contiguous copy of x (x itself when it already is), same dtype."""
    gpu_device("contiguous", x)
    if x.is_contiguous():
        return x
    y = empty_like(x)
    _copy(x, y)
    return y


def permute(x: Tensor, dims: Sequence[int]) -> Tensor:
    """A contiguous copy of x with its axes reordered (numpy.transpose), same dtype."""
    gpu_device("permute", x)
    return contiguous(x.permute(*dims))


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Concatenate along `axis` into a new contiguous tensor of the inputs' (common) dtype."""
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("ops.concat: needs at least one tensor")
    device = gpu_device("concat", *tensors)
    first = tensors[0]
    if not isinstance(axis, (int, np.integer)) or not -first.ndim <= axis < first.ndim:
        raise ShapeError(f"ops.concat: axis {axis!r} is out of range for a tensor with {first.ndim} dims")
    axis = int(axis) % first.ndim
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype:
            raise UnsupportedDtypeError(f"ops.concat: tensor {i} is {t.dtype.name}, tensor 0 is {first.dtype.name}; "
                                        "cast them to one dtype first")
        if t.ndim != first.ndim or any(t.shape[j] != first.shape[j] for j in range(t.ndim) if j != axis):
            raise ShapeError(f"ops.concat: tensor {i} of shape {t.shape} does not match tensor 0 of shape "
                             f"{first.shape} outside axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    out = empty(shape, first.dtype, device)
    start = 0
    for t in tensors:
        n = t.shape[axis]
        if n:
            _copy(t, out.narrow(axis, start, n))
        start += n
    return out


def cast(x: Tensor, dtype) -> Tensor:
    """x converted to `dtype` between float32, float16, bfloat16, float8_e4m3fn and float8_e5m2, rounding to nearest
    even; fp8 does not saturate (as ml_dtypes: e4m3fn overflow -> NaN, e5m2 overflow -> inf). A contiguous result
    (x itself when it already has that dtype and is contiguous)."""
    device = gpu_device("cast", x)
    target = dtypes.dtype(dtype)
    if x.dtype not in _CASTABLE or target not in _CASTABLE:
        names = ", ".join(d.name for d in _CASTABLE)
        raise UnsupportedDtypeError(f"ops.cast on the GPU converts between {names}; got {x.dtype.name} -> "
                                    f"{target.name}. Convert other types on the host (ops.cast on CPU tensors).")
    if target == x.dtype:
        return contiguous(x)
    x = contig(x)
    y = empty(x.shape, target, device)
    call("fdm_cast", x.data_ptr, x.dtype.code, y.data_ptr, target.code, x.numel, stream(device))
    return y


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids]: ids int32/int64 [...], table [V, D] -> [..., D] in the table's dtype. The kernel cannot raise:
    an id outside [0, V) gives a row of NaN."""
    device = gpu_device("embedding", ids, table)
    if ids.dtype not in _IDS:
        raise UnsupportedDtypeError(f"ops.embedding: ids must be int32 or int64 on the GPU, got {ids.dtype.name}")
    check_float("embedding", table, "table")
    if table.ndim != 2:
        raise ShapeError(f"ops.embedding: table must be [V, D], got {table.shape}")
    ids, table = contig(ids), contig(table)
    vocab, d = table.shape
    out = empty(ids.shape + (d,), table.dtype, device)
    call("fdm_embedding", ids.data_ptr, ids.dtype.code, table.data_ptr, out.data_ptr, ids.numel, vocab, d,
         table.dtype.code, stream(device))
    return out


def upsample_nearest2x(x: Tensor, channels_last: bool = False) -> Tensor:
    """Nearest-neighbour 2x upsampling of [N, C, H, W] -> [N, C, 2H, 2W] (channels_last: [N, H, W, C] ->
    [N, 2H, 2W, C]), same dtype."""
    device = gpu_device("upsample_nearest2x", x)
    if not x.dtype.is_floating or x.itemsize not in (1, 2, 4):
        raise UnsupportedDtypeError(f"ops.upsample_nearest2x: x must be float32, float16, bfloat16 or fp8, got "
                                    f"{x.dtype.name}")
    if x.ndim != 4:
        layout = "[N, H, W, C]" if channels_last else "[N, C, H, W]"
        raise ShapeError(f"ops.upsample_nearest2x: x must be {layout}, got {x.shape}")
    x = contig(x)
    if channels_last:
        # A broadcast copy: every pixel (C contiguous values) lands in a 2x2 block; the copy kernel moves the
        # pixel's channels in 16-byte pieces.
        n, h, w, c = x.shape
        y = empty_like(x, (n, 2 * h, 2 * w, c))
        _copy(x.view(n, h, 1, w, 1, c).expand(n, h, 2, w, 2, c), y.view(n, h, 2, w, 2, c))
        return y
    n, c, h, w = x.shape
    y = empty_like(x, (n, c, 2 * h, 2 * w))
    call("fdm_upsample_nearest2x", x.data_ptr, y.data_ptr, n * c * h, w, x.itemsize, stream(device))
    return y


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t [B] -> [B, dim] float32 (diffusers' get_timestep_embedding). A few hundred values:
    computed on the host by the reference and uploaded."""
    device = gpu_device("timestep_embedding", t)
    emb = cpu.timestep_embedding(t.numpy(), dim, flip_sin_to_cos=flip_sin_to_cos,
                                 downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
    return Tensor.from_numpy(emb, device=device)
