"""Thin, typed wrapper over the CUDA driver API (cuda-python's `cuda.bindings.driver`).

Devices, their primary contexts, streams, events, async copies and error checking. Pointers and stream handles are
plain ints. Only long-standing driver calls are used so that cuda-bindings 12.x and 13.x both work.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from functools import cached_property

from .errors import CudaError, NoGpuError

try:
    from cuda.bindings import driver as _drv
except ImportError:  # cuda-python missing: the CPU backend still works
    _drv = None

# ------------------------------------------------------------------------------------------------ errors
_SUCCESS = 0


def error_name(err) -> str:
    """The driver's name of a CUresult, e.g. "CUDA_ERROR_OUT_OF_MEMORY"."""
    res, name = _drv.cuGetErrorName(err)
    if int(res) == _SUCCESS and name:
        return name.decode()
    return f"CUDA_ERROR_{int(err)}"


def error_string(err) -> str:
    res, msg = _drv.cuGetErrorString(err)
    return msg.decode() if int(res) == _SUCCESS and msg else "unknown error"


def check(result, what: str = "CUDA driver call"):
    """Raise CudaError if a driver call failed; return its outputs (None, one value, or a tuple of them).

    cuda-python returns `(CUresult, *outputs)` from every call."""
    err, *out = result if isinstance(result, tuple) else (result,)
    if int(err) != _SUCCESS:
        raise CudaError(error_name(err), f"{what} failed: {error_string(err)}")
    if not out:
        return None
    return out[0] if len(out) == 1 else tuple(out)


def call(fn, *args):
    """Call driver function `fn(*args)` and check its result (the error names the function)."""
    return check(fn(*args), getattr(fn, "__name__", "CUDA driver call"))


# ------------------------------------------------------------------------------------------ initialisation
_init_lock = threading.Lock()
_initialized = False
_init_error: str | None = None  # remembered: looking for a missing driver again on every call is slow


def init() -> None:
    """Initialise the driver once; NoGpuError where there is no driver or no usable GPU."""
    global _initialized, _init_error
    if _initialized:
        return
    with _init_lock:
        if _initialized:
            return
        if _init_error is None:
            _init_error = _try_init()
            _initialized = _init_error is None
        if _init_error is not None:
            raise NoGpuError(_init_error)


def _try_init() -> str | None:
    if _drv is None:
        return "cuda-python is not installed (pip install cuda-bindings); use device='cpu'"
    try:
        res = _drv.cuInit(0)
    except Exception as e:  # the bindings raise (not return) when libcuda cannot be loaded
        return f"no NVIDIA driver could be loaded ({e}); install the driver or use device='cpu'"
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != _SUCCESS:
        return (f"the CUDA driver failed to initialise ({error_name(err)}: {error_string(err)}); check nvidia-smi "
                "and CUDA_VISIBLE_DEVICES, or use device='cpu'")
    return None


def device_count() -> int:
    """Number of visible GPUs (0 where the driver is missing)."""
    try:
        init()
    except NoGpuError:
        return 0
    return int(call(_drv.cuDeviceGetCount))


def is_available() -> bool:
    """True when the driver loads and at least one GPU is visible. Never raises."""
    try:
        return device_count() > 0
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- devices
class _CPUDevice:
    """The host. A singleton (`CPU`) so that devices compare and hash by identity."""

    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "device('cpu')"

    def __reduce__(self):
        return "CPU"


CPU = _CPUDevice()

# Which primary context this thread last made current, per thread: skips a driver call per op.
_tls = threading.local()


class Device:
    """One GPU. `Device(i)` returns the same object for the same index."""

    type = "cuda"
    _instances: dict[int, Device] = {}
    _lock = threading.Lock()

    def __new__(cls, index: int = 0) -> Device:
        index = int(index)
        dev = cls._instances.get(index)
        if dev is not None:
            return dev
        with cls._lock:
            if index not in cls._instances:
                n = device_count()
                if n == 0:
                    init()  # raises NoGpuError with the driver's reason
                    raise NoGpuError("no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES); use device='cpu'")
                if not 0 <= index < n:
                    raise NoGpuError(f"cuda:{index} does not exist: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})")
                dev = super().__new__(cls)
                dev.index = index
                dev._cu_device = call(_drv.cuDeviceGet, index)
                dev._ctx = None
                cls._instances[index] = dev
        return cls._instances[index]

    def __str__(self) -> str:
        return f"cuda:{self.index}"

    def __repr__(self) -> str:
        return f"device('cuda:{self.index}')"

    def __reduce__(self):
        return (Device, (self.index,))

    def _attr(self, name: str) -> int:
        return int(call(_drv.cuDeviceGetAttribute, getattr(_drv.CUdevice_attribute, name), self._cu_device))

    @cached_property
    def name(self) -> str:
        return call(_drv.cuDeviceGetName, 256, self._cu_device).split(b"\0", 1)[0].decode()

    @cached_property
    def compute_capability(self) -> tuple[int, int]:
        return (self._attr("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
                self._attr("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"))

    @cached_property
    def multiprocessor_count(self) -> int:
        return self._attr("CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")

    @cached_property
    def total_memory(self) -> int:
        return int(call(_drv.cuDeviceTotalMem, self._cu_device))

    @cached_property
    def l2_cache_size(self) -> int:
        return self._attr("CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE")

    @cached_property
    def max_shared_memory_per_block_optin(self) -> int:
        return self._attr("CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")

    def set_current(self) -> None:
        """Retain this GPU's primary context (once) and make it current on the calling thread."""
        if self._ctx is None:
            with Device._lock:
                if self._ctx is None:
                    self._ctx = call(_drv.cuDevicePrimaryCtxRetain, self._cu_device)
        # Cached per thread to save a driver call per op; code that switches contexts behind fastdm's back (another
        # library on a second GPU) must call set_current() again before using fastdm on this thread.
        if getattr(_tls, "device", None) is not self:
            call(_drv.cuCtxSetCurrent, self._ctx)
            _tls.device = self

    def synchronize(self) -> None:
        """Wait for all work on this GPU (every stream) to finish."""
        self.set_current()
        call(_drv.cuCtxSynchronize)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes on the card, as the driver sees them (other processes included)."""
        self.set_current()
        free, total = call(_drv.cuMemGetInfo)
        return int(free), int(total)


def current_device() -> Device:
    """The GPU whose context this thread last made current, as in CUDA (cuda:0 until then)."""
    dev = getattr(_tls, "device", None)
    return dev if dev is not None else Device(0)


def device(spec) -> Device | _CPUDevice:
    """Turn "cpu", "cuda", "cuda:N", N or a Device into a device object."""
    if isinstance(spec, (Device, _CPUDevice)):
        return spec
    if hasattr(spec, "__index__") and not isinstance(spec, bool):
        return Device(spec.__index__())
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "cpu":
            return CPU
        if s == "cuda":
            return current_device()
        if s.startswith("cuda:") and s[5:].isdigit():
            return Device(int(s[5:]))
    raise ValueError(f"unknown device {spec!r}; use 'cpu', 'cuda', 'cuda:N' or a GPU index")


# ---------------------------------------------------------------------------------------------- streams
class Stream:
    """A non-blocking CUDA stream (it does not synchronise with the legacy default stream)."""

    def __init__(self, device: Device | int | str | None = None, priority: int = 0):
        self.device = current_device() if device is None else _gpu(device)
        self.device.set_current()
        flags = int(_drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._handle = call(_drv.cuStreamCreateWithPriority, flags, priority)
        self.handle = int(self._handle)
        self._owned = True

    @classmethod
    def from_handle(cls, handle: int, device: Device | int | str | None = None) -> Stream:
        """Wrap a stream created elsewhere (not destroyed by us). 1 and 2 are the legacy / per-thread defaults."""
        s = cls.__new__(cls)
        s.device = current_device() if device is None else _gpu(device)
        s._handle = _drv.CUstream(int(handle))
        s.handle = int(handle)
        s._owned = False
        return s

    def synchronize(self) -> None:
        self.device.set_current()
        call(_drv.cuStreamSynchronize, self._handle)

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for `event` (no host blocking)."""
        self.device.set_current()
        call(_drv.cuStreamWaitEvent, self._handle, event._handle, 0)

    def wait_stream(self, other: Stream) -> None:
        """Make later work on this stream wait for all work queued so far on `other`."""
        if other.handle != self.handle:
            self.wait(other.record())

    def record(self, event: Event | None = None) -> Event:
        """Record `event` (default: a new event without timing) at this point of the stream."""
        event = Event(timing=False, device=self.device) if event is None else event
        event.record(self)
        return event

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream) and other.handle == self.handle

    def __hash__(self) -> int:
        return hash(self.handle)

    def __repr__(self) -> str:
        return f"Stream({self.device}, handle=0x{self.handle:x})"

    def __del__(self, _finalizing=sys.is_finalizing):
        # At interpreter shutdown module globals may already be gone (hence the bound default); exit frees all.
        if getattr(self, "_owned", False) and not _finalizing():
            self._owned = False
            _drv.cuStreamDestroy(self._handle)  # returns at once; pending work still completes


_default_streams: dict[int, Stream] = {}
_default_lock = threading.Lock()


def current_stream(device: Device | int | str | None = None) -> Stream:
    """The stream GPU work goes to: the innermost `use_stream` of this thread, else the device's default stream
    (a non-blocking stream created on first use and shared by all threads)."""
    dev = current_device() if device is None else _gpu(device)
    stack = getattr(_tls, "streams", {}).get(dev.index)
    if stack:
        return stack[-1]
    s = _default_streams.get(dev.index)
    if s is None:
        with _default_lock:
            s = _default_streams.get(dev.index)
            if s is None:
                s = _default_streams[dev.index] = Stream(dev)
    return s


@contextlib.contextmanager
def use_stream(stream: Stream) -> Iterator[Stream]:
    """Make `stream` the current stream (and its device the current device) of this thread inside the block."""
    if not hasattr(_tls, "streams"):
        _tls.streams = {}
    stack = _tls.streams.setdefault(stream.device.index, [])
    prev_device = getattr(_tls, "device", None)
    stack.append(stream)
    stream.device.set_current()
    try:
        yield stream
    finally:
        stack.pop()
        if prev_device is not None:
            prev_device.set_current()


# ----------------------------------------------------------------------------------------------- events
class Event:
    """A CUDA event; `timing=False` makes a lighter event for synchronisation only."""

    def __init__(self, timing: bool = True, device: Device | int | str | None = None):
        self.device = current_device() if device is None else _gpu(device)
        self.device.set_current()
        self.timing = timing
        flags = 0 if timing else int(_drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        self._handle = call(_drv.cuEventCreate, flags)

    @property
    def handle(self) -> int:
        return int(self._handle)

    def record(self, stream: Stream | None = None) -> Event:
        stream = current_stream(self.device) if stream is None else stream
        self.device.set_current()
        call(_drv.cuEventRecord, self._handle, stream._handle)
        return self

    def synchronize(self) -> None:
        self.device.set_current()
        call(_drv.cuEventSynchronize, self._handle)

    def query(self) -> bool:
        """True when all work recorded before the event has finished."""
        self.device.set_current()
        res = _drv.cuEventQuery(self._handle)
        err = res[0] if isinstance(res, tuple) else res
        if int(err) == int(_drv.CUresult.CUDA_ERROR_NOT_READY):
            return False
        check(res, "cuEventQuery")
        return True

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to `end` (both recorded and complete; both created with timing=True)."""
        self.device.set_current()
        return float(call(_drv.cuEventElapsedTime, self._handle, end._handle))

    def __del__(self, _finalizing=sys.is_finalizing):
        if getattr(self, "_handle", None) is not None and not _finalizing():
            _drv.cuEventDestroy(self._handle)
            self._handle = None


# ----------------------------------------------------------------------------------------------- copies
def _stream_for(stream: Stream | None) -> Stream:
    s = current_stream() if stream is None else stream
    s.device.set_current()
    return s


def memcpy_htod(dst: int, src_host_ptr: int, nbytes: int, stream: Stream | None = None) -> None:
    """Copy host -> device, ordered on `stream` (pinned sources copy asynchronously, pageable ones are staged)."""
    if nbytes:
        s = _stream_for(stream)
        call(_drv.cuMemcpyHtoDAsync, dst, src_host_ptr, nbytes, s._handle)


def memcpy_dtoh(dst_host_ptr: int, src: int, nbytes: int, stream: Stream | None = None) -> None:
    """Copy device -> host, ordered on `stream`; synchronise the stream before reading the host memory."""
    if nbytes:
        s = _stream_for(stream)
        call(_drv.cuMemcpyDtoHAsync, dst_host_ptr, src, nbytes, s._handle)


def memcpy_dtod(dst: int, src: int, nbytes: int, stream: Stream | None = None) -> None:
    if nbytes:
        s = _stream_for(stream)
        call(_drv.cuMemcpyDtoDAsync, dst, src, nbytes, s._handle)


def memset_d8(dst: int, value: int, nbytes: int, stream: Stream | None = None) -> None:
    if nbytes:
        s = _stream_for(stream)
        call(_drv.cuMemsetD8Async, dst, value & 0xFF, nbytes, s._handle)


def _gpu(spec) -> Device:
    d = device(spec)
    if not isinstance(d, Device):
        raise ValueError(f"{spec!r} is not a GPU; streams and events live on a CUDA device")
    return d
