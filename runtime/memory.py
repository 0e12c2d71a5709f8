"""Device memory: a caching, stream-ordered allocator on a CUDA memory pool, and pinned host buffers.

Each GPU gets its own pool whose release threshold is "never", so freed blocks stay cached in the pool and the
next allocation of a similar size is served without a driver round trip to the OS. Allocation and free are
stream ordered (cuMemAllocFromPoolAsync / cuMemFreeAsync): a buffer may be reused by later work on the same
stream as soon as it is freed; `record_stream` makes a free also wait for work on other streams.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from . import cuda
from .cuda import Device, Stream
from .errors import CudaError, OutOfMemoryError

_drv = cuda._drv


def format_bytes(n: int) -> str:
    """Bytes in binary units, e.g. 1536 -> "1.50 KiB"."""
    if abs(n) < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB"]
    while units and abs(value) >= 1024:
        value /= 1024
        units.pop(0)
    return f"{value:.2f} {units[0] if units else 'TiB'}"


@dataclass(frozen=True)
class MemoryStats:
    """Bytes. current/peak: bytes asked for by live buffers (exact); reserved/peak_reserved: what the pool holds
    from the card (live + cached, rounded up to the pool's granularity); num_allocs: live buffers."""

    current: int
    peak: int
    reserved: int
    peak_reserved: int
    num_allocs: int


class DeviceBuffer:
    """A block of GPU memory. Freed (in stream order) by `.free()` or when garbage collected."""

    def __init__(self, ptr: int, nbytes: int, device: Device, stream: Stream,
                 allocator: DeviceAllocator | None = None, owner: object = None):
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self.stream = stream
        self._allocator = allocator  # None: memory owned elsewhere (e.g. imported through DLPack)
        self._owner = owner  # kept alive until the buffer is freed
        self._other_streams: list[Stream] = []

    @classmethod
    def foreign(cls, ptr: int, nbytes: int, device: Device, owner: object) -> DeviceBuffer:
        """Wrap memory that someone else owns; `owner` is released (not freed by us) when this buffer is."""
        return cls(ptr, nbytes, device, cuda.current_stream(device), None, owner)

    def record_stream(self, stream: Stream) -> None:
        """Note that `stream` uses this buffer: the eventual free waits for the work queued on it until then."""
        if stream != self.stream and stream not in self._other_streams:
            self._other_streams.append(stream)

    def free(self) -> None:
        """Return the memory to the pool in stream order. Idempotent."""
        alloc, self._allocator = self._allocator, None
        if alloc is not None:
            alloc._release(self)
        self._owner = None
        self.ptr, self.nbytes, self._other_streams = 0, 0, []

    def __del__(self, _finalizing=sys.is_finalizing):
        # At interpreter shutdown module globals may already be gone (hence the bound default); exit frees all.
        if not _finalizing():
            self.free()

    def __repr__(self) -> str:
        return f"DeviceBuffer(ptr=0x{self.ptr:x}, nbytes={self.nbytes}, device={self.device})"


class DeviceAllocator:
    """The caching allocator of one GPU; get it with `allocator(device)`."""

    def __init__(self, device: Device):
        self.device = device
        device.set_current()
        if not cuda.call(_drv.cuDeviceGetAttribute,
                         _drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, device._cu_device):
            raise CudaError("CUDA_ERROR_NOT_SUPPORTED",
                            f"{device} ({device.name}) has no stream-ordered memory pools; fastdm needs CUDA 11.2+ "
                            "drivers and a GPU that supports them")
        props = _drv.CUmemPoolProps()
        props.allocType = _drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        props.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        props.location.id = device.index
        # Our own pool (not the device default): its reserved-memory attributes count fastdm's memory only.
        self._pool = cuda.call(_drv.cuMemPoolCreate, props)
        never = _drv.cuuint64_t(2**64 - 1)
        cuda.call(_drv.cuMemPoolSetAttribute, self._pool, _drv.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                  never)
        self._lock = threading.Lock()
        self._current = 0
        self._peak = 0
        self._live = 0
        self._capture_log: list[weakref.ref] | None = None  # buffers allocated while a graph is being captured

    # ---------------------------------------------------------------------------------------- allocation
    def alloc(self, nbytes: int, stream: Stream | None = None) -> DeviceBuffer:
        """`nbytes` of device memory, usable on `stream` (default: the current stream) in stream order."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative number of bytes ({nbytes})")
        stream = cuda.current_stream(self.device) if stream is None else stream
        if nbytes == 0:  # the driver rejects empty allocations; an empty tensor needs no memory
            return DeviceBuffer(0, 0, self.device, stream)
        if nbytes > self.device.total_memory:
            raise self._oom_error(nbytes)
        self.device.set_current()
        ptr = self._try_alloc(nbytes, stream)
        if ptr is None:
            # Buffers dropped in reference cycles, and frees still pending on other streams, may be holding the
            # memory: collect them, let the pending frees complete, and try once more.
            gc.collect()
            self.device.synchronize()
            ptr = self._try_alloc(nbytes, stream)
            if ptr is None:
                raise self._oom_error(nbytes)
        with self._lock:
            self._current += nbytes
            self._live += 1
            if self._current > self._peak:
                self._peak = self._current
        buf = DeviceBuffer(ptr, nbytes, self.device, stream, self)
        if self._capture_log is not None:
            self._capture_log.append(weakref.ref(buf))
        return buf

    def _try_alloc(self, nbytes: int, stream: Stream) -> int | None:
        err, dptr = _drv.cuMemAllocFromPoolAsync(nbytes, self._pool, stream._handle)
        if int(err) == int(_drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY):
            return None
        cuda.check((err,), "cuMemAllocFromPoolAsync")
        return int(dptr)

    def _release(self, buf: DeviceBuffer) -> None:
        self.device.set_current()
        for other in buf._other_streams:
            buf.stream.wait_stream(other)
        cuda.call(_drv.cuMemFreeAsync, buf.ptr, buf.stream._handle)
        with self._lock:
            self._current -= buf.nbytes
            self._live -= 1

    # ------------------------------------------------------------------------------------------ graph capture
    def begin_capture(self) -> None:
        """Note every buffer allocated from now on: under stream capture they are graph allocations."""
        self._capture_log = []

    def end_capture(self) -> list[DeviceBuffer]:
        """Stop noting; return the noted buffers that are still alive."""
        log, self._capture_log = self._capture_log or [], None
        return [b for b in (r() for r in log) if b is not None and b.ptr]

    def abandon(self, bufs: list[DeviceBuffer]) -> None:
        """Drop graph allocations whose graph was never instantiated (a failed or refused capture): there is
        nothing left to free, so they only leave the counters and their tensors become unusable."""
        for buf in bufs:
            with self._lock:
                self._current -= buf.nbytes
                self._live -= 1
            buf._allocator = None
            buf.free()

    # ------------------------------------------------------------------------------------------ statistics
    def _pool_attr(self, name: str) -> int:
        value = cuda.call(_drv.cuMemPoolGetAttribute, self._pool, getattr(_drv.CUmemPool_attribute, name))
        return int(value)

    def stats(self) -> MemoryStats:
        with self._lock:
            current, peak, live = self._current, self._peak, self._live
        return MemoryStats(current, peak, self._pool_attr("CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT"),
                           self._pool_attr("CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH"), live)

    def reset_peak(self) -> None:
        """Restart the peak counters from the current values."""
        with self._lock:
            self._peak = self._current
        # The driver only accepts 0, which resets the high-water mark to the current reservation.
        cuda.call(_drv.cuMemPoolSetAttribute, self._pool, _drv.CUmemPool_attribute.CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                  _drv.cuuint64_t(0))

    def empty_cache(self) -> None:
        """Give the cached (freed but kept) memory back to the card; live buffers are untouched."""
        self.device.synchronize()  # frees still pending on a stream are not trimmable yet
        cuda.call(_drv.cuMemPoolTrimTo, self._pool, 0)

    def _oom_error(self, nbytes: int) -> OutOfMemoryError:
        free, total = self.device.mem_get_info()
        held = self.stats().current
        cached = max(0, self._pool_attr("CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT")
                     - self._pool_attr("CU_MEMPOOL_ATTR_USED_MEM_CURRENT"))
        beyond = " (more than the whole card)" if nbytes > total else ""
        return OutOfMemoryError(
            f"CUDA out of memory on {self.device} ({self.device.name}): tried to allocate {format_bytes(nbytes)}"
            f"{beyond}. The card has {format_bytes(free)} free of {format_bytes(total)}; fastdm holds "
            f"{format_bytes(held)} in live tensors and caches {format_bytes(cached)} more "
            "(fastdm.runtime.memory.empty_cache() returns the cache to the card). Try a smaller image size or batch, "
            "offload=True / --offload where the pipeline offers it, or close other processes using this GPU "
            "(see nvidia-smi).")


_allocators: dict[int, DeviceAllocator] = {}
_allocators_lock = threading.Lock()


def allocator(device: Device | int | str | None = None) -> DeviceAllocator:
    """The allocator of `device` (default: the current GPU), created on first use."""
    dev = cuda.current_device() if device is None else cuda._gpu(device)
    a = _allocators.get(dev.index)
    if a is None:
        with _allocators_lock:
            a = _allocators.get(dev.index)
            if a is None:
                a = _allocators[dev.index] = DeviceAllocator(dev)
    return a


def memory_stats(device: Device | int | str | None = None) -> MemoryStats:
    return allocator(device).stats()


def empty_cache(device: Device | int | str | None = None) -> None:
    """Release the memory fastdm caches on `device` (default: the current GPU) back to the card."""
    allocator(device).empty_cache()


# ------------------------------------------------------------------------------------------- pinned host
class PinnedBuffer:
    """Page-locked host memory (fast, truly asynchronous host<->device copies). Views from `.array()` keep the
    buffer alive; `.free()` (or leaving a `with` block) releases it at once, so do not use views afterwards."""

    def __init__(self, nbytes: int, device: Device | int | str | None = None):
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative number of bytes ({nbytes})")
        self.nbytes = nbytes
        self.ptr = 0
        if nbytes:
            (cuda.current_device() if device is None else cuda._gpu(device)).set_current()
            # PORTABLE: pinned for every context, so one staging buffer serves all GPUs.
            self.ptr = int(cuda.call(_drv.cuMemHostAlloc, nbytes, _drv.CU_MEMHOSTALLOC_PORTABLE))

    def array(self, dtype=np.uint8, shape: tuple[int, ...] | int | None = None) -> np.ndarray:
        """A numpy view of the buffer (the first prod(shape) elements; all of it when shape is None)."""
        dtype = np.dtype(dtype)
        if self.ptr == 0 and self.nbytes:
            raise ValueError("this PinnedBuffer has been freed")
        count = self.nbytes // dtype.itemsize if shape is None else int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes; "
                             f"the buffer has {self.nbytes}")
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.ptr) if self.nbytes else bytearray()
        arr = np.frombuffer(raw, dtype=np.uint8)
        if self.nbytes:
            raw._pinned_owner = self  # the view's base chain keeps the pinned memory alive
        arr = arr[: count * dtype.itemsize].view(dtype)
        return arr if shape is None else arr.reshape(shape)

    def free(self) -> None:
        """Release the memory now. Idempotent."""
        ptr, self.ptr = self.ptr, 0
        if ptr:
            cuda.call(_drv.cuMemFreeHost, ptr)

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self, _finalizing=sys.is_finalizing):
        if not _finalizing():
            self.free()

    def __repr__(self) -> str:
        return f"PinnedBuffer(ptr=0x{self.ptr:x}, nbytes={self.nbytes})"
