"""Tensor on the host: every view op against numpy (random shapes, odd sizes, negative and None indexing), contiguity,
the reshape copy path, errors, and DLPack round trips with numpy (and torch where installed)."""

import gc
import weakref

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import cuda, dtypes
from fastdm.runtime.dlpack import from_dlpack
from fastdm.runtime.errors import NoGpuError, ShapeError
from fastdm.runtime.tensor import Tensor, empty, from_numpy, zeros
from numerics import randn

SIZES = (1, 2, 3, 5, 7)


def rand_shape(rng, lo=1, hi=4):
    return tuple(int(rng.choice(SIZES)) for _ in range(int(rng.integers(lo, hi + 1))))


def assert_view_of(t: Tensor, ref: np.ndarray, base: np.ndarray):
    """t has ref's shape, dtype and values, and shares base's memory (views never copy)."""
    out = t.numpy()
    assert out.shape == ref.shape == t.shape
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)
    if ref.size:
        assert np.shares_memory(out, base)
        assert t.data_ptr == ref.__array_interface__["data"][0]


def np_index(a, idx):
    # With an Ellipsis numpy returns a 0-d view (not a copied scalar) when every dim is indexed by an int.
    return a[idx] if Ellipsis in idx else a[idx + (Ellipsis,)]


def random_views(rng, a):
    """Pairs (Tensor view, numpy view) of `a` reached through random permutes, steps and narrows."""
    t = from_numpy(a)
    out = [(t, a)]
    perm = rng.permutation(a.ndim)
    out.append((t.permute(*perm), a.transpose(perm)))
    sl = tuple(slice(int(rng.integers(0, n)), None, int(rng.integers(1, 3))) for n in a.shape)
    out.append((t[sl], a[sl]))
    out.append((t[sl].permute(*perm), a[sl].transpose(perm)))
    return out


# ------------------------------------------------------------------------------------------- construction
def test_from_numpy_wraps_without_copy(rng):
    a = randn(rng, 3, 5, 7)
    t = from_numpy(a)
    assert t.numpy() is a
    assert (t.shape, t.strides, t.ndim, t.numel, t.itemsize, t.nbytes) == ((3, 5, 7), (35, 7, 1), 3, 105, 4, 420)
    assert t.dtype is dtypes.float32 and t.device is cuda.CPU and not t.is_cuda and t.buffer is None
    assert t.data_ptr == a.ctypes.data
    assert Tensor.from_numpy(a).numpy() is a
    a[1, 2, 3] = 42.0
    assert t[1, 2, 3].numpy() == 42.0
    assert len(t) == 3


def test_from_numpy_strided_and_negative_strides(rng):
    base = randn(rng, 6, 7, 5)
    for a in (base[::2, ::-1], base[:, 1::3].transpose(2, 0, 1), base[..., ::-2]):
        t = from_numpy(a)
        assert t.strides == tuple(s // 4 for s in a.strides)
        assert_view_of(t, a, base)
        assert_view_of(t[1:, None, 0], a[1:, None, 0], base)


def test_from_numpy_every_dtype(rng):
    for d in dtypes.ALL:
        a = (randn(rng, 3, 5) * 4).astype(d.np)
        t = from_numpy(a)
        assert t.dtype is d and t.itemsize == d.itemsize
        assert_view_of(t.transpose(0, 1)[1:], a.T[1:], a)


def test_empty_and_zeros():
    t = empty((3, 5), "bf16")
    assert t.shape == (3, 5) and t.dtype is dtypes.bfloat16 and t.numpy().dtype == ml_dtypes.bfloat16
    z = zeros(7, np.int32)
    assert z.shape == (7,) and z.dtype is dtypes.int32 and not z.numpy().any()
    z = zeros((2, 0, 3), dtypes.float16)
    assert z.numel == 0 and z.numpy().shape == (2, 0, 3)
    with pytest.raises(ShapeError):
        empty((2, -1))


def test_zero_dim_and_zero_size(rng):
    a = np.array(2.5, dtype=np.float32)
    t = from_numpy(a)
    assert t.shape == () and t.numel == 1 and t.is_contiguous()
    assert t[...].numpy() == 2.5 and t[None].shape == (1,) and t.view(1, 1).shape == (1, 1)
    assert t.unsqueeze(0).shape == (1,) and t.reshape(-1).shape == (1,)
    with pytest.raises(TypeError):
        len(t)
    e = from_numpy(np.zeros((3, 0, 5), np.float32))
    assert e.is_contiguous() and e.view(0, 7).shape == (0, 7) and e.permute(2, 0, 1).shape == (5, 3, 0)
    assert e[1:2, :, ::2].numpy().shape == (1, 0, 3)
    with pytest.raises(ShapeError):
        e.view(-1, 0)  # the -1 is ambiguous


def test_repr():
    t = from_numpy(np.zeros((2, 3), ml_dtypes.bfloat16))
    assert repr(t) == "Tensor(shape=(2, 3), dtype=bfloat16, device=cpu)"
    assert "strides=(1, 3)" in repr(t.transpose(0, 1))


# ------------------------------------------------------------------------------------------------ indexing
def random_index(rng, ndim):
    items, used = [], 0
    ellipsis = rng.random() < 0.5
    while True:
        r = rng.random()
        if r < 0.15:
            items.append(None)
        elif used < ndim and r < 0.55:
            items.append(("int", used))
            used += 1
        elif used < ndim and r < 0.9:
            items.append(("slice", used))
            used += 1
        if rng.random() < 0.3 or used == ndim:
            break
    if ellipsis:
        items.insert(int(rng.integers(0, len(items) + 1)), Ellipsis)
    return items


def slice_bound(rng, n):
    return None if rng.random() < 0.3 else int(rng.integers(-n - 2, n + 3))


def concretize(rng, items, shape):
    # Ints and slices refer to the dims they consume; an Ellipsis shifts the later ones to the end.
    n_used = sum(1 for it in items if isinstance(it, tuple))
    out, dim = [], 0
    for it in items:
        if it is None:
            out.append(None)
        elif it is Ellipsis:
            out.append(Ellipsis)
            dim += len(shape) - n_used
        else:
            n = shape[dim]
            if it[0] == "int":
                out.append(int(rng.integers(-n, n)))
            else:
                step = None if rng.random() < 0.3 else int(rng.integers(1, 4))
                out.append(slice(slice_bound(rng, n), slice_bound(rng, n), step))
            dim += 1
    return tuple(out)


def test_getitem_matches_numpy(rng):
    for _ in range(400):
        a = randn(rng, *rand_shape(rng))
        for t, ref in random_views(rng, a):
            idx = concretize(rng, random_index(rng, ref.ndim), ref.shape)
            assert_view_of(t[idx], np_index(ref, idx), a)
    a = randn(rng, 5, 7)
    t = from_numpy(a)
    assert_view_of(t[2], a[2], a)
    assert_view_of(t[-1, ::3], a[-1, ::3], a)
    assert_view_of(t[..., None, 1:], a[..., None, 1:], a)
    assert_view_of(t[None, ..., None], a[None, ..., None], a)
    assert_view_of(t[np.int64(3)], a[np.int64(3)], a)
    assert_view_of(t[10:], a[10:], a)


def test_getitem_errors():
    t = from_numpy(np.zeros((3, 4), np.float32))
    for bad in (3, -4, (0, 4), (0, -5)):
        with pytest.raises(IndexError):
            t[bad]
    with pytest.raises(IndexError):
        t[0, 0, 0]
    with pytest.raises(IndexError):
        t[..., 0, ...]
    with pytest.raises(ShapeError, match="step"):
        t[::-1]
    for bad in ([0, 1], np.array([0]), np.array([0, 1]), True, 1.0, from_numpy(np.zeros(1, np.int64))):
        with pytest.raises(ShapeError):
            t[bad]


# -------------------------------------------------------------------------------------------- layout views
def test_permute_and_transpose(rng):
    for _ in range(100):
        a = randn(rng, *rand_shape(rng))
        for t, ref in random_views(rng, a):
            perm = [int(p) - ref.ndim if rng.random() < 0.5 else int(p) for p in rng.permutation(ref.ndim)]
            assert_view_of(t.permute(*perm), ref.transpose(perm), a)
            assert_view_of(t.permute(perm), ref.transpose(perm), a)
            x, y = (int(v) for v in rng.integers(-ref.ndim, ref.ndim, size=2))
            assert_view_of(t.transpose(x, y), np.swapaxes(ref, x, y), a)
    t = from_numpy(np.zeros((2, 3, 4), np.float32))
    for bad in ((0, 1), (0, 1, 1), (0, 1, 3), (0, 1, 2, 3)):
        with pytest.raises(ShapeError):
            t.permute(*bad)
    with pytest.raises(ShapeError):
        t.transpose(0, 3)


def test_narrow(rng):
    for _ in range(200):
        a = randn(rng, *rand_shape(rng))
        for t, ref in random_views(rng, a):
            d = int(rng.integers(0, ref.ndim))
            n = ref.shape[d]
            start = int(rng.integers(-n, n + 1))
            s = start + n if start < 0 else start
            length = int(rng.integers(0, n - s + 1))
            sl = (slice(None),) * d + (slice(s, s + length),)
            assert_view_of(t.narrow(d - ref.ndim if rng.random() < 0.3 else d, start, length), ref[sl], a)
    t = from_numpy(np.zeros((4, 5), np.float32))
    for bad in ((1, 2, 4), (1, 6, 0), (0, -5, 1), (1, 0, -1), (2, 0, 1)):
        with pytest.raises(ShapeError):
            t.narrow(*bad)


def test_unsqueeze_squeeze(rng):
    for _ in range(150):
        a = randn(rng, *rand_shape(rng))
        for t, ref in random_views(rng, a):
            d = int(rng.integers(-ref.ndim - 1, ref.ndim + 1))
            u = t.unsqueeze(d)
            assert_view_of(u, np.expand_dims(ref, d), a)
            assert_view_of(u.squeeze(d), ref, a)
            assert_view_of(t.squeeze(), np.squeeze(ref), a)
            ones = tuple(i for i, n in enumerate(ref.shape) if n == 1)
            if ones:
                assert_view_of(t.squeeze(ones[-1]), np.squeeze(ref, ones[-1]), a)
                assert_view_of(t.squeeze(ones), np.squeeze(ref, ones), a)
    t = from_numpy(np.zeros((1, 3, 1), np.float32))
    with pytest.raises(ShapeError, match="size 1"):
        t.squeeze(1)
    with pytest.raises(ShapeError):
        t.unsqueeze(4)
    with pytest.raises(ShapeError):
        t.squeeze(3)


def test_expand(rng):
    for _ in range(150):
        shape = tuple(1 if rng.random() < 0.5 else n for n in rand_shape(rng))
        a = randn(rng, *shape)
        t = from_numpy(a)
        lead = tuple(int(n) for n in rng.choice(SIZES, size=int(rng.integers(0, 3))))
        target = lead + tuple(int(rng.choice(SIZES)) if n == 1 else n for n in shape)
        tail = target[len(lead):]
        ask = lead + tuple(-1 if (n == m and rng.random() < 0.3) else m for n, m in zip(shape, tail, strict=True))
        e = t.expand(*ask)
        assert_view_of(e, np.broadcast_to(a, target), a)
        broadcast = [s for s, n, m in zip(e.strides[len(lead):], shape, tail, strict=True) if n == 1 and m != 1]
        assert all(s == 0 for s in broadcast)
    t = from_numpy(np.zeros((3, 1), np.float32))
    for bad in ((4, 1), (3,), (-1, 3, 2), (2, 3, -2)):
        with pytest.raises(ShapeError):
            t.expand(*bad)


def factor_shapes(rng, numel, count=6):
    """Random shapes with `numel` elements, some with a -1."""
    primes, n, p = [], numel, 2
    while n > 1:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    shapes = []
    for _ in range(count):
        ndim = int(rng.integers(1, 5))
        dims = [1] * ndim
        for q in primes:
            dims[int(rng.integers(0, ndim))] *= q
        if rng.random() < 0.4:
            dims[int(rng.integers(0, ndim))] = -1
        shapes.append(tuple(dims))
    return shapes


def numpy_view_or_none(a, shape):
    b = a.view()
    try:
        b.shape = shape  # numpy refuses exactly when a copy would be needed
    except AttributeError:
        return None
    return b


def test_view_on_contiguous_tensors(rng):
    for _ in range(100):
        a = randn(rng, *rand_shape(rng, 1, 5))
        t = from_numpy(a)
        for shape in factor_shapes(rng, a.size):
            assert_view_of(t.view(*shape), a.reshape(shape), a)
            assert_view_of(t.view(shape), a.reshape(shape), a)
            assert_view_of(t.reshape(shape), a.reshape(shape), a)


def test_view_on_strided_tensors_follows_numpy(rng):
    viewed = refused = 0
    for _ in range(150):
        a = randn(rng, *rand_shape(rng, 2, 4))
        for t, ref in random_views(rng, a)[1:]:
            ex = rng.choice(SIZES)
            expanded = np.broadcast_to(ref[None], (ex,) + ref.shape)
            variants = [(t, ref), (t.unsqueeze(0).expand(ex, *ref.shape), expanded)]
            for tv, rv in variants:
                for shape in factor_shapes(rng, rv.size):
                    expected = numpy_view_or_none(rv, shape)
                    if expected is None:
                        refused += 1
                        with pytest.raises(ShapeError, match="reshape"):
                            tv.view(*shape)
                        r = tv.reshape(*shape)  # the copy path
                        np.testing.assert_array_equal(r.numpy(), rv.reshape(shape))
                        assert r.is_contiguous() and not np.shares_memory(r.numpy(), a)
                    else:
                        viewed += 1
                        assert_view_of(tv.view(*shape), expected, a)
                        assert_view_of(tv.reshape(*shape), expected, a)
    assert viewed > 100 and refused > 100  # both paths were exercised


def test_bad_reshapes():
    t = from_numpy(np.zeros((4, 6), np.float32))
    for bad in ((5, 5), (-1, -1), (-1, 5), (4, -2), (25,), (0, -1)):
        with pytest.raises(ShapeError):
            t.view(*bad)
        with pytest.raises(ShapeError):
            t.reshape(*bad)
    with pytest.raises(ShapeError, match="without copying"):
        t.transpose(0, 1).view(24)
    with pytest.raises(ShapeError):
        t.view(2.5, 2)


def test_contiguity_matches_numpy(rng):
    for _ in range(200):
        a = randn(rng, *rand_shape(rng))
        for t, ref in random_views(rng, a):
            idx = concretize(rng, random_index(rng, ref.ndim), ref.shape)
            v, rv = t[idx], np_index(ref, idx)
            assert v.is_contiguous() == rv.flags.c_contiguous, (ref.shape, idx)
            c = v.contiguous()
            assert c.is_contiguous()
            np.testing.assert_array_equal(c.numpy(), rv)
            if v.is_contiguous():
                assert c is v
            else:
                assert not np.shares_memory(c.numpy(), a)


# ----------------------------------------------------------------------------------------------- devices
def test_devices_on_the_host():
    assert cuda.device("cpu") is cuda.CPU and cuda.device(cuda.CPU) is cuda.CPU
    assert str(cuda.CPU) == "cpu" and cuda.CPU.type == "cpu"
    assert isinstance(cuda.is_available(), bool)
    for bad in ("gpu", "cuda:x", "cuda:-1", None, 1.5):
        with pytest.raises(ValueError):
            cuda.device(bad)
    t = from_numpy(np.zeros(3, np.float32))
    assert t.to("cpu") is t
    if not cuda.is_available():
        with pytest.raises(NoGpuError):
            cuda.device("cuda")
        with pytest.raises(NoGpuError):
            t.to("cuda")


def test_format_bytes():
    from fastdm.runtime.memory import format_bytes

    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(5 * 2**20) == "5.00 MiB"
    assert format_bytes(80 * 2**30) == "80.00 GiB" and format_bytes(10 * 10**12) == "9.09 TiB"
    assert format_bytes(3 * 2**50) == "3072.00 TiB"


# ------------------------------------------------------------------------------------------------- DLPack
NUMPY_DLPACK = ("float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "bool")


def bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


def sample(rng, d, *shape):
    x = randn(rng, *shape) * 5
    return (x > 0) if d.name == "bool" else x.astype(d.np)


@pytest.mark.parametrize("name", NUMPY_DLPACK)
def test_dlpack_to_numpy(rng, name):
    d = dtypes.dtype(name)
    a = sample(rng, d, 5, 6, 7)
    for t, ref in random_views(rng, a) + [(from_numpy(a)[2, None, ::3], a[2, None, ::3]),
                                         (from_numpy(a)[:, :1].expand(5, 4, 7), np.broadcast_to(a[:, :1], (5, 4, 7)))]:
        assert t.__dlpack_device__() == (1, 0)
        out = np.from_dlpack(t)
        assert out.dtype == d.np and out.shape == ref.shape
        np.testing.assert_array_equal(out, ref)
        assert np.shares_memory(out, a)


@pytest.mark.parametrize("name", NUMPY_DLPACK)
def test_dlpack_from_numpy(rng, name):
    d = dtypes.dtype(name)
    a = sample(rng, d, 4, 7, 3)
    for ref in (a, a.transpose(2, 0, 1), a[::2, ::-1], a[1], a[1, 2, 0:0], a[0, 0, 0, ...]):
        t = from_dlpack(ref)
        assert t.dtype is d and t.shape == ref.shape and t.device is cuda.CPU
        np.testing.assert_array_equal(t.numpy(), ref)
        if ref.size:
            assert np.shares_memory(t.numpy(), a)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float16", "int64"])
def test_dlpack_round_trip_through_capsules(rng, name):
    # numpy cannot read bfloat16 / float8 through DLPack, so these round trip through fastdm's own import.
    d = dtypes.dtype(name)
    a = (randn(rng, 6, 5) * 3).astype(d.np)
    t = from_numpy(a).transpose(0, 1)[1:, ::2]
    back = from_dlpack(t)
    assert back.dtype is d and back.shape == t.shape and back.strides == t.strides and back.data_ptr == t.data_ptr
    np.testing.assert_array_equal(bits(back.numpy()), bits(a.T[1:, ::2]))
    back2 = from_dlpack(t.__dlpack__())  # a bare capsule is accepted too
    assert back2.data_ptr == t.data_ptr


def test_dlpack_unsupported_by_consumer_keeps_errors_and_frees(rng):
    # numpy rejects a bfloat16 capsule; the capsule is destroyed while numpy's exception is pending. That must
    # leave numpy's own error intact (no SystemError) and release the tensor.
    t = from_numpy(randn(rng, 3, 4).astype(ml_dtypes.bfloat16))
    alive = weakref.ref(t)
    with pytest.raises((RuntimeError, BufferError, TypeError)) as info:
        np.from_dlpack(t)
    assert not isinstance(info.value, SystemError)
    del t, info
    gc.collect()
    assert alive() is None


def test_dlpack_export_lifetime(rng):
    a = randn(rng, 5, 3)
    t = from_numpy(a)[1:]
    alive = weakref.ref(t)
    capsule = t.__dlpack__()
    del t
    gc.collect()
    assert alive() is not None  # the unconsumed capsule keeps it
    del capsule
    gc.collect()
    assert alive() is None

    t = from_numpy(a)[::2]
    alive = weakref.ref(t)
    out = np.from_dlpack(t)
    del t
    gc.collect()
    assert alive() is not None  # the consumer's array keeps it
    np.testing.assert_array_equal(out, a[::2])
    del out
    gc.collect()
    assert alive() is None


def test_dlpack_import_calls_the_producer_deleter(rng):
    a = randn(rng, 4, 6)
    alive = weakref.ref(a)
    t = from_dlpack(a)
    view = t.transpose(0, 1)[2:]
    del a, t
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(view.numpy(), alive().T[2:])
    del view
    gc.collect()
    assert alive() is None


def test_dlpack_capsule_is_consumed_once(rng):
    capsule = np.arange(6, dtype=np.int32).__dlpack__()
    t = from_dlpack(capsule)
    np.testing.assert_array_equal(t.numpy(), np.arange(6))
    with pytest.raises(BufferError, match="consumed"):
        from_dlpack(capsule)
    with pytest.raises(AttributeError):
        from_dlpack(object())


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "int32", "uint8", "bool"])
def test_dlpack_torch_cpu_round_trip(rng, name):
    torch = pytest.importorskip("torch")
    d = dtypes.dtype(name)
    a = sample(rng, d, 5, 7)
    t = from_numpy(a).transpose(0, 1)[1:]
    tt = torch.from_dlpack(t)
    assert tuple(tt.shape) == t.shape and tuple(tt.stride()) == t.strides and tt.data_ptr() == t.data_ptr
    back = from_dlpack(tt)
    assert back.dtype is d and back.data_ptr == t.data_ptr
    np.testing.assert_array_equal(bits(back.numpy()), bits(a.T[1:]))
