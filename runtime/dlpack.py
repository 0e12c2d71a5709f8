"""DLPack (legacy "dltensor" capsules) to and from fastdm Tensors, with ctypes and numpy only.

Export: numpy's own C implementation builds the capsule for a raw unsigned-int array over the tensor's memory
(a GPU address is fine: numpy never touches the data), then we patch the device and dtype fields. Its deleter and
capsule destructor are C code that keep the Tensor alive until the consumer calls the deleter. A Python (ctypes)
deleter or destructor would be unsafe: consumers often drop a capsule or an array while an exception is pending
(e.g. numpy rejecting a dtype), and running Python code then replaces that exception with a SystemError.

Import: `from_dlpack(obj)` takes the capsule, renames it "used_dltensor" and calls the producer's deleter when the
last fastdm view of the memory is garbage collected.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from . import cuda, dtypes
from .errors import ShapeError
from .memory import DeviceBuffer
from .tensor import Tensor, _RawMemory, contiguous_strides, host_array

kDLCPU, kDLCUDA = 1, 2
_NAME = b"dltensor"
_USED_NAME = b"used_dltensor"  # module constant: the capsule keeps a pointer to it


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # elements; NULL means row-major
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


# Private prototypes (setting argtypes on ctypes.pythonapi's shared function objects would affect other users).
_IsValid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_IsValid", ctypes.pythonapi))
_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))
_SetName = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_SetName", ctypes.pythonapi))
# A producer's deleter is C code that takes the GIL itself if it needs it.
_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def dlpack_device(t: Tensor) -> tuple[int, int]:
    """(device type, index): (kDLCPU, 0) or (kDLCUDA, gpu index)."""
    return (kDLCUDA, t.device.index) if t.is_cuda else (kDLCPU, 0)


def _order_for_consumer(t: Tensor, stream: int | None) -> None:
    """Make the consumer's stream wait for work queued on ours (DLPack: None = legacy default stream, -1 = none)."""
    if stream == -1:
        return
    ours = cuda.current_stream(t.device)
    handle = 1 if stream is None else int(stream)  # 1 is CU_STREAM_LEGACY
    if handle != ours.handle:
        cuda.Stream.from_handle(handle, t.device).wait(ours.record())


def to_dlpack(t: Tensor, stream: int | None = None):
    """A "dltensor" capsule sharing `t`'s memory; `stream` is the consumer's CUDA stream (ignored on the host)."""
    if t.is_cuda:
        _order_for_consumer(t, stream)
    itemsize = t.dtype.itemsize
    raw = np.asarray(_RawMemory(t.data_ptr, t.shape, tuple(s * itemsize for s in t.strides), itemsize, False, t))
    capsule = raw.__dlpack__(stream=None)
    managed = DLManagedTensor.from_address(_GetPointer(capsule, _NAME))
    code, bits = t.dtype.dlpack
    managed.dl_tensor.dtype = DLDataType(code, bits, 1)
    managed.dl_tensor.device = DLDevice(*dlpack_device(t))
    return capsule


class _ProducerRef:
    """Owns an imported DLManagedTensor: calls its producer's deleter when the last fastdm view dies."""

    __slots__ = ("addr",)

    def __init__(self, addr: int):
        self.addr = addr

    def __del__(self, _finalizing=sys.is_finalizing):
        addr, self.addr = self.addr, 0
        if addr and not _finalizing():
            deleter = DLManagedTensor.from_address(addr).deleter
            if deleter:
                _Deleter(deleter)(addr)


def from_dlpack(obj) -> Tensor:
    """A Tensor sharing the memory of any DLPack producer (an object with `__dlpack__`, or a capsule) on the host
    or a CUDA GPU. GPU producers are asked to order their work before fastdm's current stream."""
    if type(obj).__name__ == "PyCapsule":
        capsule = obj
    else:
        dev_type, dev_id = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (kDLCPU, 0)
        if int(dev_type) == kDLCUDA:
            capsule = obj.__dlpack__(stream=cuda.current_stream(cuda.Device(int(dev_id))).handle)
        elif int(dev_type) == kDLCPU:
            capsule = obj.__dlpack__()
        else:
            raise BufferError(f"DLPack device type {dev_type} is not supported; fastdm takes host (1) and CUDA (2) "
                              "memory")
    if not _IsValid(capsule, _NAME):
        raise BufferError("expected an unconsumed 'dltensor' DLPack capsule (each capsule can be consumed once)")
    addr = _GetPointer(capsule, _NAME)
    _SetName(capsule, _USED_NAME)
    owner = _ProducerRef(addr)  # from here on, any failure still calls the producer's deleter
    dl = DLManagedTensor.from_address(addr).dl_tensor
    dt = dtypes.from_dlpack(dl.dtype.code, dl.dtype.bits, dl.dtype.lanes)
    shape = tuple(dl.shape[i] for i in range(dl.ndim))
    strides = tuple(dl.strides[i] for i in range(dl.ndim)) if dl.strides else contiguous_strides(shape)
    ptr = (dl.data or 0) + dl.byte_offset
    dev_type = dl.device.device_type
    if dev_type == kDLCPU:
        return Tensor.from_numpy(host_array(ptr, shape, strides, dt, owner))
    if dev_type != kDLCUDA:
        raise BufferError(f"DLPack device type {dev_type} is not supported; fastdm takes host and CUDA memory")
    if any(s < 0 for s in strides):
        raise ShapeError(f"GPU tensors with negative strides {strides} are not supported; make it contiguous first")
    numel = 1
    for n in shape:
        numel *= n
    extent = 0 if numel == 0 else (sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1) * dt.itemsize
    device = cuda.Device(dl.device.device_id)
    buf = DeviceBuffer.foreign(ptr, extent, device, owner)
    return Tensor(buf, shape, strides, 0, dt, device)
