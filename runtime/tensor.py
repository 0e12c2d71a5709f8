"""Tensor: a numpy array on the host or a DeviceBuffer on a GPU, seen through (shape, strides, offset, dtype).

Strides and offsets count elements. Every view (view, permute, narrow, indexing, expand, ...) only computes a new
(shape, strides, offset) over the same storage, identically on both devices; nothing here launches a kernel
except `.contiguous()` of a strided GPU tensor, which calls `ops.contiguous`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from . import cuda, dtypes
from .cuda import CPU, Device
from .dtypes import DType
from .errors import ShapeError
from .memory import DeviceBuffer, allocator

Shape = tuple[int, ...]


def contiguous_strides(shape: Sequence[int]) -> Shape:
    """Row-major (C order) element strides of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _RawMemory:
    """Hands raw memory to numpy through the array interface; numpy keeps this object (and `owner`) as the base."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, ptr: int, shape: Shape, byte_strides: Shape, itemsize: int, readonly: bool, owner: object):
        # Unsigned ints of the element size; the caller views them as the real dtype (numpy's typestr cannot name
        # bfloat16 or float8).
        self.__array_interface__ = {"data": (ptr, readonly), "shape": shape, "strides": byte_strides,
                                    "typestr": np.dtype(f"u{itemsize}").str, "version": 3}
        self.owner = owner


def host_array(ptr: int, shape: Shape, strides: Shape, dtype: DType, owner: object, readonly: bool = False):
    """A numpy array over host memory at `ptr` with element `strides`; `owner` lives as long as the array."""
    raw = _RawMemory(ptr, tuple(shape), tuple(s * dtype.itemsize for s in strides), dtype.itemsize, readonly, owner)
    return np.asarray(raw).view(dtype.np)


def _shape_arg(args) -> tuple:
    # Accept both t.view(2, 3) and t.view((2, 3)).
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    try:
        return tuple(map(operator.index, args))
    except TypeError:
        raise ShapeError(f"a shape must be integers, got {args!r}") from None


def _infer_shape(shape: tuple, numel: int, old: Shape) -> Shape:
    if shape and min(shape) < 0:
        if min(shape) < -1 or shape.count(-1) > 1:
            raise ShapeError(f"invalid shape {shape}: sizes must be >= 0, with at most one -1")
        known = -math.prod(shape)
        if known == 0 or numel % known:
            raise ShapeError(f"cannot reshape a tensor of shape {old} ({numel} elements) into {shape}")
        shape = tuple([numel // known if n == -1 else n for n in shape])
    if math.prod(shape) != numel:
        raise ShapeError(f"cannot reshape a tensor of shape {old} ({numel} elements) into {shape}")
    return shape


def _view_strides(shape: Shape, strides: Shape, new_shape: Shape) -> Shape | None:
    """Strides that let `new_shape` address the same elements in the same order, or None if none exist."""
    if math.prod(shape) == 0:
        return contiguous_strides(new_shape)
    # Group the old dims into runs that are contiguous with each other: (elements, stride of the innermost dim).
    chunks: list[list[int]] = []
    for n, s in zip(shape, strides, strict=True):
        if n == 1:
            continue
        if chunks and chunks[-1][1] == s * n:
            chunks[-1] = [chunks[-1][0] * n, s]
        else:
            chunks.append([n, s])
    # Cover each run, innermost first, by consecutive new dims whose sizes multiply to the run's length.
    out = [0] * len(new_shape)
    ci, acc = len(chunks) - 1, 1
    for d in range(len(new_shape) - 1, -1, -1):
        n = new_shape[d]
        if n == 1:
            continue
        if ci < 0:
            return None
        numel, inner = chunks[ci]
        out[d] = inner * acc
        acc *= n
        if acc == numel:
            ci, acc = ci - 1, 1
        elif numel % acc:
            return None
    # Size-1 dims can take any stride; give them the row-major one so simple checks stay meaningful.
    for d in range(len(new_shape) - 1, -1, -1):
        if new_shape[d] == 1:
            out[d] = out[d + 1] * new_shape[d + 1] if d + 1 < len(new_shape) else 1
    return tuple(out)


def _unit_stride(shape: Sequence[int], strides: Sequence[int], d: int) -> int:
    # Stride for a new size-1 dim inserted before position d.
    return strides[d] * shape[d] if d < len(shape) else 1


def _int_index(it) -> int:
    if not isinstance(it, (bool, np.bool_, np.ndarray)):
        try:
            return operator.index(it)
        except TypeError:
            pass
    raise ShapeError(f"unsupported index {it!r}: only ints, slices, '...' and None (no masks or index arrays; "
                     "use ops.embedding to gather rows)")


class Tensor:
    """An n-d array on the host (numpy) or a GPU (DeviceBuffer). Build with `from_numpy`, `empty` or `zeros`."""

    __slots__ = ("_shape", "_strides", "_offset", "_dtype", "_device", "_array", "_host_ptr", "_buffer",
                 "__weakref__")

    def __init__(self, storage: np.ndarray | DeviceBuffer, shape: Sequence[int], strides: Sequence[int],
                 offset: int, dtype: DType, device: Device | None = None):
        """Internal: `storage` is the base numpy array (offset/strides relative to its element [0, ..., 0]) or the
        DeviceBuffer (offset relative to its start)."""
        self._shape = tuple(int(n) for n in shape)
        self._strides = tuple(int(s) for s in strides)
        self._offset = int(offset)
        self._dtype = dtype
        if isinstance(storage, np.ndarray):
            self._array, self._buffer, self._device = storage, None, CPU
            self._host_ptr = storage.__array_interface__["data"][0]
        else:
            self._array, self._buffer, self._host_ptr = None, storage, 0
            self._device = storage.device if device is None else device

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_numpy(cls, arr, device="cpu") -> Tensor:
        """Wrap `arr` without a copy (device "cpu"), or upload it to a GPU."""
        arr = np.asarray(arr)
        dt = dtypes.dtype(arr.dtype)
        dev = cuda.device(device)
        if dev is not CPU:
            return _upload(arr, dt, dev)
        if any(s % dt.itemsize for s in arr.strides):  # e.g. a field of a structured array
            arr = arr.copy()
        return cls(arr, arr.shape, tuple(s // dt.itemsize for s in arr.strides), 0, dt)

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def shape(self) -> Shape:
        return self._shape

    @property
    def strides(self) -> Shape:
        """Element strides."""
        return self._strides

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def device(self) -> Device:
        return self._device

    @property
    def is_cuda(self) -> bool:
        return self._buffer is not None

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def numel(self) -> int:
        return math.prod(self._shape)

    @property
    def itemsize(self) -> int:
        return self._dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self._dtype.itemsize

    @property
    def data_ptr(self) -> int:
        """Address of element [0, ..., 0] (host or device)."""
        base = self._buffer.ptr if self._buffer is not None else self._host_ptr
        return base + self._offset * self._dtype.itemsize

    @property
    def buffer(self) -> DeviceBuffer | None:
        """The DeviceBuffer owning a GPU tensor's memory (None on the host)."""
        return self._buffer

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __repr__(self) -> str:
        layout = "" if self.is_contiguous() else f", strides={self._strides}"
        return f"Tensor(shape={self._shape}, dtype={self._dtype.name}, device={self._device}{layout})"

    def is_contiguous(self) -> bool:
        """Row-major with no gaps (strides of size-1 dims do not matter)."""
        if 0 in self._shape:
            return True
        expected = 1
        for n, s in zip(reversed(self._shape), reversed(self._strides), strict=True):
            if n != 1:
                if s != expected:
                    return False
                expected *= n
        return True

    # ------------------------------------------------------------------------------------------- host access
    def numpy(self) -> np.ndarray:
        """The values as a numpy array: a view on the host (no copy), a synchronising download from a GPU."""
        if self._buffer is None:
            base = self._array
            if self._offset == 0 and self._shape == base.shape and self._strides == self._base_strides():
                return base
            if self.numel == 0:
                return np.empty(self._shape, self._dtype.np)
            return host_array(self.data_ptr, self._shape, self._strides, self._dtype, base,
                              readonly=not base.flags.writeable)
        t = self if self.is_contiguous() else self.contiguous()
        out = np.empty(t.shape, dtype=t.dtype.np)
        stream = cuda.current_stream(t.device)
        cuda.memcpy_dtoh(out.__array_interface__["data"][0], t.data_ptr, t.nbytes, stream)
        stream.synchronize()
        return out

    def _base_strides(self) -> Shape:
        return tuple(s // self._dtype.itemsize for s in self._array.strides)

    def to(self, device) -> Tensor:
        """This tensor on `device` ("cpu", "cuda", "cuda:1", ...): itself when already there, else a copy."""
        dev = cuda.device(device)
        if dev is self._device:
            return self
        if dev is CPU:
            return Tensor.from_numpy(self.numpy())
        return _upload(self.numpy(), self._dtype, dev)

    def contiguous(self) -> Tensor:
        """This tensor if it is contiguous, else a contiguous copy on the same device."""
        if self.is_contiguous():
            return self
        if self._buffer is None:
            return Tensor.from_numpy(np.array(self.numpy(), order="C", copy=True))
        from . import ops  # ops imports this module

        return ops.contiguous(self)

    # ----------------------------------------------------------------------------------------------- views
    def _view(self, shape: Sequence[int], strides: Sequence[int], offset: int) -> Tensor:
        t = Tensor.__new__(Tensor)  # skips __init__'s normalisation: views are made often
        t._shape, t._strides, t._offset = tuple(shape), tuple(strides), offset
        t._dtype, t._device, t._array, t._host_ptr, t._buffer = (self._dtype, self._device, self._array,
                                                                  self._host_ptr, self._buffer)
        return t

    def _dim(self, d: int, ndim: int | None = None) -> int:
        ndim = self.ndim if ndim is None else ndim
        d = operator.index(d)
        if not -ndim <= d < ndim:
            raise ShapeError(f"dim {d} is out of range for a tensor of {self.ndim} dims (shape {self._shape})")
        return d % ndim

    def view(self, *shape) -> Tensor:
        """The same elements with another shape (one size may be -1). Raises ShapeError when this tensor's
        strides cannot express the new shape; use `.reshape` (which copies then) instead."""
        new = _infer_shape(_shape_arg(shape), self.numel, self._shape)
        strides = _view_strides(self._shape, self._strides, new)
        if strides is None:
            raise ShapeError(f"cannot view a tensor of shape {self._shape} with strides {self._strides} as {new} "
                             "without copying; use .reshape(...) or .contiguous().view(...)")
        return self._view(new, strides, self._offset)

    def reshape(self, *shape) -> Tensor:
        """Like `.view`, but makes a contiguous copy when a view is impossible."""
        new = _infer_shape(_shape_arg(shape), self.numel, self._shape)
        strides = _view_strides(self._shape, self._strides, new)
        if strides is not None:
            return self._view(new, strides, self._offset)
        return self.contiguous().view(new)

    def permute(self, *dims) -> Tensor:
        """Reorder the axes (numpy.transpose), as a view."""
        dims, nd = _shape_arg(dims), len(self._shape)
        if len(dims) != nd:
            raise ShapeError(f"permute{dims} needs {nd} dims for shape {self._shape}")
        dims = [d + nd if d < 0 else d for d in dims]
        if sorted(dims) != list(range(nd)):  # also catches dims out of range
            raise ShapeError(f"permute{tuple(dims)} is not a permutation of 0..{nd - 1}")
        shape, strides = self._shape, self._strides
        return self._view(tuple([shape[d] for d in dims]), tuple([strides[d] for d in dims]), self._offset)

    def transpose(self, a: int, b: int) -> Tensor:
        """Swap two axes, as a view."""
        a, b = self._dim(a), self._dim(b)
        shape, strides = list(self._shape), list(self._strides)
        shape[a], shape[b] = shape[b], shape[a]
        strides[a], strides[b] = strides[b], strides[a]
        return self._view(tuple(shape), tuple(strides), self._offset)

    def narrow(self, dim: int, start: int, length: int) -> Tensor:
        """Elements start..start+length-1 of axis `dim` (start may be negative), as a view."""
        d = self._dim(dim)
        size = self._shape[d]
        start = operator.index(start)
        length = operator.index(length)
        if start < 0:
            start += size
        if not (0 <= start <= size and 0 <= length and start + length <= size):
            raise ShapeError(f"narrow(dim={dim}, start={start}, length={length}) is out of range for size {size}")
        shape = list(self._shape)
        shape[d] = length
        offset = self._offset + start * self._strides[d] if length else self._offset
        return self._view(shape, self._strides, offset)

    def unsqueeze(self, dim: int) -> Tensor:
        """Insert a size-1 axis at `dim` (negative counts from the end of the result)."""
        d = self._dim(dim, self.ndim + 1)
        shape, strides = list(self._shape), list(self._strides)
        stride = _unit_stride(shape, strides, d)
        shape.insert(d, 1)
        strides.insert(d, stride)
        return self._view(shape, strides, self._offset)

    def squeeze(self, dim: int | Sequence[int] | None = None) -> Tensor:
        """Drop size-1 axes: all of them, or the given ones (which must have size 1)."""
        if dim is None:
            drop = {d for d, n in enumerate(self._shape) if n == 1}
        else:
            drop = {self._dim(d) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
            bad = [d for d in drop if self._shape[d] != 1]
            if bad:
                raise ShapeError(f"squeeze: dims {sorted(bad)} of shape {self._shape} do not have size 1")
        keep = [d for d in range(self.ndim) if d not in drop]
        return self._view([self._shape[d] for d in keep], [self._strides[d] for d in keep], self._offset)

    def expand(self, *shape) -> Tensor:
        """Broadcast size-1 axes (and new leading axes) to `shape` with stride 0, as a view; -1 keeps a size."""
        shape = _shape_arg(shape)
        lead = len(shape) - self.ndim
        if lead < 0:
            raise ShapeError(f"expand{shape}: the target has fewer dims than the tensor's shape {self._shape}")
        new_shape, new_strides = [], []
        for i, n in enumerate(shape):
            if i < lead:
                if n < 0:
                    raise ShapeError(f"expand{shape}: a new leading dim cannot be {n}")
                new_shape.append(n)
                new_strides.append(0)
                continue
            old, stride = self._shape[i - lead], self._strides[i - lead]
            if n == -1 or n == old:
                new_shape.append(old)
                new_strides.append(stride)
            elif old == 1 and n >= 0:
                new_shape.append(n)
                new_strides.append(0)
            else:
                raise ShapeError(f"expand: cannot broadcast shape {self._shape} to {shape} (dim {i}: {old} -> {n})")
        return self._view(new_shape, new_strides, self._offset)

    def __getitem__(self, index) -> Tensor:
        """Basic indexing: ints (negative from the end), slices with a positive step, `...` and None."""
        items = index if isinstance(index, tuple) else (index,)
        ellipses = nones = 0
        for it in items:  # by identity: == would compare index arrays elementwise
            if it is Ellipsis:
                ellipses += 1
            elif it is None:
                nones += 1
        if ellipses > 1:
            raise IndexError("an index can have only one ellipsis ('...')")
        used = len(items) - ellipses - nones
        if used > self.ndim:
            raise IndexError(f"too many indices ({used}) for a tensor of {self.ndim} dims")
        if not ellipses:
            items = items + (Ellipsis,)
        shape, strides, inserted = [], [], []
        offset, d = self._offset, 0
        for it in items:
            if it is Ellipsis:
                for _ in range(self.ndim - used):
                    shape.append(self._shape[d])
                    strides.append(self._strides[d])
                    d += 1
            elif it is None:
                inserted.append(len(shape))
                shape.append(1)
                strides.append(0)
            elif isinstance(it, slice):
                if it.step is not None and operator.index(it.step) <= 0:
                    raise ShapeError(f"slice step must be positive (got {it.step}); negative steps are not supported")
                start, stop, step = it.indices(self._shape[d])
                n = len(range(start, stop, step))
                if n:
                    offset += start * self._strides[d]
                shape.append(n)
                strides.append(self._strides[d] * step)
                d += 1
            else:
                i, size = _int_index(it), self._shape[d]
                if not -size <= i < size:
                    raise IndexError(f"index {i} is out of range for dim {d} of size {size}")
                offset += (i % size) * self._strides[d]
                d += 1
        for pos in reversed(inserted):
            strides[pos] = _unit_stride(shape, strides, pos + 1)
        return self._view(shape, strides, offset)

    # ------------------------------------------------------------------------------------------------ DLPack
    def __dlpack__(self, stream: int | None = None):
        """A DLPack capsule sharing this tensor's memory (see runtime/dlpack.py for the stream semantics)."""
        from .dlpack import to_dlpack

        return to_dlpack(self, stream)

    def __dlpack_device__(self) -> tuple[int, int]:
        from .dlpack import dlpack_device

        return dlpack_device(self)


def _upload(arr: np.ndarray, dt: DType, dev: Device) -> Tensor:
    host = arr if arr.flags.c_contiguous else np.array(arr, order="C", copy=True)
    t = empty(arr.shape, dt, dev)
    stream = cuda.current_stream(dev)
    cuda.memcpy_htod(t.data_ptr, host.__array_interface__["data"][0], t.nbytes, stream)
    stream.synchronize()  # the host array may be freed as soon as we return
    return t


def empty(shape: Sequence[int], dtype=dtypes.float32, device="cpu") -> Tensor:
    """An uninitialised contiguous tensor."""
    shape = _shape_arg((shape,) if hasattr(shape, "__index__") else tuple(shape))
    if any(n < 0 for n in shape):
        raise ShapeError(f"negative size in shape {shape}")
    dt = dtypes.dtype(dtype)
    dev = cuda.device(device)
    if dev is CPU:
        return Tensor.from_numpy(np.empty(shape, dt.np))
    buf = allocator(dev).alloc(math.prod(shape) * dt.itemsize, cuda.current_stream(dev))
    return Tensor(buf, shape, contiguous_strides(shape), 0, dt, dev)


def zeros(shape: Sequence[int], dtype=dtypes.float32, device="cpu") -> Tensor:
    """A contiguous tensor of zeros (on a GPU: filled on the current stream)."""
    t = empty(shape, dtype, device)
    if t.is_cuda:
        cuda.memset_d8(t.data_ptr, 0, t.nbytes, cuda.current_stream(t.device))
    else:
        t.numpy().fill(0)
    return t


def from_numpy(arr, device="cpu") -> Tensor:
    """Wrap a numpy array (no copy) on the host, or upload it to a GPU."""
    return Tensor.from_numpy(arr, device)
