"""Runtime core on a GPU: devices, streams, events, the caching allocator, pinned memory, GPU tensors and DLPack.

Everything here but `test_strided_views_download_via_kernel` uses only the driver API; that one needs the kernel
library's `ops.cuda.contiguous`.
"""

import gc
import threading
import weakref

import numpy as np
import pytest
from fastdm.runtime import cuda, dtypes, memory
from fastdm.runtime.dlpack import from_dlpack
from fastdm.runtime.errors import CudaError, NoGpuError, OutOfMemoryError
from fastdm.runtime.memory import PinnedBuffer, format_bytes
from fastdm.runtime.tensor import empty, from_numpy, zeros
from numerics import randn

pytestmark = pytest.mark.gpu

MiB = 1 << 20
GiB = 1 << 30


def sample(rng, d, *shape):
    x = randn(rng, *shape) * 5
    return (x > 0) if d.name == "bool" else x.astype(d.np)


def bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


def download(ptr: int, nbytes: int, stream=None) -> np.ndarray:
    out = np.empty(nbytes, np.uint8)
    s = cuda.current_stream() if stream is None else stream
    cuda.memcpy_dtoh(out.ctypes.data, ptr, nbytes, s)
    s.synchronize()
    return out


# ---------------------------------------------------------------------------------------------- devices
def test_device_properties():
    assert cuda.is_available() and cuda.device_count() >= 1
    d = cuda.Device(0)
    assert cuda.device("cuda:0") is d and cuda.device(0) is d and cuda.device(d) is d
    assert str(d) == "cuda:0" and d.type == "cuda" and d.index == 0
    assert isinstance(d.name, str) and d.name
    major, minor = d.compute_capability
    assert major >= 7 and 0 <= minor <= 9
    assert 8 <= d.multiprocessor_count <= 1024
    assert 4 * GiB <= d.total_memory <= 1024 * GiB
    assert 1 * MiB <= d.l2_cache_size <= 1024 * MiB
    assert 48 * 1024 <= d.max_shared_memory_per_block_optin <= 1 * MiB
    free, total = d.mem_get_info()
    assert 0 < free <= total <= d.total_memory * 1.01
    d.synchronize()
    with pytest.raises(NoGpuError, match="does not exist"):
        cuda.Device(cuda.device_count() + 3)


def test_current_stream_and_use_stream():
    s = cuda.current_stream()
    assert s is cuda.current_stream(0) and s.handle not in (0, 1, 2) and s.device is cuda.Device(0)
    s2, s3 = cuda.Stream(), cuda.Stream(priority=-1)
    with cuda.use_stream(s2):
        assert cuda.current_stream() is s2
        with cuda.use_stream(s3):
            assert cuda.current_stream() is s3
        assert cuda.current_stream() is s2
        seen = []
        t = threading.Thread(target=lambda: seen.append(cuda.current_stream()))
        t.start()
        t.join()
        assert seen == [s]  # another thread keeps the shared default stream
    assert cuda.current_stream() is s


def test_gpu_objects_die_cleanly_on_other_threads(rng):
    # Garbage collection may free buffers, streams and events on a thread that never made a context current.
    gc.collect()  # tests that count bytes start without garbage that a collection could free under them
    before = memory.memory_stats().current
    held = {"buf": memory.allocator().alloc(1000), "pinned": PinnedBuffer(4096), "event": cuda.Event(),
            "stream": cuda.Stream(), "tensor": from_numpy(randn(rng, 33, 3), "cuda")[1:]}

    def drop_all():
        held.clear()
        t = from_numpy(np.arange(5, dtype=np.int32), "cuda")  # and new work runs there too
        np.testing.assert_array_equal(t.numpy(), np.arange(5))

    th = threading.Thread(target=drop_all)
    th.start()
    th.join()
    assert not held and memory.memory_stats().current == before


def test_stream_wait_orders_work_across_streams():
    n = 256 * MiB
    a = memory.allocator().alloc(n)
    s1, s2 = cuda.current_stream(), cuda.Stream()
    a.record_stream(s2)
    cuda.memset_d8(a.ptr, 3, n, s1)
    s1.synchronize()
    for v in (9, 8, 7):  # a few hundred microseconds of work on s2
        cuda.memset_d8(a.ptr, v, n, s2)
    s1.wait_stream(s2)
    out = download(a.ptr, n, s1)  # ordered after s2's memsets only through the wait
    assert (out == 7).all()
    a.free()


def test_events_time_a_memset():
    n = 64 * MiB
    buf = memory.allocator().alloc(n)
    s = cuda.current_stream()
    start, end = cuda.Event(), cuda.Event()
    start.record(s)
    cuda.memset_d8(buf.ptr, 0x5A, n, s)
    end.record(s)
    end.synchronize()
    assert end.query() and start.query()
    ms = start.elapsed_ms(end)
    assert 0.0 < ms < 1000.0
    assert (download(buf.ptr, n) == 0x5A).all()
    ev = s.record()  # a synchronisation-only event
    ev.synchronize()
    with pytest.raises(CudaError) as info:
        ev.elapsed_ms(end)  # no timing on that event: the driver's error name comes through
    assert info.value.name.startswith("CUDA_ERROR_")


# -------------------------------------------------------------------------------------------- allocator
def test_allocator_stress_two_streams(rng):
    alloc = memory.allocator()
    s1, s2 = cuda.current_stream(), cuda.Stream()
    gc.collect()
    gc.disable()  # a collection of some earlier test's garbage would change the counts under us
    try:
        alloc.reset_peak()
        start = alloc.stats()
        assert start.peak == start.current
        live: dict[int, tuple] = {}  # id -> (buffer, size, fill byte)
        live_sum = max_live = start.current
        for i in range(4000):
            if live and (rng.random() < 0.45 or len(live) > 150):
                key = list(live)[int(rng.integers(0, len(live)))]
                buf, size, _ = live.pop(key)
                other = s2 if buf.stream is s1 else s1
                if rng.random() < 0.3:
                    other.wait_stream(buf.stream)  # the allocation is ordered on buf.stream
                    cuda.memset_d8(buf.ptr, 0xEE, size, other)  # a use on the other stream...
                    buf.record_stream(other)  # ...that the free must wait for
                if rng.random() < 0.5:
                    buf.free()
                    buf.free()  # idempotent
                del buf  # otherwise freed by garbage collection (refcount)
                live_sum -= size
            else:
                r = rng.random()
                size = int(rng.integers(1, 4097)) if r < 0.6 else (
                    int(rng.integers(4097, 4 * MiB)) if r < 0.97 else int(rng.integers(8 * MiB, 48 * MiB)))
                stream = s1 if rng.random() < 0.5 else s2
                buf = alloc.alloc(size, stream)
                assert buf.nbytes == size and buf.stream is stream and buf.ptr % 16 == 0
                fill = i % 251
                cuda.memset_d8(buf.ptr, fill, size, stream)
                live[i] = (buf, size, fill)
                live_sum += size
                max_live = max(max_live, live_sum)
            st = alloc.stats()
            assert st.current == live_sum and st.peak == max_live
            assert st.num_allocs == start.num_allocs + len(live)
            if i % 500 == 499:  # no two live buffers may overlap: each still holds its own fill byte
                s1.synchronize()
                s2.synchronize()
                for buf, size, fill in live.values():
                    head = download(buf.ptr, min(size, 64))
                    tail = download(buf.ptr + size - min(size, 64), min(size, 64))
                    assert (head == fill).all() and (tail == fill).all()
        live.clear()
        buf = None  # the loops above leave the last buffer bound to this name
        cuda.Device(0).synchronize()
        end = alloc.stats()
        assert end.current == start.current and end.num_allocs == start.num_allocs
        assert end.peak == max_live
        assert end.peak_reserved >= max_live and end.reserved >= end.current
        alloc.empty_cache()
        assert alloc.stats().reserved <= end.reserved
    finally:
        gc.enable()


def test_zero_byte_buffers_and_module_helpers():
    gc.collect()
    before = memory.memory_stats()
    b = memory.allocator().alloc(0)
    assert b.nbytes == 0 and memory.memory_stats() == before
    b.free()
    t = empty((3, 0, 5), "bf16", "cuda")
    assert t.numel == 0 and t.numpy().shape == (3, 0, 5)
    memory.empty_cache()
    assert memory.memory_stats(0).current == before.current


def test_out_of_memory_is_readable():
    alloc = memory.allocator()
    gc.collect()
    before = alloc.stats()
    n = 10 * 10**12  # 10 TB: more than any card
    with pytest.raises(OutOfMemoryError) as info:
        alloc.alloc(n)
    msg = str(info.value)
    assert format_bytes(n) in msg and "9.09 TiB" in msg
    assert "free" in msg and "offload" in msg and "cuda:0" in msg
    with pytest.raises(OutOfMemoryError):
        empty((10**7, 10**6), "float32", "cuda")
    assert alloc.stats().current == before.current

    # A request that fits the card in principle but not what is free: this one comes back from the driver.
    alloc.empty_cache()
    free, total = cuda.Device(0).mem_get_info()
    big = alloc.alloc(int(free * 0.6))
    try:
        cuda.Device(0).synchronize()
        alloc.empty_cache()
        free_now, _ = cuda.Device(0).mem_get_info()
        ask = free_now + 1 * GiB
        assert ask < total
        with pytest.raises(OutOfMemoryError) as info:
            alloc.alloc(ask)
        assert format_bytes(ask) in str(info.value) and "more than the whole card" not in str(info.value)
        assert alloc.stats().current == before.current + big.nbytes
        small = alloc.alloc(1000)  # the allocator still works
        small.free()
    finally:
        big.free()
        alloc.empty_cache()
    assert alloc.stats().current == before.current


def test_record_stream_delays_reuse():
    n = 128 * MiB
    alloc = memory.allocator()
    s1, s2 = cuda.current_stream(), cuda.Stream()
    for _ in range(3):
        a = alloc.alloc(n, s1)
        s2.wait_stream(s1)
        for v in (2, 2, 2, 2, 2, 2):  # long work on s2 writing 2s into a
            cuda.memset_d8(a.ptr, v, n, s2)
        a.record_stream(s2)
        a.free()  # the block may be handed out again on s1, but only after s2's memsets
        b = alloc.alloc(n, s1)
        cuda.memset_d8(b.ptr, 1, n, s1)
        out = download(b.ptr, n, s1)
        s2.synchronize()
        assert (out == 1).all()
        assert (download(b.ptr, n, s1) == 1).all()  # s2 did not write after s1's memset either
        b.free()


def test_pinned_buffer_round_trip(rng):
    a = randn(rng, 257, 33)
    s = cuda.current_stream()
    with PinnedBuffer(a.nbytes) as src, PinnedBuffer(a.nbytes + 100) as dst:
        assert src.ptr != 0 and src.nbytes == a.nbytes
        src.array(np.float32, a.shape)[:] = a
        dst.array()[:] = 0xFF  # poison
        t = empty(a.shape, "float32", "cuda")
        cuda.memcpy_htod(t.data_ptr, src.ptr, a.nbytes, s)
        cuda.memcpy_dtoh(dst.ptr, t.data_ptr, a.nbytes, s)
        s.synchronize()
        np.testing.assert_array_equal(dst.array(np.float32, a.shape), a)
        assert (dst.array()[a.nbytes:] == 0xFF).all()
        view = dst.array(dtypes.bfloat16.np, (10,))
        assert view.shape == (10,) and view.dtype == dtypes.bfloat16.np
        with pytest.raises(ValueError):
            dst.array(np.float64, (a.size,))
    src.free()  # idempotent after the with block
    assert src.ptr == 0
    assert PinnedBuffer(0).array().size == 0


# ------------------------------------------------------------------------------------------ GPU tensors
def test_upload_download_every_dtype(rng):
    for d in dtypes.ALL:
        for shape in ((3, 5, 7), (1,), (), (2, 0, 3), (1031,)):
            a = sample(rng, d, *shape)
            t = from_numpy(a, "cuda")
            assert t.is_cuda and t.device is cuda.Device(0) and t.dtype is d and t.shape == a.shape
            assert t.is_contiguous() and t.buffer.nbytes == a.nbytes and t.data_ptr == t.buffer.ptr
            np.testing.assert_array_equal(bits(t.numpy()), bits(a))
            back = t.to("cpu")
            assert back.device is cuda.CPU and back.dtype is d
            np.testing.assert_array_equal(bits(back.numpy()), bits(a))
            assert t.to("cuda") is t and t.to(0) is t
            u = from_numpy(a).to("cuda:0")  # host Tensor -> GPU
            np.testing.assert_array_equal(bits(u.numpy()), bits(a))
    # non-contiguous host arrays upload with their values, not their memory layout
    a = randn(rng, 6, 9)[::2, ::-3]
    np.testing.assert_array_equal(from_numpy(a, "cuda").numpy(), a)


def test_zeros_writes_every_byte():
    n = (3, 1001)
    poison = memory.allocator().alloc(3 * 1001 * 4)
    cuda.memset_d8(poison.ptr, 0xFF, poison.nbytes)
    poison.free()  # the next same-size allocation on this stream likely reuses it
    z = zeros(n, "float32", "cuda")
    out = z.numpy()
    assert out.shape == n and not out.any()
    assert repr(z) == "Tensor(shape=(3, 1001), dtype=float32, device=cuda:0)"


def view_cases(shape, perm):
    return [
        lambda t: t.permute(*perm), lambda t: t.transpose(0, -1), lambda t: t[1:, ..., ::2],
        lambda t: t[-1], lambda t: t[None, 0], lambda t: t.narrow(0, 1, shape[0] - 1),
        lambda t: t.unsqueeze(-1), lambda t: t.reshape(-1), lambda t: t.view(shape[0], -1),
        lambda t: t.unsqueeze(1).expand(shape[0], 4, *shape[1:]), lambda t: t.squeeze(),
    ]


def test_views_on_gpu(rng):
    # Metadata of every view equals the host computation; views that stay contiguous download without a kernel.
    for _ in range(40):
        shape = tuple(int(rng.choice((1, 2, 3, 5, 7))) for _ in range(int(rng.integers(2, 5))))
        a = randn(rng, *shape)
        g, h = from_numpy(a, "cuda"), from_numpy(a)
        for op in view_cases(shape, tuple(int(p) for p in rng.permutation(a.ndim))):
            gv, hv = op(g), op(h)
            assert (gv.shape, gv.strides, gv.dtype) == (hv.shape, hv.strides, hv.dtype)
            assert gv.data_ptr - g.data_ptr == hv.data_ptr - h.data_ptr
            assert gv.buffer is g.buffer and gv.is_contiguous() == hv.is_contiguous()
            if gv.is_contiguous():
                np.testing.assert_array_equal(gv.numpy(), hv.numpy())
    big = from_numpy(randn(rng, 9, 11), "cuda")
    np.testing.assert_array_equal(big[4:7].numpy(), big.numpy()[4:7])
    np.testing.assert_array_equal(big[5].numpy(), big.numpy()[5])


def test_strided_views_download_via_kernel(rng):
    """Needs the kernel library: a non-contiguous GPU tensor downloads through ops.contiguous."""
    from fastdm.runtime.ops import cuda as cuda_ops  # an import error here is a real failure

    if not hasattr(cuda_ops, "contiguous"):
        pytest.skip("ops.cuda.contiguous is not implemented yet")
    for d in (dtypes.float32, dtypes.bfloat16, dtypes.float16):
        for _ in range(10):
            shape = tuple(int(rng.choice((1, 2, 3, 5, 7, 33))) for _ in range(int(rng.integers(2, 5))))
            a = (randn(rng, *shape) * 3).astype(d.np)
            g = from_numpy(a, "cuda")
            perm = tuple(int(p) for p in rng.permutation(a.ndim))
            for gv, ref in ((g.permute(*perm), a.transpose(perm)), (g[..., ::2], a[..., ::2]),
                            (g[:, None].expand(shape[0], 3, *shape[1:]), np.broadcast_to(a[:, None],
                                                                                        (shape[0], 3) + shape[1:])),
                            (g.transpose(0, -1)[1:], a.swapaxes(0, -1)[1:])):
                np.testing.assert_array_equal(bits(gv.numpy()), bits(ref))
                c = gv.contiguous()
                assert c.is_contiguous() and c.shape == ref.shape
                np.testing.assert_array_equal(bits(c.numpy()), bits(ref))
                r = gv.reshape(-1)
                np.testing.assert_array_equal(bits(r.numpy()), bits(ref.reshape(-1)))


# ------------------------------------------------------------------------------------------------ DLPack
def test_dlpack_gpu_self_round_trip(rng):
    for d in (dtypes.float32, dtypes.bfloat16, dtypes.float8_e4m3fn, dtypes.int64, dtypes.bool_):
        a = sample(rng, d, 6, 7)
        t = from_numpy(a, "cuda")[1:].transpose(0, 1)
        assert t.__dlpack_device__() == (2, 0)
        back = from_dlpack(t)
        assert back.is_cuda and back.device is cuda.Device(0) and back.dtype is d
        assert (back.shape, back.strides, back.data_ptr) == (t.shape, t.strides, t.data_ptr)
        with cuda.use_stream(cuda.Stream()):  # the producer is asked to order its work before this stream
            flat = from_dlpack(from_numpy(a, "cuda")[2:])
            np.testing.assert_array_equal(bits(flat.numpy()), bits(a[2:]))
    del t, back, flat
    gc.collect()
    before = memory.memory_stats().current
    t = from_numpy(randn(rng, 100, 10), "cuda")
    alive = weakref.ref(t)
    capsule = t.__dlpack__(stream=-1)
    imported = from_dlpack(capsule)
    del t, capsule
    gc.collect()
    assert alive() is not None and memory.memory_stats().current == before + 4000
    del imported
    gc.collect()
    assert alive() is None and memory.memory_stats().current == before


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16", "int32", "int64", "uint8", "bool"])
def test_dlpack_gpu_torch(rng, name):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    d = dtypes.dtype(name)
    a = sample(rng, d, 5, 7)
    t = from_numpy(a, "cuda")
    tt = torch.from_dlpack(t)
    assert tt.is_cuda and tt.data_ptr() == t.data_ptr and tuple(tt.shape) == t.shape
    as_bits = (lambda x: x.view(torch.int16)) if name == "bfloat16" else (lambda x: x)
    np.testing.assert_array_equal(bits(as_bits(tt).cpu().numpy()), bits(a))
    tv = torch.from_dlpack(t[1:].transpose(0, 1))
    assert tuple(tv.stride()) == (1, 7) and tv.data_ptr() == t.data_ptr + 7 * d.itemsize

    x = torch.from_dlpack(t).clone()[1:]  # torch-owned memory, written on torch's stream; contiguous rows
    f = from_dlpack(x)
    assert f.is_cuda and f.data_ptr == x.data_ptr() and f.dtype is d and f.shape == tuple(x.shape)
    np.testing.assert_array_equal(bits(f.numpy()), bits(a[1:]))
    del x
    gc.collect()
    junk = torch.full((64, 1024), 7, device="cuda", dtype=torch.int32)  # would reuse x's block were it freed
    np.testing.assert_array_equal(bits(f.numpy()), bits(a[1:]))  # our tensor keeps torch's memory
    del junk
