"""ops.cpu, the float32 reference backend, against float64 numpy references written here independently.

Inputs come in float32, float16 and bfloat16; each reference runs on the same (rounded) input values in float64,
so every op must match to TOL["float32"] whatever the input dtype.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime.errors import ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from numerics import TOL, randn, rel_l2

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
TOL32 = TOL["float32"]


def rand(rng, dtype, *shape, scale=1.0):
    """Random normal values already rounded to `dtype`."""
    return randn(rng, *shape, scale=scale).astype(dtype)


def r64(a):
    return np.asarray(a).astype(np.float64)


def assert_close(out, ref, tol=TOL32):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32, out.dtype
    err = rel_l2(out, ref)
    assert err < tol, f"rel L2 {err:.3g} >= {tol}"


# --------------------------------------------------------------------------------- float64 references
_erf_ref = np.vectorize(math.erf, otypes=[np.float64])


def gelu_ref(x):
    return 0.5 * x * (1.0 + _erf_ref(x / math.sqrt(2.0)))


def gelu_tanh_ref(x):
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1.0 + np.tanh(inner))


def sigmoid_ref(x):
    return 1.0 / (1.0 + np.exp(-x))


ACT_REF = {None: lambda y: y, "gelu": gelu_ref, "gelu_tanh": gelu_tanh_ref, "silu": lambda y: y * sigmoid_ref(y)}


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm_ref(x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


# ------------------------------------------------------------------------------------------------- erf
def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-7, 7, 20001), np.random.default_rng(0).standard_normal(5000) * 3,
                        [0.0, 2.4999999, 2.5, 2.5000001, 1e-300, 40.0, 1e300]])
    ref = _erf_ref(x)
    err = np.abs(cpu.erf(x) - ref)
    assert err.max() < 1e-7
    assert (err / np.maximum(np.abs(ref), 1e-300)).max() < 1e-12


def test_erf_special_values():
    out = cpu.erf(np.array([0.0, -0.0, np.inf, -np.inf, np.nan]))
    assert out[0] == 0 and out[1] == 0 and math.copysign(1, out[1]) == -1
    assert out[2] == 1 and out[3] == -1 and np.isnan(out[4])


def test_erfc_relative_accuracy_in_tail():
    x = np.concatenate([np.linspace(-6, 26, 32001), [2.5, np.inf, -np.inf]])
    ref = np.array([math.erfc(v) for v in x])
    out = cpu.erfc(x)
    assert np.max(np.abs(out - ref) / np.maximum(ref, 1e-300)) < 1e-10
    assert np.isnan(cpu.erfc(np.array([np.nan])))[0]


# ------------------------------------------------------------------------------------------ linear algebra
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("lead,k,n", [((), 1, 5), ((3,), 17, 1), ((2, 7), 129, 33), ((1, 1), 3, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(rng, dtype, activation, lead, k, n, with_bias):
    x = rand(rng, dtype, *lead, k)
    w = rand(rng, dtype, n, k, scale=k**-0.5)
    b = rand(rng, dtype, n) if with_bias else None
    out = cpu.linear(x, w, b, activation=activation)
    y = r64(x) @ r64(w).T + (r64(b) if with_bias else 0.0)
    assert out.shape == (*lead, n)
    assert_close(out, ACT_REF[activation](y))


def test_linear_rejects_bad_input(rng):
    x, w = randn(rng, 2, 8), randn(rng, 4, 8)
    with pytest.raises(ShapeError, match="K=8"):
        cpu.linear(randn(rng, 2, 7), w)
    with pytest.raises(ShapeError, match="bias"):
        cpu.linear(x, w, randn(rng, 5))
    with pytest.raises(ShapeError, match=r"\[N, K\]"):
        cpu.linear(x, randn(rng, 8))
    with pytest.raises(ValueError, match="relu"):
        cpu.linear(x, w, activation="relu")
    with pytest.raises(UnsupportedDtypeError):
        cpu.linear(x.astype(np.int32), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b_,s,k,n", [(1, 1, 3, 5), (2, 17, 33, 129), (3, 5, 1, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gated_residual(rng, dtype, b_, s, k, n, with_bias):
    x, w = rand(rng, dtype, b_, s, k), rand(rng, dtype, n, k)
    bias = rand(rng, dtype, n) if with_bias else None
    gate, res = rand(rng, dtype, b_, n), rand(rng, dtype, b_, s, n)
    out = cpu.linear_gated_residual(x, w, bias, gate, res)
    y = np.einsum("bsk,nk->bsn", r64(x), r64(w)) + (r64(bias) if with_bias else 0.0)
    ref = r64(res) + r64(gate)[:, None, :] * y
    assert_close(out, ref)
    with pytest.raises(ShapeError, match="gate"):
        cpu.linear_gated_residual(x, w, bias, gate[:, :-1] if n > 1 else gate[:0], res)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("a_shape,b_shape", [
    ((3, 5), (5, 7)), ((2, 17, 3), (2, 3, 129)), ((2, 17, 3), (3, 1)), ((2, 3, 1, 9), (2, 3, 9, 4)),
    ((4, 2, 6, 5), (5, 3)),
])
def test_matmul(rng, dtype, a_shape, b_shape):
    a, b = rand(rng, dtype, *a_shape), rand(rng, dtype, *b_shape)
    out = cpu.matmul(a, b)
    ref = np.einsum("...mk,...kn->...mn", r64(a), r64(b))
    assert out.shape == ref.shape
    assert_close(out, ref)


def test_matmul_rejects_bad_shapes(rng):
    with pytest.raises(ShapeError, match="inner"):
        cpu.matmul(randn(rng, 3, 4), randn(rng, 5, 2))
    with pytest.raises(ShapeError, match="leading"):
        cpu.matmul(randn(rng, 2, 3, 4), randn(rng, 3, 4, 2))
    with pytest.raises(ShapeError):
        cpu.matmul(randn(rng, 4), randn(rng, 4, 2))


def conv2d_naive(x, w, b, stride, padding):
    """Direct loops over every output pixel: out[n,o,i,j] = sum_{c,p,q} xpad[n,c,i*s+p,j*s+q] w[o,c,p,q] + b[o]."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for ni in range(n):
        for oi in range(o):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[ni, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    out[ni, oi, i, j] = np.sum(patch * w[oi]) + (b[oi] if b is not None else 0.0)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (2, 3)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_against_loops(rng, dtype, kernel, stride, padding, with_bias):
    x = rand(rng, dtype, 2, 3, 7, 6)
    w = rand(rng, dtype, 5, 3, *kernel)
    b = rand(rng, dtype, 5) if with_bias else None
    out = cpu.conv2d(x, w, b, stride=stride, padding=padding)
    ref = conv2d_naive(r64(x), r64(w), None if b is None else r64(b), stride, padding)
    assert out.shape == ref.shape
    assert out.flags.c_contiguous
    assert_close(out, ref)
    out_cl = cpu.conv2d(x.transpose(0, 2, 3, 1), w.transpose(0, 2, 3, 1), b, stride=stride, padding=padding,
                        channels_last=True)
    assert out_cl.flags.c_contiguous
    assert_close(out_cl, ref.transpose(0, 2, 3, 1))


def test_conv2d_chunked_rows_and_odd_sizes(rng, monkeypatch):
    # a tiny chunk budget forces one output row per im2col block: the row loop must cover every row
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 1)
    x, w, b = randn(rng, 1, 4, 9, 5), randn(rng, 3, 4, 3, 3), randn(rng, 3)
    for stride, padding in [(1, 1), (2, 0), (2, 1)]:
        out = cpu.conv2d(x, w, b, stride=stride, padding=padding)
        assert_close(out, conv2d_naive(r64(x), r64(w), r64(b), stride, padding))


def test_conv2d_rejects_bad_input(rng):
    x = randn(rng, 1, 3, 4, 4)
    with pytest.raises(ShapeError, match="input channels"):
        cpu.conv2d(x, randn(rng, 2, 4, 3, 3))
    with pytest.raises(ShapeError, match="larger"):
        cpu.conv2d(x, randn(rng, 2, 3, 5, 5))
    with pytest.raises(ShapeError):
        cpu.conv2d(randn(rng, 3, 4, 4), randn(rng, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        cpu.conv2d(x, randn(rng, 2, 3, 3, 3), stride=0)
    with pytest.raises(ValueError, match="padding"):
        cpu.conv2d(x, randn(rng, 2, 3, 3, 3), padding=-1)


# ---------------------------------------------------------------------------------------------- attention
def attention_ref(q, k, v, mask, scale):
    """Per batch and head: softmax over attended keys of q.k * scale, then the weighted sum of v; rows with no
    attended key are zeros (ops.cpu's documented definition)."""
    bsz, sq, nh, d = q.shape
    out = np.zeros((bsz, sq, nh, d))
    for b in range(bsz):
        keys = np.arange(k.shape[1]) if mask is None else np.flatnonzero(mask[b])
        if keys.size == 0:
            continue
        for h in range(nh):
            s = q[b, :, h] @ k[b, keys, h].T * scale  # [Sq, n_keys]
            out[b, :, h] = softmax_ref(s, -1) @ v[b, keys, h]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bsz,sq,sk,nh,d", [(1, 1, 1, 1, 8), (2, 17, 17, 3, 16), (2, 5, 129, 2, 64),
                                            (3, 33, 7, 1, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention(rng, dtype, bsz, sq, sk, nh, d, masked):
    q, k, v = (rand(rng, dtype, bsz, s, nh, d) for s in (sq, sk, sk))
    mask = None
    if masked:
        mask = rng.random((bsz, sk)) < 0.6
        mask[:, rng.integers(sk)] = True  # at least one key per batch
    out = cpu.attention(q, k, v, mask)
    assert out.shape == (bsz, sq, nh, d) and out.flags.c_contiguous
    assert_close(out, attention_ref(r64(q), r64(k), r64(v), mask, d**-0.5))


def test_attention_scale_strided_views_and_chunks(rng, monkeypatch):
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 200)  # several query blocks
    bsz, s, nh, d = 2, 19, 3, 8
    qkv = randn(rng, bsz, s, 3, nh, d)  # fused QKV output: q, k, v are strided views
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous
    mask = np.ones((bsz, s), dtype=bool)
    mask[1, 11:] = False
    out = cpu.attention(q, k, v, mask, scale=0.3)
    assert_close(out, attention_ref(r64(q), r64(k), r64(v), mask, 0.3))


def test_attention_fully_masked_rows_are_zero(rng):
    q, k, v = randn(rng, 2, 4, 2, 8), randn(rng, 2, 6, 2, 8), randn(rng, 2, 6, 2, 8)
    mask = np.array([[False] * 6, [True, False, True, False, False, False]])
    out = cpu.attention(q, k, v, mask)
    assert np.all(out[0] == 0)
    assert_close(out[1], attention_ref(r64(q), r64(k), r64(v), mask, 8**-0.5)[1])


def test_attention_masking_equals_dropping_keys(rng):
    # masked-out keys must have no influence at all, even when their scores are huge
    q, k, v = randn(rng, 1, 5, 2, 4), randn(rng, 1, 9, 2, 4), randn(rng, 1, 9, 2, 4)
    k[0, 6:] *= 1e4
    mask = np.zeros((1, 9), dtype=bool)
    mask[0, :6] = True
    out = cpu.attention(q, k, v, mask)
    assert_close(out, cpu.attention(q, k[:, :6], v[:, :6]))


def test_attention_rejects_bad_input(rng):
    q, k = randn(rng, 1, 4, 2, 8), randn(rng, 1, 5, 2, 8)
    with pytest.raises(ShapeError, match="k must be"):
        cpu.attention(q, randn(rng, 1, 5, 2, 4), k)
    with pytest.raises(ShapeError, match="v must"):
        cpu.attention(q, k, randn(rng, 1, 6, 2, 8))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        cpu.attention(q, k, k, np.ones((1, 4), dtype=bool))
    with pytest.raises(UnsupportedDtypeError, match="bool"):
        cpu.attention(q, k, k, np.ones((1, 5), dtype=np.float32))


# -------------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 129), (2, 1, 3)])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_layer_norm(rng, dtype, shape, affine):
    x = rand(rng, dtype, *shape, scale=3.0) + np.asarray(2.0, dtype=dtype)  # a mean far from 0
    d = shape[-1]
    w = rand(rng, dtype, d) if affine in ("weight", "both") else None
    b = rand(rng, dtype, d) if affine in ("bias", "both") else None
    out = cpu.layer_norm(x, w, b, eps=1e-5)
    ref = layer_norm_ref(r64(x), 1e-5) * (1.0 if w is None else r64(w)) + (0.0 if b is None else r64(b))
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bsz,s,d", [(1, 1, 3), (2, 17, 129), (3, 5, 64)])
def test_layer_norm_modulate(rng, dtype, bsz, s, d):
    x, shift, scale = rand(rng, dtype, bsz, s, d), rand(rng, dtype, bsz, d), rand(rng, dtype, bsz, d)
    out = cpu.layer_norm_modulate(x, shift, scale, eps=1e-6)
    ref = layer_norm_ref(r64(x), 1e-6) * (1 + r64(scale)[:, None]) + r64(shift)[:, None]
    assert_close(out, ref)
    with pytest.raises(ShapeError, match="shift"):
        cpu.layer_norm_modulate(x, shift[:, :1] if d > 1 else shift[:0], scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (4, 17), (2, 3, 129), (2, 7, 3, 64)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(rng, dtype, shape, with_weight):
    x = rand(rng, dtype, *shape, scale=2.0)
    w = rand(rng, dtype, shape[-1]) if with_weight else None
    out = cpu.rms_norm(x, w, eps=1e-6)
    x64 = r64(x)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * (1.0 if w is None else r64(w))
    assert_close(out, ref)


def group_norm_ref(x, g, w, b, eps):
    n, c = x.shape[:2]
    out = np.empty_like(x)
    for ni in range(n):
        for gi in range(g):
            chans = slice(gi * c // g, (gi + 1) * c // g)
            block = x[ni, chans]
            out[ni, chans] = (block - block.mean()) / np.sqrt(block.var() + eps)
    shape = (c,) + (1,) * (x.ndim - 2)
    return out * (1.0 if w is None else w.reshape(shape)) + (0.0 if b is None else b.reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 3), ((1, 32, 3, 3), 32), ((3, 8, 17), 2),
                                          ((1, 4, 2, 3, 5), 4), ((2, 9), 1)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(rng, dtype, shape, groups, activation, affine):
    x = rand(rng, dtype, *shape) + np.asarray(1.5, dtype=dtype)
    c = shape[1]
    w, b = (rand(rng, dtype, c), rand(rng, dtype, c)) if affine else (None, None)
    out = cpu.group_norm(x, w, b, num_groups=groups, eps=1e-5, activation=activation)
    ref = group_norm_ref(r64(x), groups, None if w is None else r64(w), None if b is None else r64(b), 1e-5)
    assert_close(out, ACT_REF[activation](ref))
    order = (0,) + tuple(range(2, x.ndim)) + (1,)  # [N, *spatial, C]
    out_cl = cpu.group_norm(np.ascontiguousarray(x.transpose(order)), w, b, num_groups=groups, eps=1e-5,
                            activation=activation, channels_last=True)
    assert out_cl.flags.c_contiguous
    assert_close(out_cl, ACT_REF[activation](ref).transpose(order))


def test_group_norm_rejects_bad_input(rng):
    x = randn(rng, 1, 6, 3, 3)
    with pytest.raises(ShapeError, match="groups"):
        cpu.group_norm(x, num_groups=4)
    with pytest.raises(ShapeError, match="weight"):
        cpu.group_norm(x, randn(rng, 5), num_groups=3)
    with pytest.raises(ValueError, match="gelu"):
        cpu.group_norm(x, num_groups=3, activation="gelu")


# ------------------------------------------------------------------------------------- positions and time
def rope_complex_ref(x, cos, sin, interleaved):
    """Pairs as complex numbers z = a + ib, rotated by multiplying with (cos + i sin)."""
    d = x.shape[-1]
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * (cos + 1j * sin)[None, :, None, :]
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., : d // 2], out[..., d // 2:] = z.real, z.imag
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("bsz,s,nh,d", [(1, 1, 1, 2), (2, 17, 3, 16), (1, 129, 2, 64), (3, 5, 1, 6)])
def test_rope(rng, dtype, interleaved, bsz, s, nh, d):
    x = rand(rng, dtype, bsz, s, nh, d)
    theta = rng.uniform(-20, 20, (s, d // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    out = cpu.rope(x, cos, sin, interleaved=interleaved)
    assert_close(out, rope_complex_ref(r64(x), r64(cos), r64(sin), interleaved))


def test_rope_rotate_half_matches_diffusers_form(rng):
    # diffusers' non-interleaved form: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half = (-x2, x1)
    x = randn(rng, 2, 7, 3, 10)
    theta = rng.uniform(-5, 5, (7, 5))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    x64 = r64(x)
    rot = np.concatenate([-x64[..., 5:], x64[..., :5]], axis=-1)
    cos_full = np.concatenate([cos, cos], -1)[None, :, None, :]
    sin_full = np.concatenate([sin, sin], -1)[None, :, None, :]
    assert_close(cpu.rope(x, cos, sin, interleaved=False), x64 * cos_full + rot * sin_full)
    # the interleaved form really pairs neighbours: it differs from rotate-half on the same input
    assert rel_l2(cpu.rope(x, cos, sin, interleaved=True), x64 * cos_full + rot * sin_full) > 0.1


def test_rope_rejects_bad_input(rng):
    with pytest.raises(ShapeError, match="even"):
        cpu.rope(randn(rng, 1, 2, 1, 5), randn(rng, 2, 2), randn(rng, 2, 2))
    with pytest.raises(ShapeError, match="S, D/2"):
        cpu.rope(randn(rng, 1, 2, 1, 4), randn(rng, 2, 4), randn(rng, 2, 4))


def test_timestep_embedding_hand_computed():
    # dim 6, shift 1: half = 3, exponent_k = -ln(1e4) * k / (3 - 1) -> frequencies 1, 1e-2, 1e-4
    t = np.array([0.0, 1.0, 250.0], dtype=np.float32)
    out = cpu.timestep_embedding(t, 6)
    args = [[tv * f for f in (1.0, 1e-2, 1e-4)] for tv in (0.0, 1.0, 250.0)]
    expected = np.array([[math.sin(a) for a in row] + [math.cos(a) for a in row] for row in args])
    assert out.shape == (3, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    # flip_sin_to_cos puts cos first; an odd dim appends one zero column
    flipped = cpu.timestep_embedding(t, 7, flip_sin_to_cos=True)
    np.testing.assert_allclose(flipped[:, :6], np.concatenate([expected[:, 3:], expected[:, :3]], 1), atol=2e-6)
    assert np.all(flipped[:, 6] == 0)


def test_timestep_embedding_shift_scale_period():
    # dim 4, shift 0, max_period 100: frequencies 100^(-k/2) = 1, 0.1; scale multiplies the arguments
    t = np.array([3, 40], dtype=np.int64)
    out = cpu.timestep_embedding(t, 4, downscale_freq_shift=0.0, scale=2.0, max_period=100.0)
    expected = [[math.sin(2 * tv), math.sin(0.2 * tv), math.cos(2 * tv), math.cos(0.2 * tv)] for tv in (3, 40)]
    np.testing.assert_allclose(out, np.array(expected), rtol=0, atol=5e-6)


@pytest.mark.parametrize("dim,shift,flip", [(320, 1.0, False), (256, 0.0, True), (33, 1.0, True), (1, 1.0, False),
                                            (3, 0.0, False)])
def test_timestep_embedding_against_float64(rng, dim, shift, flip):
    t = rng.uniform(0, 1000, 17).astype(np.float32)
    out = cpu.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - shift)) if half else np.zeros(0)
    arg = r64(t)[:, None] * freqs[None]
    sin, cos = np.sin(arg), np.cos(arg)
    ref = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
    if dim % 2:
        ref = np.concatenate([ref, np.zeros((17, 1))], axis=1)
    assert out.shape == (17, dim)
    # float32 arguments of up to 1000 rad carry an absolute error of ~3e-5 rad, as in diffusers
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ShapeError, match="1-D"):
        cpu.timestep_embedding(np.zeros((2, 1), dtype=np.float32), 8)
    with pytest.raises(ShapeError, match="divides by zero"):
        cpu.timestep_embedding(np.zeros(2, dtype=np.float32), 2, downscale_freq_shift=1.0)
    with pytest.raises(UnsupportedDtypeError):
        cpu.timestep_embedding(np.zeros(2, dtype=bool), 8)


# ------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 129)])
def test_elementwise_activations(rng, dtype, shape):
    x = rand(rng, dtype, *shape, scale=3.0)
    x64 = r64(x)
    assert_close(cpu.gelu(x), gelu_ref(x64))
    assert_close(cpu.gelu(x, approximate="tanh"), gelu_tanh_ref(x64))
    assert_close(cpu.quick_gelu(x), x64 * sigmoid_ref(1.702 * x64))
    assert_close(cpu.silu(x), x64 * sigmoid_ref(x64))


def test_gelu_tanh_and_erf_are_distinct():
    x = np.linspace(-4, 4, 4001).astype(np.float32)
    x64 = r64(x)
    exact, approx = cpu.gelu(x), cpu.gelu(x, approximate="tanh")
    np.testing.assert_allclose(exact, gelu_ref(x64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(approx, gelu_tanh_ref(x64), rtol=1e-6, atol=1e-7)
    # the tanh approximation differs from the erf form by up to ~5e-4 on this range
    assert np.max(np.abs(exact.astype(np.float64) - approx)) > 1e-4
    assert_close(cpu.linear(x[:, None], np.ones((1, 1), np.float32), activation="gelu")[:, 0], gelu_ref(x64))


def test_activations_in_the_tails():
    x = np.array([-200.0, -30.0, -10.0, 10.0, 30.0, 200.0], dtype=np.float32)
    x64 = r64(x)
    with np.errstate(over="raise", invalid="raise"):
        silu, quick, gelu = cpu.silu(x), cpu.quick_gelu(x), cpu.gelu(x)
    # compared with the float32 rounding of the exact values (silu(-200) = -3e-85 underflows to -0)
    np.testing.assert_allclose(silu, (x64 * sigmoid_ref(x64)).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(quick, (x64 * sigmoid_ref(1.702 * x64)).astype(np.float32), rtol=1e-6)
    # gelu(-10) = -10 * erfc(10 / sqrt 2) / 2 = -7.62e-23: the erfc form keeps it, 1 + erf(x) would give 0
    np.testing.assert_allclose(gelu[2], -10 * 0.5 * math.erfc(10 / math.sqrt(2)), rtol=1e-6)
    np.testing.assert_allclose(gelu[3:], x64[3:], rtol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(2,), (3, 34), (2, 5, 258)])
def test_gelu_mul(rng, dtype, approximate, shape):
    x = rand(rng, dtype, *shape, scale=2.0)
    n = shape[-1] // 2
    x64 = r64(x)
    act = gelu_ref if approximate == "none" else gelu_tanh_ref
    out = cpu.gelu_mul(x, approximate=approximate)
    assert out.shape == (*shape[:-1], n)
    assert_close(out, x64[..., :n] * act(x64[..., n:]))
    with pytest.raises(ShapeError, match="even"):
        cpu.gelu_mul(x[..., :-1])


def test_activation_options_are_checked(rng):
    with pytest.raises(ValueError, match="approximate"):
        cpu.gelu(randn(rng, 3), approximate="fast")
    with pytest.raises(ValueError, match="approximate"):
        cpu.gelu_mul(randn(rng, 4), approximate=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((1,), -1), ((3, 17), -1), ((3, 17), 0), ((2, 129, 5), 1), ((4, 2, 3), -3)])
def test_softmax(rng, dtype, shape, axis):
    x = rand(rng, dtype, *shape, scale=4.0)
    out = cpu.softmax(x, axis=axis)
    assert_close(out, softmax_ref(r64(x), axis))


def test_softmax_large_and_infinite_inputs():
    x = np.array([[1000.0, 999.0, -np.inf], [-1e30, 0.0, 0.0]], dtype=np.float32)
    out = cpu.softmax(x)
    e = math.exp(-1)
    np.testing.assert_allclose(out, [[1 / (1 + e), e / (1 + e), 0.0], [0.0, 0.5, 0.5]], rtol=1e-6)
    with pytest.raises(ShapeError, match="axis"):
        cpu.softmax(x, axis=2)


# ------------------------------------------------------------------------------------ elementwise, adaLN
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("a_shape,b_shape", [((3, 17), (3, 17)), ((2, 5, 129), (129,)), ((2, 5, 3), (2, 1, 3)),
                                             ((1,), ()), ((4, 3), (4, 1))])
@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_add_mul_arrays(rng, dtype, a_shape, b_shape, alpha):
    a, b = rand(rng, dtype, *a_shape), rand(rng, dtype, *b_shape)
    assert_close(cpu.add(a, b, alpha=alpha), r64(a) + np.float64(np.float32(alpha)) * r64(b))
    assert_close(cpu.mul(a, b), r64(a) * r64(b))


def test_add_mul_python_numbers(rng):
    a = randn(rng, 3, 7).astype(ml_dtypes.bfloat16)
    assert_close(cpu.add(a, 2.5), r64(a) + 2.5)
    assert_close(cpu.add(a, 3, alpha=0.5), r64(a) + 1.5)
    assert_close(cpu.mul(a, -1.25), r64(a) * -1.25)
    assert_close(cpu.mul(a, np.float32(4)), r64(a) * 4)


def test_add_mul_do_not_broadcast_a(rng):
    a, b = randn(rng, 3, 1), randn(rng, 3, 4)
    with pytest.raises(ShapeError, match="broadcast"):
        cpu.add(a, b)
    with pytest.raises(ShapeError, match="broadcast"):
        cpu.mul(a, randn(rng, 2))
    with pytest.raises(UnsupportedDtypeError):
        cpu.add(a, np.ones((3, 1), dtype=np.int64))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bsz,s,d", [(1, 1, 1), (2, 17, 129), (3, 4, 64)])
def test_modulate_and_gated_residual(rng, dtype, bsz, s, d):
    x, y = rand(rng, dtype, bsz, s, d), rand(rng, dtype, bsz, s, d)
    shift, scale, gate = (rand(rng, dtype, bsz, d) for _ in range(3))
    assert_close(cpu.modulate(x, shift, scale), r64(x) * (1 + r64(scale)[:, None]) + r64(shift)[:, None])
    assert_close(cpu.gated_residual(x, gate, y), r64(x) + r64(gate)[:, None] * r64(y))


def test_modulate_and_gated_residual_reject_bad_shapes(rng):
    x = randn(rng, 2, 3, 4)
    with pytest.raises(ShapeError, match="scale"):
        cpu.modulate(x, randn(rng, 2, 4), randn(rng, 1, 4))
    with pytest.raises(ShapeError, match="gate"):
        cpu.gated_residual(x, randn(rng, 2, 3, 4), x)
    with pytest.raises(ShapeError, match="y must"):
        cpu.gated_residual(x, randn(rng, 2, 4), randn(rng, 2, 4, 4))


# ------------------------------------------------------------------------------------ copies and layout
@pytest.mark.parametrize("dtype", DTYPES + [np.int64], ids=DTYPE_IDS + ["i64"])
def test_contiguous_and_permute_keep_dtype(rng, dtype):
    x = (randn(rng, 3, 5, 7) * 10).astype(dtype)
    assert cpu.contiguous(x) is x
    view = x.transpose(2, 0, 1)
    out = cpu.contiguous(view)
    assert out.dtype == x.dtype and out.flags.c_contiguous and np.array_equal(out, view)
    out = cpu.permute(x, (1, 2, 0))
    assert out.dtype == x.dtype and out.flags.c_contiguous and out.shape == (5, 7, 3)
    assert all(out[j, k, i] == x[i, j, k] for i in range(3) for j in range(5) for k in range(7))
    assert np.array_equal(cpu.permute(x, [-1, 0, 1]), cpu.permute(x, (2, 0, 1)))
    with pytest.raises(ShapeError, match="permutation"):
        cpu.permute(x, (0, 0, 1))
    with pytest.raises(ShapeError, match="permutation"):
        cpu.permute(x, (0, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(rng, dtype, axis):
    base = [2, 3, 5]
    parts = []
    for n in (1, 4, 2):
        shape = list(base)
        shape[axis] = n
        parts.append(rand(rng, dtype, *shape))
    out = cpu.concat(parts, axis=axis)
    assert out.dtype == np.dtype(dtype) and out.flags.c_contiguous
    sizes = np.cumsum([p.shape[axis] for p in parts])[:-1]
    for got, want in zip(np.split(out, sizes, axis=axis), parts, strict=True):
        assert np.array_equal(got, want)


def test_concat_rejects_bad_input(rng):
    a = randn(rng, 2, 3)
    with pytest.raises(ShapeError, match="does not match"):
        cpu.concat([a, randn(rng, 3, 3)], axis=1)
    with pytest.raises(UnsupportedDtypeError, match="dtype"):
        cpu.concat([a, a.astype(np.float16)])
    with pytest.raises(ShapeError, match="at least one"):
        cpu.concat([])


def bf16_rne_ref(x32):
    """float32 -> bfloat16 bits by integer rounding to nearest even on the upper 16 bits (finite inputs)."""
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def test_cast_to_bfloat16_rounds_to_nearest_even(rng):
    one = np.float32(1.0)
    # ulp of bf16 at 1 is 2^-7: 1 + 2^-8 is a tie (-> 1), 1 + 3*2^-8 a tie (-> 1 + 2^-6), others round to nearest
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8)], dtype=np.float32)
    x = np.concatenate([ties, randn(rng, 1000, scale=50.0), one[None]])
    out = cpu.cast(x, "bfloat16")
    assert out.dtype == ml_dtypes.bfloat16
    assert np.array_equal(out.view(np.uint16), bf16_rne_ref(x))
    np.testing.assert_array_equal(out[:4].astype(np.float32), [1.0, 1 + 2**-6, 1 + 2**-7, -1.0])


@pytest.mark.parametrize("src", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dst", ["float32", "float16", "bf16", "float8_e4m3fn"])
def test_cast_between_float_types(rng, src, dst):
    from fastdm.runtime import dtypes

    x = rand(rng, src, 4, 17)[:, ::2]  # a non-contiguous view
    out = cpu.cast(x, dst)
    target = dtypes.dtype(dst).np
    assert out.dtype == target and out.flags.c_contiguous and out.shape == x.shape
    # every source value is exact in float32, so rounding from float32 is the single correct rounding
    expected = x.astype(np.float32).astype(target)
    assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))


def test_cast_integers_and_refusals(rng):
    ids = np.arange(-3, 9, dtype=np.int64)
    out = cpu.cast(ids, "int32")
    assert out.dtype == np.int32 and np.array_equal(out, ids)
    assert np.array_equal(cpu.cast(ids, "float32"), ids.astype(np.float32))
    with pytest.raises(UnsupportedDtypeError, match="int32"):
        cpu.cast(randn(rng, 3), "int32")
    with pytest.raises(UnsupportedDtypeError, match="unknown dtype"):
        cpu.cast(randn(rng, 3), "float13")


@pytest.mark.parametrize("table_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("ids_shape", [(1,), (3, 17), (2, 1, 5)])
def test_embedding(rng, table_dtype, ids_dtype, ids_shape):
    v, d = 37, 129
    table = rand(rng, table_dtype, v, d)
    ids = rng.integers(0, v, ids_shape).astype(ids_dtype)
    out = cpu.embedding(ids, table)
    assert out.dtype == np.float32 and out.shape == (*ids_shape, d)
    for idx in np.ndindex(*ids_shape):
        assert np.array_equal(out[idx], table[ids[idx]].astype(np.float32))


def test_embedding_rejects_bad_input(rng):
    table = randn(rng, 5, 4)
    with pytest.raises(ShapeError, match=r"\[0, 5\)"):
        cpu.embedding(np.array([0, 5]), table)
    with pytest.raises(ShapeError, match=r"\[0, 5\)"):
        cpu.embedding(np.array([-1, 2]), table)
    with pytest.raises(UnsupportedDtypeError, match="integer"):
        cpu.embedding(np.array([0.0, 1.0]), table)
    with pytest.raises(ShapeError, match=r"\[V, D\]"):
        cpu.embedding(np.array([0]), randn(rng, 5))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 17, 2)])
def test_upsample_nearest2x(rng, dtype, shape):
    x = rand(rng, dtype, *shape)
    out = cpu.upsample_nearest2x(x)
    n, c, h, w = shape
    assert out.shape == (n, c, 2 * h, 2 * w) and out.dtype == np.float32
    x64 = r64(x)
    ref = np.empty((n, c, 2 * h, 2 * w))
    for i in range(2 * h):
        for j in range(2 * w):
            ref[:, :, i, j] = x64[:, :, i // 2, j // 2]
    assert np.array_equal(out.astype(np.float64), ref)
    with pytest.raises(ShapeError):
        cpu.upsample_nearest2x(x[0])
    out_cl = cpu.upsample_nearest2x(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), channels_last=True)
    assert np.array_equal(out_cl.astype(np.float64), ref.transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------ dtype errors
@pytest.mark.parametrize("call", [
    lambda a: cpu.gelu(a), lambda a: cpu.silu(a), lambda a: cpu.softmax(a), lambda a: cpu.layer_norm(a),
    lambda a: cpu.rms_norm(a), lambda a: cpu.mul(a, 2.0), lambda a: cpu.upsample_nearest2x(a[None, None]),
])
@pytest.mark.parametrize("bad", [np.int32, np.bool_, np.complex64])
def test_non_float_inputs_are_refused(call, bad):
    with pytest.raises(UnsupportedDtypeError, match="floating-point"):
        call(np.ones((3, 4), dtype=bad))


def test_float64_and_float8_inputs_are_rounded_to_float32(rng):
    x = rng.standard_normal((4, 9))  # float64
    out = cpu.silu(x)
    x32 = r64(x.astype(np.float32))
    assert_close(out, x32 * sigmoid_ref(x32))
    x8 = randn(rng, 4, 9).astype(ml_dtypes.float8_e4m3fn)
    assert_close(cpu.gelu(x8), gelu_ref(r64(x8)))
