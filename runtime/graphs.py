"""CUDA graphs: record the kernels a function queues on a stream once, then relaunch them all with one driver call.

A model forward is a few thousand small Python op calls; at 30-60 us of host time each, a 1024^2 SDXL UNet step
spends more time in Python than the GPU spends computing. Replaying a captured graph costs a few microseconds
whatever the number of kernels.

`CapturedCall(fn)` wraps a function of device Tensors that returns one device Tensor. Per distinct input signature
(shapes, dtypes, device, strides) the first call runs `fn` eagerly (so lazy caches, weight conversions and kernel
workspaces are made outside any capture), the second captures it into a graph over static copies of the inputs,
and every later call copies the inputs in, replays the graph and copies the output out. `fn` must be a pure
function of its tensor arguments and of state that does not change between calls (weights): a capture records
pointers and sizes, not Python decisions. It must not read device data on the host or upload host data.

Memory that `fn` allocates while being captured becomes graph memory (allocation nodes, cuMemAllocFromPoolAsync
under capture): it is mapped when the graph is launched and can be given back with `trim_graph_memory()` once no
launch is pending (the pipelines do so after their denoising loop, before the VAE runs).
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from collections.abc import Callable

from . import cuda
from .cuda import _drv
from .errors import CaptureError, CudaError, FastdmError
from .memory import allocator
from .tensor import Tensor, empty


def graphs_enabled() -> bool:
    """Whether models capture CUDA graphs: on unless the environment sets FASTDM_CUDA_GRAPHS=0."""
    return os.environ.get("FASTDM_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


class Graph:
    """One instantiated CUDA graph, launched on the stream it was captured on."""

    def __init__(self, graph, graph_exec, stream: cuda.Stream):
        self._graph, self._exec, self.stream = graph, graph_exec, stream

    @classmethod
    def capture(cls, fn: Callable[[], None], stream: cuda.Stream | None = None) -> Graph:
        """Capture the work fn() queues on `stream` (default: the current stream). fn writes its results into
        tensors made before the capture; every tensor it allocates must be released by the time it returns. The
        Python garbage collector is paused meanwhile: a collected tensor from before the capture would be freed
        into the graph."""
        stream = cuda.current_stream() if stream is None else stream
        stream.device.set_current()
        pool = allocator(stream.device)
        was_enabled = gc.isenabled()
        gc.disable()
        mode = _drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        cuda.call(_drv.cuStreamBeginCapture, stream._handle, mode)
        pool.begin_capture()
        graph = None
        try:
            with cuda.use_stream(stream):
                fn()
        except BaseException as exc:
            err, graph = _drv.cuStreamEndCapture(stream._handle)  # always leave capture mode
            if int(err) == 0 and graph:
                _drv.cuGraphDestroy(graph)
            pool.abandon(pool.end_capture())
            if was_enabled:
                gc.enable()
            if isinstance(exc, CudaError):
                raise CaptureError(f"CUDA graph capture failed: {exc}. The captured function did something a "
                                   "graph cannot record; run eagerly with FASTDM_CUDA_GRAPHS=0") from exc
            raise
        try:
            graph = cuda.call(_drv.cuStreamEndCapture, stream._handle)
        except CudaError as exc:
            pool.abandon(pool.end_capture())
            raise CaptureError(f"CUDA graph capture was invalidated: {exc}. Run eagerly with "
                               "FASTDM_CUDA_GRAPHS=0") from exc
        finally:
            if was_enabled:
                gc.enable()
        kept = pool.end_capture()
        if kept:
            # A graph allocation the graph does not free blocks its relaunch: the function kept a tensor it made
            # (e.g. in a cache) or returned one. Drop the graph and those tensors, and say so.
            _drv.cuGraphDestroy(graph)
            pool.abandon(kept)
            raise CaptureError(f"CUDA graph capture: the captured function kept {len(kept)} tensor(s) it allocated "
                               "alive after the capture; return results through CapturedCall (it copies them out) "
                               "and build caches before capturing, or run eagerly with FASTDM_CUDA_GRAPHS=0")
        graph_exec = cuda.call(_drv.cuGraphInstantiate, graph, 0)
        return cls(graph, graph_exec, stream)

    def replay(self) -> None:
        """Launch the graph on its stream (asynchronous, like any kernel launch)."""
        self.stream.device.set_current()
        cuda.call(_drv.cuGraphLaunch, self._exec, self.stream._handle)

    def __del__(self):
        if getattr(self, "_exec", None) is not None:
            _drv.cuGraphExecDestroy(self._exec)
            _drv.cuGraphDestroy(self._graph)
            self._exec = None


def _signature(tensors: tuple[Tensor, ...]) -> tuple:
    """What a graph is specific to: the inputs' shapes, dtypes, device and strides, and the stream it runs on (its
    input copies and its replay are ordered on that stream)."""
    stream = cuda.current_stream(tensors[0].device).handle if tensors else 0
    return tuple((t.shape, t.dtype.name, t.device.index, t.strides) for t in tensors) + (stream,)


def _copy_into(dst: Tensor, src: Tensor) -> None:
    """Device copy of the contiguous src into the contiguous dst (same shape and dtype)."""
    cuda.memcpy_dtod(dst.data_ptr, src.data_ptr, src.nbytes)


class _Entry:
    def __init__(self, graph: Graph, inputs: tuple[Tensor, ...], output: Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class CapturedCall:
    """fn(*tensors) -> Tensor, replayed from a CUDA graph per input signature (see the module docstring). Inputs
    must be contiguous GPU tensors on one device; the result is a new tensor on every call. At most `max_graphs`
    signatures keep a graph (the least recently used one is dropped: a process that renders many image sizes does
    not accumulate graphs)."""

    def __init__(self, fn: Callable[..., Tensor], name: str = "forward", max_graphs: int = 4):
        self.fn, self.name, self.max_graphs = fn, name, max_graphs
        self._out_spec: dict[tuple, tuple] = {}  # signature -> (shape, dtype) of fn's result, from the eager call
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not all(isinstance(t, Tensor) and t.is_cuda and t.is_contiguous() for t in inputs):
            raise FastdmError(f"CapturedCall({self.name}): inputs must be contiguous GPU tensors")
        key = _signature(inputs)
        entry = self._entries.get(key)
        if entry is None:
            if key not in self._out_spec:  # first time: eager, so every lazy cache exists before a capture
                y = self.fn(*inputs)
                self._check_result(y)
                self._out_spec[key] = (y.shape, y.dtype)
                return y
            entry = self._entries[key] = self._capture(inputs, *self._out_spec[key])
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        for static, t in zip(entry.inputs, inputs, strict=True):
            _copy_into(static, t)
        entry.graph.replay()
        out = empty(entry.output.shape, entry.output.dtype, entry.output.device)
        _copy_into(out, entry.output)
        return out

    def _check_result(self, y) -> None:
        if not (isinstance(y, Tensor) and y.is_cuda and y.is_contiguous()):
            raise FastdmError(f"CapturedCall({self.name}): the function must return one contiguous GPU tensor")

    def _capture(self, inputs: tuple[Tensor, ...], out_shape: tuple[int, ...], out_dtype) -> _Entry:
        # Static inputs and the output live in ordinary pool memory (made before the capture); everything fn
        # allocates in between is graph memory that the graph itself frees again.
        static = tuple(empty(t.shape, t.dtype, t.device) for t in inputs)
        for s, t in zip(static, inputs, strict=True):
            _copy_into(s, t)
        output = empty(out_shape, out_dtype, inputs[0].device)

        def body() -> None:
            y = self.fn(*static)
            self._check_result(y)
            if y.shape != output.shape or y.dtype != output.dtype:
                raise FastdmError(f"CapturedCall({self.name}): the result changed from {output.shape} "
                                  f"{output.dtype.name} to {y.shape} {y.dtype.name} for the same inputs")
            _copy_into(output, y)

        graph = Graph.capture(body)
        return _Entry(graph, static, output)

    def clear(self) -> None:
        """Drop the captured graphs (they are captured again on demand, after one more eager call)."""
        self._entries.clear()
        self._out_spec.clear()


def trim_graph_memory(device=None) -> None:
    """Give the physical memory cached for graph allocations back to the card (after the graphs' launches have
    finished; it is mapped again at the next launch)."""
    dev = cuda.current_device() if device is None else cuda._gpu(device)
    dev.synchronize()
    cuda.call(_drv.cuDeviceGraphMemTrim, dev._cu_device)


def graph_memory_used(device=None, peak: bool = False) -> int:
    """Bytes of graph-allocation memory in use on `device` now (or its high-water mark since the last
    reset_graph_memory_peak() with peak=True)."""
    dev = cuda.current_device() if device is None else cuda._gpu(device)
    attr = (_drv.CUgraphMem_attribute.CU_GRAPH_MEM_ATTR_USED_MEM_HIGH if peak
            else _drv.CUgraphMem_attribute.CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT)
    return int(cuda.call(_drv.cuDeviceGetGraphMemAttribute, dev._cu_device, attr))


def reset_graph_memory_peak(device=None) -> None:
    dev = cuda.current_device() if device is None else cuda._gpu(device)
    attr = _drv.CUgraphMem_attribute.CU_GRAPH_MEM_ATTR_USED_MEM_HIGH
    cuda.call(_drv.cuDeviceSetGraphMemAttribute, dev._cu_device, attr, _drv.cuuint64_t(0))
