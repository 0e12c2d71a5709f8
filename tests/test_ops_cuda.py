"""ops.cuda hand-written kernels (norms, RoPE, activations, elementwise, layout, casts) against ops.cpu.

float32, float16 and bfloat16 storage; odd sizes (rows of 1, 3, 4097; hidden 64, 3072, 3073) so both the 16-byte
vector paths and the scalar paths run; strided views (heads of a fused QKV buffer, column slices, transposes, batch
chunks of a [B, 6D] modulation buffer). Before each op the allocator's free memory is filled with NaN bytes, so
outputs the kernel leaves unwritten come back NaN and fail. Copies and casts must match bit for bit.
"""


import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from gpu_ops import DTYPES, NP, gpu, oc, poisoned, rand
from numerics import TOL, randn, rel_l2

pytestmark = pytest.mark.gpu

ROWS_D = [(1, 64), (3, 3072), (3, 3073), (4097, 64), (4097, 3073), (33, 65), (5, 1)]


def check(out: Tensor, ref: np.ndarray, dtype: str) -> None:
    assert out.dtype.name == dtype, (out.dtype.name, dtype)
    assert out.shape == ref.shape and out.is_contiguous(), (out.shape, ref.shape, out.strides)
    err = rel_l2(out.numpy().astype(np.float32), ref)
    assert err < TOL[dtype], f"rel_l2 {err:.3g} >= {TOL[dtype]} (dtype {dtype}, shape {ref.shape})"


def same_bits(got: np.ndarray, ref: np.ndarray) -> None:
    """Bitwise equality; NaN only has to meet NaN (payloads may differ)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, ref.dtype, got.shape, ref.shape)
    raw = f"u{got.dtype.itemsize}"
    same = got.view(raw) == ref.view(raw)
    if got.dtype.kind not in "iub":  # float16/32 and the ml_dtypes floats
        same |= np.isnan(got.astype(np.float32)) & np.isnan(ref.astype(np.float32))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, (f"{bad.size} of {got.size} differ, first at {bad[:5]}: {got.ravel()[bad[:5]]} vs "
                           f"{ref.ravel()[bad[:5]]}")


# ------------------------------------------------------------------------------------------- row reductions
# name -> (GPU call on (x, weight, bias) Tensors, reference on the numpy arrays)
ROW_OPS = {
    "layer_norm": (lambda t, w, b: oc().layer_norm(t, eps=1e-5), lambda x, w, b: cpu.layer_norm(x, eps=1e-5)),
    "layer_norm_affine": (lambda t, w, b: oc().layer_norm(t, w, b, eps=1e-6),
                          lambda x, w, b: cpu.layer_norm(x, w, b, eps=1e-6)),
    "rms_norm": (lambda t, w, b: oc().rms_norm(t, eps=1e-6), lambda x, w, b: cpu.rms_norm(x, eps=1e-6)),
    "rms_norm_weight": (lambda t, w, b: oc().rms_norm(t, w, eps=1e-5), lambda x, w, b: cpu.rms_norm(x, w, eps=1e-5)),
    "softmax": (lambda t, w, b: oc().softmax(t), lambda x, w, b: cpu.softmax(x)),
}


def run_row_op(op: str, rng, dtype: str, xt: Tensor, x: np.ndarray) -> None:
    d = x.shape[-1]
    w, b = rand(rng, dtype, d, shift=1.0), rand(rng, dtype, d)
    fn, ref = ROW_OPS[op]
    check(poisoned(fn, xt, gpu(w), gpu(b)), ref(np.ascontiguousarray(x), w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", ROWS_D, ids=[f"{r}x{d}" for r, d in ROWS_D])
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_ops(rng, op, dtype, rows, d):
    x = rand(rng, dtype, rows, d, scale=2.0, shift=0.5)  # a mean away from 0 checks the two-pass statistics
    run_row_op(op, rng, dtype, gpu(x), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["qkv_heads", "col_slice", "col_slice_unaligned", "transposed"])
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_ops_strided(rng, op, dtype, view):
    """Rows read through strides: q heads of [B, S, 3, H, D], a column window of a wider matrix (16-byte aligned
    or not), and a transposed view (last dim not contiguous: copied first)."""
    if view == "qkv_heads":
        buf = rand(rng, dtype, 2, 37, 3, 5, 64, scale=2.0, shift=0.5)
        xt, x = gpu(buf)[:, :, 1], buf[:, :, 1]
    elif view.startswith("col_slice"):
        start = 1 if view.endswith("unaligned") else 8
        buf = rand(rng, dtype, 129, 3072 + 16, scale=2.0, shift=0.5)
        xt, x = gpu(buf)[:, start:start + 3072], buf[:, start:start + 3072]
    else:
        buf = rand(rng, dtype, 96, 65, scale=2.0, shift=0.5)
        xt, x = gpu(buf).transpose(0, 1), buf.T
    run_row_op(op, rng, dtype, xt, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_in_place_on_qkv(rng, dtype):
    """rms_norm(q, w, out=q) on the q heads of a fused QKV buffer rewrites those heads only."""
    buf = rand(rng, dtype, 2, 19, 3, 4, 128, scale=2.0)
    w = rand(rng, dtype, 128, shift=1.0)
    qkv = gpu(buf)
    q = qkv[:, :, 0]
    out = oc().rms_norm(q, gpu(w), out=q)
    assert out is q
    got = qkv.numpy().astype(np.float32)
    err = rel_l2(got[:, :, 0], cpu.rms_norm(buf[:, :, 0], w))
    assert err < TOL[dtype], err
    same_bits(qkv.numpy()[:, :, 1:], buf[:, :, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1])
def test_softmax_other_axes(rng, dtype, axis):
    x = rand(rng, dtype, 7, 33, 5, scale=3.0)
    check(poisoned(oc().softmax, gpu(x), axis=axis), cpu.softmax(x, axis=axis), dtype)


# --------------------------------------------------------------------------------------- adaLN modulation
BSD = [(1, 1, 64), (2, 77, 3072), (3, 5, 3073), (2, 4097, 64)]


def mod_vectors(rng, dtype: str, b: int, d: int, chunked: bool):
    """Two [B, D] vectors: plain arrays, or chunks 1 and 4 of one [B, 6D] buffer (strided views on the GPU)."""
    if chunked:
        buf = rand(rng, dtype, b, 6 * d, scale=0.5)
        t = gpu(buf)
        return (buf[:, d:2 * d], buf[:, 4 * d:5 * d]), (t[:, d:2 * d], t[:, 4 * d:5 * d])
    u, v = rand(rng, dtype, b, d, scale=0.5), rand(rng, dtype, b, d, scale=0.5)
    return (u, v), (gpu(u), gpu(v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BSD, ids=["x".join(map(str, s)) for s in BSD])
@pytest.mark.parametrize("chunked", [False, True], ids=["contig", "chunks"])
@pytest.mark.parametrize("op", ["layer_norm_modulate", "modulate", "gated_residual"])
def test_modulation(rng, op, dtype, shape, chunked):
    b, s, d = shape
    x = rand(rng, dtype, b, s, d, scale=2.0, shift=0.3)
    (u, v), (ut, vt) = mod_vectors(rng, dtype, b, d, chunked)
    if op == "layer_norm_modulate":
        out, ref = poisoned(oc().layer_norm_modulate, gpu(x), ut, vt, eps=1e-6), cpu.layer_norm_modulate(x, u, v)
    elif op == "modulate":
        out, ref = poisoned(oc().modulate, gpu(x), ut, vt), cpu.modulate(x, u, v)
    else:
        y = rand(rng, dtype, b, s, d)
        out, ref = poisoned(oc().gated_residual, gpu(x), ut, gpu(y)), cpu.gated_residual(x, u, y)
    check(out, ref, dtype)


# ---------------------------------------------------------------------------------------------- GroupNorm
GN = [((1, 32, 8, 8), 32), ((2, 64, 33, 17), 32), ((1, 128, 128, 160), 32), ((2, 320, 16, 16), 32),
      ((1, 6, 5), 3), ((3, 4), 2), ((1, 64, 1024, 65), 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GN, ids=["x".join(map(str, s)) + f"-g{g}" for s, g in GN])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("path", [0, 2], ids=["auto", "two_pass"])
def test_group_norm(rng, dtype, shape, groups, affine, activation, path):
    """path: fdm_group_norm_set_path's automatic choice (the one-pass cluster kernel on Hopper where it fits) or the
    two-pass kernels forced."""
    from fastdm import kernels

    x = rand(rng, dtype, *shape, scale=3.0, shift=5.0)  # a large mean checks the merged statistics
    c = shape[1]
    w = rand(rng, dtype, c, shift=1.0) if affine else None
    b = rand(rng, dtype, c) if affine else None
    kernels.call("fdm_group_norm_set_path", path)
    try:
        out = poisoned(oc().group_norm, gpu(x), None if w is None else gpu(w), None if b is None else gpu(b),
                       num_groups=groups, eps=1e-5, activation=activation)
    finally:
        kernels.call("fdm_group_norm_set_path", 0)
    ref = cpu.group_norm(x, w, b, num_groups=groups, eps=1e-5, activation=activation)
    # float32 at 1e-4, not 1e-5: a group of two values near the mean of 5 can have a spread near eps, where the
    # normalization multiplies the rounding of the mean (~2.4e-7, half an ulp of 5) by up to 1 / sqrt(eps) = 316.
    tol = 1e-4 if dtype == "float32" else TOL[dtype]
    err = rel_l2(out.numpy().astype(np.float32), ref)
    assert err < tol, f"rel_l2 {err:.3g} >= {tol} (dtype {dtype}, shape {ref.shape})"


# ---------------------------------------------------------------------------------------------------- RoPE
ROPE = [(1, 1, 1, 2), (2, 37, 3, 64), (1, 4097, 2, 128), (2, 5, 3, 6), (1, 3, 2, 3072)]


def angles(rng, s: int, d: int):
    theta = rng.uniform(-10, 10, (s, d // 2))
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE, ids=["x".join(map(str, s)) for s in ROPE])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
def test_rope(rng, dtype, shape, interleaved):
    x = rand(rng, dtype, *shape)
    cos, sin = angles(rng, shape[1], shape[3])
    out = poisoned(oc().rope, gpu(x), gpu(cos), gpu(sin), interleaved=interleaved)
    check(out, cpu.rope(x, cos, sin, interleaved=interleaved), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize("d", [128, 6])
def test_rope_in_place_on_qkv(rng, dtype, interleaved, d):
    """rope(k, out=k) on the k heads of a fused [B, S, 3, H, D] buffer, and rope of the q view into a new tensor."""
    buf = rand(rng, dtype, 2, 33, 3, 3, d)
    cos, sin = angles(rng, 33, d)
    qkv = gpu(buf)
    q_out = poisoned(oc().rope, qkv[:, :, 0], gpu(cos), gpu(sin), interleaved=interleaved)
    check(q_out, cpu.rope(buf[:, :, 0], cos, sin, interleaved=interleaved), dtype)
    k = qkv[:, :, 1]
    assert oc().rope(k, gpu(cos), gpu(sin), interleaved=interleaved, out=k) is k
    got = qkv.numpy()
    err = rel_l2(got[:, :, 1].astype(np.float32), cpu.rope(buf[:, :, 1], cos, sin, interleaved=interleaved))
    assert err < TOL[dtype], err
    same_bits(got[:, :, 0], buf[:, :, 0])
    same_bits(got[:, :, 2], buf[:, :, 2])


# ------------------------------------------------------------------------------------------- activations
ACTS = {
    "gelu": (lambda t: oc().gelu(t), lambda x: cpu.gelu(x)),
    "gelu_tanh": (lambda t: oc().gelu(t, approximate="tanh"), lambda x: cpu.gelu(x, approximate="tanh")),
    "silu": (lambda t: oc().silu(t), lambda x: cpu.silu(x)),
    "quick_gelu": (lambda t: oc().quick_gelu(t), lambda x: cpu.quick_gelu(x)),
}
SHAPES = [(1,), (3, 7), (4097, 3073), (2, 77, 3072)]


def act_input(rng, dtype: str, *shape) -> np.ndarray:
    """Inputs in [-4, 6]: below -4 GELU's outputs turn float16-subnormal, where one value's rounding alone can
    exceed the float16 tolerance in the tiny cases."""
    return np.clip(randn(rng, *shape, scale=3.0), -4, 6).astype(NP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("act", list(ACTS))
def test_activations(rng, act, dtype, shape):
    x = act_input(rng, dtype, *shape)
    fn, ref = ACTS[act]
    check(poisoned(fn, gpu(x)), ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTS))
def test_activations_strided_and_unaligned(rng, act, dtype):
    """A transposed view (copied first) and a view starting one element into its buffer (scalar path)."""
    fn, ref = ACTS[act]
    x = act_input(rng, dtype, 65, 129)
    check(poisoned(fn, gpu(x).transpose(0, 1)), ref(x.T), dtype)
    flat = act_input(rng, dtype, 4098)
    check(poisoned(fn, gpu(flat)[1:]), ref(flat[1:]), dtype)


GEGLU = [(1, 2), (3, 2 * 3073), (4097, 2 * 64), (2, 5, 2 * 1536), (7, 2 * 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEGLU, ids=["x".join(map(str, s)) for s in GEGLU])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mul(rng, dtype, shape, approximate):
    x = act_input(rng, dtype, *shape)
    out = poisoned(oc().gelu_mul, gpu(x), approximate=approximate)
    check(out, cpu.gelu_mul(x, approximate=approximate), dtype)


# ---------------------------------------------------------------------------------------- add / mul
# (a shape, b shape or "scalar")
BINARY = [((4097, 3073), (4097, 3073)), ((3, 77, 3072), (3072,)), ((3, 77, 3072), (3, 1, 3072)),
          ((5, 33, 7), (33, 1)), ((2, 3, 5), ()), ((2, 3, 5), (1, 1, 5)), ((1,), (1,)), ((7, 4096), "scalar"),
          ((4097,), "scalar"), ((2, 3, 4, 5, 6), (3, 1, 5, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BINARY, ids=[f"{a}-{b}".replace(" ", "") for a, b in BINARY])
@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary(rng, op, dtype, shapes):
    a_shape, b_shape = shapes
    a = rand(rng, dtype, *a_shape)
    if b_shape == "scalar":
        b_host = b_dev = -1.75
    else:
        b_host = rand(rng, dtype, *b_shape)
        b_dev = gpu(b_host)
    if op == "add":
        out, ref = poisoned(oc().add, gpu(a), b_dev, alpha=-0.5), cpu.add(a, b_host, alpha=-0.5)
    else:
        out, ref = poisoned(oc().mul, gpu(a), b_dev), cpu.mul(a, b_host)
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_strided_operands(rng, dtype):
    a = rand(rng, dtype, 64, 48)
    b = rand(rng, dtype, 48, 64)
    check(poisoned(oc().add, gpu(a), gpu(b).transpose(0, 1), alpha=2.0), cpu.add(a, b.T, alpha=2.0), dtype)
    check(poisoned(oc().mul, gpu(b).transpose(0, 1), gpu(a[0])), cpu.mul(b.T, a[0]), dtype)


def test_binary_rejects_bad_operands(rng):
    a = gpu(rand(rng, "bfloat16", 4, 8))
    with pytest.raises(ShapeError):
        oc().add(a, gpu(rand(rng, "bfloat16", 3)))
    with pytest.raises(UnsupportedDtypeError):
        oc().mul(a, gpu(rand(rng, "float32", 8)))
    with pytest.raises(UnsupportedDtypeError):
        oc().silu(gpu(np.arange(8, dtype=np.int32)))


# ------------------------------------------------------------------------------------- copies and layout
COPY_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.int32, np.uint8, np.int64]


def any_array(rng, dt, *shape) -> np.ndarray:
    """Random values of any dtype (raw random bits for floats would include NaN; use normal values instead)."""
    dt = np.dtype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1), size=shape, endpoint=True).astype(dt)
    return randn(rng, *shape, scale=3.0).astype(dt)


@pytest.mark.parametrize("dt", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_contiguous_and_permute(rng, dt):
    x = any_array(rng, dt, 3, 5, 7, 66)
    t = gpu(x)
    assert oc().contiguous(t) is t
    views = [
        (t.transpose(1, 2), x.transpose(0, 2, 1, 3)),
        (t[:, 1:4, :, 2:65], x[:, 1:4, :, 2:65]),
        (t[:, :, 3], x[:, :, 3]),
        (t[::2, :, ::3], x[::2, :, ::3]),
        (t[:, :1].expand(3, 4, 7, 66), np.broadcast_to(x[:, :1], (3, 4, 7, 66))),
    ]
    for view, ref in views:
        same_bits(poisoned(oc().contiguous, view).numpy(), np.ascontiguousarray(ref))
    for dims in [(0, 1, 2, 3), (3, 2, 1, 0), (0, 2, 1, 3), (1, 0, 3, 2), (0, 3, 1, 2), (2, 0, 3, 1)]:
        out = poisoned(oc().permute, t, dims)
        assert out.is_contiguous()
        same_bits(out.numpy(), cpu.permute(x, dims))
    same_bits(poisoned(oc().permute, t[:, 2:5], (2, 1, 0, 3)).numpy(), cpu.permute(x[:, 2:5], (2, 1, 0, 3)))


@pytest.mark.parametrize("dt", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_permute_transposes(rng, dt):
    """NCHW <-> NHWC and [B, C, L] -> [B, L, C] (the tiled-transpose path), with partial edge tiles."""
    x = any_array(rng, dt, 2, 77, 33, 65)
    nhwc = poisoned(oc().permute, gpu(x), (0, 2, 3, 1))
    same_bits(nhwc.numpy(), cpu.permute(x, (0, 2, 3, 1)))
    same_bits(poisoned(oc().permute, nhwc, (0, 3, 1, 2)).numpy(), x)
    y = any_array(rng, dt, 3, 40, 1000)
    same_bits(poisoned(oc().contiguous, gpu(y).transpose(1, 2)).numpy(), np.ascontiguousarray(y.transpose(0, 2, 1)))


@pytest.mark.parametrize("dt", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(rng, dt, axis):
    shapes = [[2, 3, 64], [2, 3, 64], [2, 3, 64]]
    sizes = [5, 1, 0] if axis == 0 else [7, 3, 1]
    for s, n in zip(shapes, sizes, strict=True):
        s[axis] = n
    xs = [any_array(rng, dt, *s) for s in shapes]
    ts = [gpu(a) for a in xs]
    ts[0] = gpu(np.ascontiguousarray(np.swapaxes(xs[0], 0, 1))).transpose(0, 1)  # a strided input too
    out = poisoned(oc().concat, ts, axis=axis)
    same_bits(out.numpy(), cpu.concat(xs, axis=axis))


CASTS = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


def cast_source(rng, name: str, n: int) -> np.ndarray:
    """n values of dtype `name` covering its range: every fp8 code, or normals of all magnitudes plus inf, nan,
    values past the fp8/f16 maxima and ties of the fp8 grids."""
    dt = np.dtype(getattr(ml_dtypes, name, None) or name)
    if dt.itemsize == 1:
        return np.resize(np.arange(256, dtype=np.uint8), n).view(dt)
    mag = np.exp2(rng.uniform(-30, 20, n)) * rng.choice([-1.0, 1.0], n)
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ties = (grid[1:126] + grid[2:127]) / 2  # exact midpoints between neighbouring e4m3 values
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 448, 464, 465, 480, 57344, 61439, 61440, 65504, 65520,
                        1e5, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 2.0**-16, 2.0**-17, 1e-40])
    vals = np.concatenate([special, -special, ties, mag])[:n]
    with np.errstate(all="ignore"):
        return np.resize(vals, n).astype(np.float32).astype(dt)


@pytest.mark.parametrize("src", CASTS)
@pytest.mark.parametrize("dst", CASTS)
@pytest.mark.parametrize("n", [1, 4097 * 3 + 5, 1 << 20])
def test_cast_matches_ml_dtypes(rng, src, dst, n):
    x = cast_source(rng, src, n)
    with np.errstate(all="ignore"):
        ref = x.astype(np.dtype(getattr(ml_dtypes, dst, None) or dst))
    out = poisoned(oc().cast, gpu(x), dst)
    assert out.dtype.name == dst
    same_bits(out.numpy(), ref)
    if n > 1:  # a view one element in: unaligned, element-by-element path
        same_bits(poisoned(oc().cast, gpu(x)[1:], dst).numpy(), ref[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("d", [64, 3073])
def test_embedding(rng, dtype, ids_dtype, d):
    table = rand(rng, dtype, 1000, d)
    ids = rng.integers(0, 1000, size=(2, 77)).astype(ids_dtype)
    out = poisoned(oc().embedding, gpu(ids), gpu(table))
    assert out.dtype.name == dtype and out.shape == (2, 77, d)
    same_bits(out.numpy().astype(np.float32), cpu.embedding(ids, table))
    bad = ids.copy()
    bad[1, 3] = 1000
    got = oc().embedding(gpu(bad), gpu(table)).numpy().astype(np.float32)
    assert np.isnan(got[1, 3]).all() and np.isfinite(np.delete(got.reshape(-1, d), 77 + 3, axis=0)).all()


@pytest.mark.parametrize("dt", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 64, 64), (2, 2, 3, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_upsample_nearest2x(rng, dt, shape):
    x = randn(rng, *shape).astype(dt)
    ref = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
    same_bits(poisoned(oc().upsample_nearest2x, gpu(x)).numpy(), ref)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # [N, H, W, C]
    got = poisoned(oc().upsample_nearest2x, gpu(x_cl), channels_last=True).numpy()
    same_bits(got, np.ascontiguousarray(ref.transpose(0, 2, 3, 1)))


def test_timestep_embedding_matches_cpu(rng):
    t = rng.uniform(0, 1000, 5).astype(np.float32)
    out = oc().timestep_embedding(gpu(t), 257, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    assert out.is_cuda and out.dtype.name == "float32"
    same_bits(out.numpy(), cpu.timestep_embedding(t, 257, flip_sin_to_cos=True, downscale_freq_shift=0.0))


# ------------------------------------------------------------------------------- more than 2^31 elements
def big_enough(nbytes: int) -> bool:
    free, _ = cuda.current_device().mem_get_info()
    return free > nbytes


def test_indices_past_2_31(rng):
    """Elementwise, row and copy kernels on tensors of more than 2^31 elements (int64 offsets): the tail rows,
    whose offsets do not fit 32 bits, are checked against the reference."""
    rows, d = (1 << 31) // 4096 + 3, 4096
    if not big_enough(5 * rows * d * 2 + (1 << 30)):
        pytest.skip("needs about 23 GB of free GPU memory")
    # A period of 61 rows: a read whose offset wrapped at 2^31 or 2^32 would fetch a different row.
    block = rand(rng, "bfloat16", 61, d, scale=2.0)
    x_host = np.tile(block, (-(-rows // 61), 1))[:rows]
    x = gpu(x_host)
    tail = slice(rows - 5, rows)
    ref_tail = x_host[tail]
    cases = [
        (lambda: poisoned(oc().silu, x), lambda: cpu.silu(ref_tail)),
        (lambda: poisoned(oc().rms_norm, x, eps=1e-6), lambda: cpu.rms_norm(ref_tail, eps=1e-6)),
        (lambda: poisoned(oc().add, x, x[0], alpha=0.5), lambda: cpu.add(ref_tail, x_host[0], alpha=0.5)),
    ]
    for run, ref in cases:  # one 4 GB output alive at a time
        err = rel_l2(run()[tail].numpy().astype(np.float32), ref())
        assert err < TOL["bfloat16"], err
    moved = poisoned(oc().permute, x.view(rows, 2, d // 2), (0, 2, 1))  # inner stride d/2: int64 index path
    same_bits(moved[tail].numpy(), np.ascontiguousarray(x_host[tail].reshape(5, 2, d // 2).transpose(0, 2, 1)))
