"""Helpers shared by the ops.cuda modules: argument checks, the stream handle, output allocation, layouts."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from .... import kernels
from ... import cuda, dtypes
from ...cuda import Device
from ...dtypes import DType
from ...errors import ShapeError, UnsupportedDtypeError
from ...tensor import Tensor, empty

FLOATS: tuple[DType, ...] = (dtypes.float32, dtypes.float16, dtypes.bfloat16)
MAX_DIMS = 8  # dims the strided kernels take (kMaxDims in kernels/*.cu)

call = kernels.call


def gpu_device(op: str, *tensors: Tensor | None) -> Device:
    """The one GPU all non-None `tensors` live on (made current); ShapeError otherwise."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_cuda:
            raise ShapeError(f"ops.{op}: expected GPU Tensors, got {t!r}; move inputs with .to('cuda')")
        if device is None:
            device = t.device
        elif t.device is not device:
            raise ShapeError(f"ops.{op}: tensors are on {device} and {t.device}; move them to one device")
    if device is None:
        raise ShapeError(f"ops.{op}: needs at least one GPU Tensor")
    device.set_current()
    return device


def stream(device: Device) -> int:
    """Handle of the current stream of `device`, for the kernels' last argument."""
    return cuda.current_stream(device).handle


def check_float(op: str, t: Tensor, name: str = "x") -> None:
    """t holds float32, float16 or bfloat16 (the storage types of the compute kernels)."""
    if t.dtype not in FLOATS:
        raise UnsupportedDtypeError(f"ops.{op}: {name} is {t.dtype.name}; the GPU kernels take float32, float16 or "
                                    f"bfloat16. Convert it with ops.cast({name}, 'bfloat16') first.")


def check_same_dtype(op: str, ref: Tensor, t: Tensor | None, name: str) -> None:
    """t (when given) has ref's dtype: the kernels read all operands as one storage type."""
    if t is not None and t.dtype != ref.dtype:
        raise UnsupportedDtypeError(f"ops.{op}: {name} is {t.dtype.name} but x is {ref.dtype.name}; cast it with "
                                    f"ops.cast({name}, '{ref.dtype.name}') (weights are usually cast once at load)")


def contig(t: Tensor | None) -> Tensor | None:
    """t itself when contiguous, else a contiguous copy (ops.contiguous)."""
    if t is None or t.is_contiguous():
        return t
    from .layout import contiguous  # layout imports this module

    return contiguous(t)


def per_batch(op: str, v: Tensor, x: Tensor, name: str) -> tuple[Tensor, int]:
    """A [B, D] modulation vector for x [B, S, D], in x's dtype with a contiguous last dim (row-strided views such
    as chunks of one [B, 6D] buffer are kept), and its batch stride (0 when B == 1)."""
    check_same_dtype(op, x, v, name)
    want = (x.shape[0], x.shape[2])
    if v.shape != want:
        raise ShapeError(f"ops.{op}: {name} must be [B, D] = {want} for x {x.shape}, got {v.shape}")
    if v.shape[1] > 1 and v.strides[1] != 1:
        v = contig(v)
    return v, (v.strides[0] if v.shape[0] > 1 else 0)


def empty_like(t: Tensor, shape: Sequence[int] | None = None, dtype: DType | None = None) -> Tensor:
    """A new contiguous tensor on t's device: t's shape and dtype unless given."""
    return empty(t.shape if shape is None else tuple(shape), t.dtype if dtype is None else dtype, t.device)


def int64_array(values: Sequence[int]):
    """A ctypes int64 array for the kernels' `const int64_t*` arguments (shapes, strides)."""
    return (ctypes.c_int64 * len(values))(*values)


def collapse(shape: Sequence[int], *strides: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every stride list walks as one (and drop size-1 dims), so strided kernels index
    fewer dims. Returns (shape, [strides...]); a tensor of one element gives shape [1]."""
    out_shape: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for d, n in enumerate(shape):
        if n == 1:
            continue
        if out_shape and all(st[-1] == s[d] * n for st, s in zip(out_strides, strides, strict=True)):
            out_shape[-1] *= n
            for st, s in zip(out_strides, strides, strict=True):
                st[-1] = s[d]
            continue
        out_shape.append(n)
        for st, s in zip(out_strides, strides, strict=True):
            st.append(s[d])
    if not out_shape:
        return [1], [[0] for _ in strides]
    return out_shape, out_strides


def rows_layout(x: Tensor) -> tuple[int, int, int, int] | None:
    """For x [..., D] with a contiguous last dim: (rows, inner, stride_outer, stride_inner) such that row
    r = o * inner + i starts at element o * stride_outer + i * stride_inner; None when the leading dims need more
    than two strides (copy with contig() then)."""
    if x.ndim == 0 or (x.shape[-1] > 1 and x.strides[-1] != 1):
        return None
    lead = x.shape[:-1]
    rows = 1
    for n in lead:
        rows *= n
    shape, (st,) = collapse(lead, x.strides[:-1])
    if rows == 0 or shape == [1]:
        return rows, 1, 0, 0
    if len(shape) == 1:
        return rows, 1, st[0], 0
    if len(shape) == 2:
        return rows, shape[1], st[0], st[1]
    return None
