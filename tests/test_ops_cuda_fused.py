"""The fused memory-bound kernels against ops.cpu: qk_norm_rope (new), and the kernels rewritten for bandwidth
(register-resident row kernels for layer_norm / layer_norm_modulate / rms_norm / softmax, GroupNorm, GEGLU and the
fast activation forms used for 16-bit storage).

Sizes: the benchmark shapes of bench/fused.py (FLUX 1024^2: S=4608, D=3072, 24 heads of 128; SDXL VAE GroupNorm
[2, 512, 128, 128]) and odd ones chosen to hit every launch bucket of the row kernels (packs per lane 1/2/4/8,
sub-warp / warp / block rows, the looped fallback past 4096 packs), the scalar (unaligned) paths and partial tiles.
Outputs land in memory filled with NaN bytes first (see `poisoned`), so anything a kernel leaves unwritten fails.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor, empty
from gpu_ops import DTYPES, NP, gpu, oc, poisoned, rand
from numerics import TOL, randn, rel_l2

pytestmark = pytest.mark.gpu

VEC = {"float32": 4, "float16": 8, "bfloat16": 8}  # elements per 16-byte pack


def cuda_norms():
    """runtime.ops.cuda.norms directly: qk_norm_rope is tested here even before ops.cuda re-exports it."""
    from fastdm.runtime.ops.cuda import norms

    return norms


def check(out: Tensor, ref: np.ndarray, dtype: str, contiguous: bool = True) -> None:
    assert out.dtype.name == dtype, (out.dtype.name, dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if contiguous:
        assert out.is_contiguous(), out.strides
    err = rel_l2(out.numpy().astype(np.float32), ref)
    assert err < TOL[dtype], f"rel_l2 {err:.3g} >= {TOL[dtype]} (dtype {dtype}, shape {ref.shape})"


def same_bits(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, ref.dtype, got.shape, ref.shape)
    raw = f"u{got.dtype.itemsize}"
    bad = np.flatnonzero(got.view(raw) != ref.view(raw))
    assert bad.size == 0, f"{bad.size} of {got.size} differ, first at {bad[:5]}"


def angles(rng, s: int, d: int):
    theta = rng.uniform(-10, 10, (s, d // 2))
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


# ------------------------------------------------------------------------------------------ qk_norm_rope
QKV = [(1, 1, 1, 64), (2, 37, 3, 64), (1, 33, 5, 128), (2, 7, 24, 128)]  # (B, S, H, D)


def qkv_inputs(rng, dtype: str, b: int, s: int, h: int, d: int, weights: bool = True):
    qkv = rand(rng, dtype, b, s, 3, h, d, scale=2.0, shift=0.3)
    qw = rand(rng, dtype, d, shift=1.0) if weights else None
    kw = rand(rng, dtype, d, shift=1.0) if weights else None
    cos, sin = angles(rng, s, d)
    return qkv, qw, kw, cos, sin


def check_qkv(q: Tensor, k: Tensor, v: Tensor, qkv: np.ndarray, qw, kw, cos, sin, interleaved: bool, dtype: str,
              eps: float = 1e-6) -> None:
    rq, rk, _ = cpu.qk_norm_rope(qkv, qw, kw, cos, sin, eps=eps, interleaved=interleaved)
    check(q, rq, dtype, contiguous=False)
    check(k, rk, dtype, contiguous=False)
    same_bits(v.numpy(), qkv[:, :, 2])  # v is moved, never converted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV, ids=["x".join(map(str, s)) for s in QKV])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize("mode", ["new", "in_place", "out_view"])
def test_qk_norm_rope(rng, dtype, shape, interleaved, mode):
    b, s, h, d = shape
    qkv, qw, kw, cos, sin = qkv_inputs(rng, dtype, b, s, h, d)
    args = (gpu(qw), gpu(kw), gpu(cos), gpu(sin))
    if mode == "new":
        q, k, v = poisoned(cuda_norms().qk_norm_rope, gpu(qkv), *args, eps=1e-6, interleaved=interleaved)
    elif mode == "in_place":
        t = gpu(qkv)
        q, k, v = cuda_norms().qk_norm_rope(t, *args, eps=1e-6, interleaved=interleaved, out=t)
        assert q.data_ptr == t.data_ptr
    else:  # a token window of a larger buffer whose other tokens must survive
        big_host = rand(rng, dtype, b, s + 5, 3, h, d)
        big = gpu(big_host)
        window = big[:, 2:2 + s]
        q, k, v = cuda_norms().qk_norm_rope(gpu(qkv), *args, eps=1e-6, interleaved=interleaved, out=window)
        got = big.numpy()
        same_bits(got[:, :2], big_host[:, :2])
        same_bits(got[:, 2 + s:], big_host[:, 2 + s:])
    for t in (q, k, v):
        assert t.shape == (b, s, h, d) and t.dtype.name == dtype and t.strides == q.strides
    # the three are views of one [B, S, 3, H, D] buffer: consecutive along its third dim
    step = k.data_ptr - q.data_ptr
    assert step == h * d * q.itemsize and v.data_ptr - k.data_ptr == step
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize("d", [6, 20, 1024, 96])
def test_qk_norm_rope_other_head_dims(rng, dtype, interleaved, d):
    """D = 6 and 20 (not a multiple of two 16-byte packs: the scalar kernel), 1024 (more than 32 packs a half: the
    scalar kernel), 96 (vector kernel with idle lanes for 16-bit types); no weights for D = 20."""
    b, s, h = 2, 5, 3
    qkv, qw, kw, cos, sin = qkv_inputs(rng, dtype, b, s, h, d, weights=d != 20)
    q, k, v = poisoned(cuda_norms().qk_norm_rope, gpu(qkv), None if qw is None else gpu(qw),
                       None if kw is None else gpu(kw), gpu(cos), gpu(sin), eps=1e-5, interleaved=interleaved)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype, eps=1e-5)
    t = gpu(qkv)  # in place through the same kernels
    q, k, v = cuda_norms().qk_norm_rope(t, None if qw is None else gpu(qw), None if kw is None else gpu(kw),
                                        gpu(cos), gpu(sin), eps=1e-5, interleaved=interleaved, out=t)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype, eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
def test_qk_norm_rope_unaligned_and_strided(rng, dtype, interleaved):
    """qkv starting one element into its buffer (scalar kernel), and qkv as a strided view (every other token of a
    larger buffer: vector kernel with a non-contiguous token stride), into a new and an in-place output."""
    b, s, h, d = 2, 9, 3, 64
    qkv, qw, kw, cos, sin = qkv_inputs(rng, dtype, b, s, h, d)
    args = (gpu(qw), gpu(kw), gpu(cos), gpu(sin))
    flat = np.concatenate([rand(rng, dtype, 1), qkv.ravel()])
    shifted = gpu(flat)[1:].view(b, s, 3, h, d)
    q, k, v = poisoned(cuda_norms().qk_norm_rope, shifted, *args, interleaved=interleaved)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype)
    q, k, v = cuda_norms().qk_norm_rope(shifted, *args, interleaved=interleaved, out=shifted)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype)

    wide = np.repeat(qkv, 2, axis=1)  # tokens 0, 2, 4, ... are qkv
    strided = gpu(wide)[:, ::2]
    q, k, v = poisoned(cuda_norms().qk_norm_rope, strided, *args, interleaved=interleaved)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype)
    full = gpu(wide)
    view = full[:, ::2]
    q, k, v = cuda_norms().qk_norm_rope(view, *args, interleaved=interleaved, out=view)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, interleaved, dtype)
    same_bits(full.numpy()[:, 1::2], wide[:, 1::2])  # the odd tokens are not touched


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_qk_norm_rope_two_streams_into_one_buffer(rng, dtype):
    """FLUX double block: text and image streams, each with its own norm weights, written side by side into one
    [B, S_txt + S_img, 3, H, D] buffer (no concat), against the reference on each stream."""
    b, h, d, st, si = 1, 4, 128, 7, 33
    txt, tqw, tkw, _, _ = qkv_inputs(rng, dtype, b, st, h, d)
    img, iqw, ikw, _, _ = qkv_inputs(rng, dtype, b, si, h, d)
    cos, sin = angles(rng, st + si, d)
    big = poisoned(empty, (b, st + si, 3, h, d), dtype, "cuda")
    gc, gs = gpu(cos), gpu(sin)
    cuda_norms().qk_norm_rope(gpu(txt), gpu(tqw), gpu(tkw), gc[:st], gs[:st], out=big[:, :st])
    q, k, v = cuda_norms().qk_norm_rope(gpu(img), gpu(iqw), gpu(ikw), gc[st:], gs[st:], out=big[:, st:])
    assert q.shape == (b, si, h, d)
    got = big.numpy().astype(np.float32)
    streams = {"txt": (txt, tqw, tkw, slice(0, st)), "img": (img, iqw, ikw, slice(st, st + si))}
    for part, (x, qw, kw, sl) in streams.items():
        rq, rk, rv = cpu.qk_norm_rope(x, qw, kw, cos[sl], sin[sl])
        for i, ref in enumerate((rq, rk, rv)):
            err = rel_l2(got[:, sl, i], ref)
            assert err < TOL[dtype], (part, i, err)


def test_qk_norm_rope_flux_size(rng):
    """The FLUX 1024^2 single-block shape [1, 4608, 3, 24, 128] bf16, in place."""
    qkv, qw, kw, cos, sin = qkv_inputs(rng, "bfloat16", 1, 4608, 24, 128)
    t = gpu(qkv)
    q, k, v = cuda_norms().qk_norm_rope(t, gpu(qw), gpu(kw), gpu(cos), gpu(sin), out=t)
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, True, "bfloat16")


def test_qk_norm_rope_through_ops_api(rng):
    """ops.qk_norm_rope dispatches GPU tensors to ops.cuda (needs the re-export in runtime/ops/cuda/__init__.py)."""
    from fastdm.runtime import ops

    assert hasattr(oc(), "qk_norm_rope"), "runtime/ops/cuda/__init__.py must re-export norms.qk_norm_rope"
    qkv, qw, kw, cos, sin = qkv_inputs(rng, "bfloat16", 1, 11, 2, 64)
    q, k, v = ops.qk_norm_rope(gpu(qkv), gpu(qw), gpu(kw), gpu(cos), gpu(sin), eps=1e-6, interleaved=False)
    assert all(t.is_cuda for t in (q, k, v))
    check_qkv(q, k, v, qkv, qw, kw, cos, sin, False, "bfloat16")


def test_qk_norm_rope_rejects_bad_arguments(rng):
    qkv, qw, kw, cos, sin = qkv_inputs(rng, "bfloat16", 1, 5, 2, 64)
    f = cuda_norms().qk_norm_rope
    g = (gpu(qw), gpu(kw), gpu(cos), gpu(sin))
    with pytest.raises(ShapeError):
        f(gpu(qkv[:, :, :2]), *g)  # not 3 along dim 2
    with pytest.raises(ShapeError):
        f(gpu(qkv), gpu(qw[:32]), *g[1:])  # weight of the wrong length
    with pytest.raises(ShapeError):
        f(gpu(qkv), *g[:2], gpu(cos[:4]), g[3])  # cos for the wrong number of tokens
    with pytest.raises(UnsupportedDtypeError):
        f(gpu(qkv), *g[:2], gpu(cos.astype(ml_dtypes.bfloat16)), g[3])
    with pytest.raises(UnsupportedDtypeError):
        f(gpu(qkv), gpu(qw.astype(np.float32)), *g[1:])
    with pytest.raises(ShapeError):
        f(gpu(qkv), *g, out=gpu(qkv[:, :4]))  # out of the wrong shape


# -------------------------------------------------------------------------------- register row kernels
# Row lengths in 16-byte packs: 1..4 packs a lane on sub-warp groups (1, 2, 3, 5, 9, 16, 17, 31, 100, 128), 8 at
# width 32 (129, 200, 256), block rows with 4 packs a thread (257, 384, 2048) and 8 (2049, 4096), and the looped
# kernel past 4096 packs (4097).
PACKS = [1, 2, 3, 5, 9, 16, 17, 31, 100, 128, 129, 200, 256, 257, 384, 2048, 2049, 4096, 4097]

ROW_OPS = {
    "layer_norm": (lambda t, w, b: oc().layer_norm(t, eps=1e-5), lambda x, w, b: cpu.layer_norm(x, eps=1e-5)),
    "layer_norm_affine": (lambda t, w, b: oc().layer_norm(t, w, b, eps=1e-6),
                          lambda x, w, b: cpu.layer_norm(x, w, b, eps=1e-6)),
    "rms_norm": (lambda t, w, b: oc().rms_norm(t, eps=1e-6), lambda x, w, b: cpu.rms_norm(x, eps=1e-6)),
    "rms_norm_weight": (lambda t, w, b: oc().rms_norm(t, w, eps=1e-5), lambda x, w, b: cpu.rms_norm(x, w, eps=1e-5)),
    "softmax": (lambda t, w, b: oc().softmax(t), lambda x, w, b: cpu.softmax(x)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packs", PACKS)
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_ops_every_bucket(rng, op, dtype, packs):
    d = packs * VEC[dtype]
    rows = 37 if packs <= 256 else 3
    x = rand(rng, dtype, rows, d, scale=2.0, shift=0.5)
    w, b = rand(rng, dtype, d, shift=1.0), rand(rng, dtype, d)
    fn, ref = ROW_OPS[op]
    check(poisoned(fn, gpu(x), gpu(w), gpu(b)), ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 1000, 70001])
def test_row_ops_block_shapes(rng, dtype, rows):
    """Row counts that shrink the sub-warp blocks (few rows) or need many blocks, with 16 packs a row."""
    d = 16 * VEC[dtype]
    x = rand(rng, dtype, rows, d, scale=2.0, shift=-0.7)
    w = rand(rng, dtype, d, shift=1.0)
    check(poisoned(oc().rms_norm, gpu(x), gpu(w), eps=1e-6), cpu.rms_norm(x, w, eps=1e-6), dtype)
    check(poisoned(oc().layer_norm, gpu(x), gpu(w), None, eps=1e-6), cpu.layer_norm(x, w, None, eps=1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,chunked", [(1, False), (2, True)], ids=["b1", "b2_chunks"])
def test_layer_norm_modulate_flux_size(rng, dtype, b, chunked):
    """[B, 4608, 3072] (bench size), shift/scale plain or chunks of one [B, 6D] buffer."""
    s, d = 4608, 3072
    x = rand(rng, dtype, b, s, d, scale=2.0, shift=0.3)
    if chunked:
        buf = rand(rng, dtype, b, 6 * d, scale=0.5)
        t = gpu(buf)
        (sh, sc), (sht, sct) = (buf[:, d:2 * d], buf[:, 4 * d:5 * d]), (t[:, d:2 * d], t[:, 4 * d:5 * d])
    else:
        sh, sc = rand(rng, dtype, b, d, scale=0.5), rand(rng, dtype, b, d, scale=0.5)
        sht, sct = gpu(sh), gpu(sc)
    out = poisoned(oc().layer_norm_modulate, gpu(x), sht, sct, eps=1e-6)
    check(out, cpu.layer_norm_modulate(x, sh, sc, eps=1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_heads_flux_size(rng, dtype):
    """[1, 4608, 24, 128] (bench size), and in place on the k heads of a [1, 4608, 3, 24, 128] QKV buffer."""
    x = rand(rng, dtype, 1, 4608, 24, 128, scale=2.0)
    w = rand(rng, dtype, 128, shift=1.0)
    check(poisoned(oc().rms_norm, gpu(x), gpu(w), eps=1e-6), cpu.rms_norm(x, w, eps=1e-6), dtype)
    buf = rand(rng, dtype, 1, 512, 3, 24, 128, scale=2.0)
    qkv = gpu(buf)
    k = qkv[:, :, 1]
    assert oc().rms_norm(k, gpu(w), eps=1e-6, out=k) is k
    got = qkv.numpy()
    err = rel_l2(got[:, :, 1].astype(np.float32), cpu.rms_norm(buf[:, :, 1], w, eps=1e-6))
    assert err < TOL[dtype], err
    same_bits(got[:, :, 0], buf[:, :, 0])
    same_bits(got[:, :, 2], buf[:, :, 2])


# ---------------------------------------------------------------------------------------------- GroupNorm
GN = [((2, 512, 128, 128), 32), ((1, 32, 99, 101), 8), ((3, 64, 17, 16), 32), ((1, 40, 8, 8), 4), ((2, 6, 3), 3),
      ((1, 64, 40, 64), 4), ((1, 64, 1024, 65), 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GN, ids=["x".join(map(str, s)) + f"-g{g}" for s, g in GN])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_sizes(rng, dtype, shape, groups, activation):
    """The SDXL VAE decoder size (bench), an odd spatial size (scalar kernel, several tiles a piece, a partial last
    piece), 16-wide rows (vector kernel, pieces shorter than a tile), tiny groups, a group of 40960 and one of
    1 M elements."""
    x = rand(rng, dtype, *shape, scale=3.0, shift=5.0)
    c = shape[1]
    w, b = rand(rng, dtype, c, shift=1.0), rand(rng, dtype, c)
    out = poisoned(oc().group_norm, gpu(x), gpu(w), gpu(b), num_groups=groups, eps=1e-6, activation=activation)
    check(out, cpu.group_norm(x, w, b, num_groups=groups, eps=1e-6, activation=activation), dtype)


# ------------------------------------------------------------------------------------ GEGLU, activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mul_flux_size(rng, dtype, approximate):
    """[1, 4608, 2 * 5120] for bf16 (bench size), fewer rows for the other dtypes (same kernel path)."""
    rows = 4608 if dtype == "bfloat16" else 1024
    x = np.clip(randn(rng, 1, rows, 2 * 5120, scale=3.0), -8, 8).astype(NP[dtype])
    out = poisoned(oc().gelu_mul, gpu(x), approximate=approximate)
    check(out, cpu.gelu_mul(x, approximate=approximate), dtype)


GEGLU = [(1, 2 * 8), (37, 2 * 8 * 129), (5, 2 * 1001), (3, 7, 2 * 24), (4097, 2 * 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEGLU, ids=["x".join(map(str, s)) for s in GEGLU])
def test_gelu_mul_shapes(rng, dtype, shape):
    """Vector and scalar (odd N) paths, a last tile of 1..3 packs, single rows."""
    x = np.clip(randn(rng, *shape, scale=3.0), -8, 8).astype(NP[dtype])
    check(poisoned(oc().gelu_mul, gpu(x)), cpu.gelu_mul(x), dtype)


# Activations element by element over [-12, 12]: on 16-bit storage the fast forms must stay within one ulp of the
# exact value (their own error is ~5e-6 relative). The references are float64 and free of cancellation (sigmoid
# forms, erfc), so they hold deep into the negative tail. Below an absolute floor anything goes: fp16 outputs turn
# subnormal for x < -5.5 or so, and the flush-to-zero reciprocal gives 0 for results under ~1e-37.
def _erfc64(z: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erfc, otypes=[np.float64])(z)


def _sigmoid_mul64(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-z))


ACTS = {  # name: (GPU op, float64 reference)
    "gelu": (lambda t: oc().gelu(t), lambda x: 0.5 * x * _erfc64(-x / math.sqrt(2.0))),
    "gelu_tanh": (lambda t: oc().gelu(t, approximate="tanh"),
                  lambda x: _sigmoid_mul64(x, 2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": (lambda t: oc().silu(t), lambda x: _sigmoid_mul64(x, x)),
    "quick_gelu": (lambda t: oc().quick_gelu(t), lambda x: _sigmoid_mul64(x, 1.702 * x)),
}
ULP = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
TINY = {"float16": 6.2e-5, "bfloat16": 1e-30}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("act", list(ACTS))
def test_fast_activations_elementwise(act, dtype):
    x = np.linspace(-12, 12, 8 * 4099, dtype=np.float32).astype(NP[dtype])
    fn, ref = ACTS[act]
    got = fn(gpu(x)).numpy().astype(np.float64)
    want = ref(x.astype(np.float64))
    bad = np.abs(got - want) > ULP[dtype] * np.abs(want) + TINY[dtype]
    assert not bad.any(), f"{bad.sum()} values off, first x={x[bad][:3]}: got {got[bad][:3]}, want {want[bad][:3]}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gelu_mul_fast_elementwise(dtype):
    """GEGLU's gate through the fast GELU, element by element, with h = 1."""
    g = np.linspace(-12, 12, 8 * 4099, dtype=np.float32)
    x = np.stack([np.ones_like(g), g]).T.reshape(-1, 2).astype(NP[dtype])  # rows [h, g]
    got = oc().gelu_mul(gpu(x)).numpy().astype(np.float64)[:, 0]
    want = ACTS["gelu"][1](x[:, 1].astype(np.float64))
    bad = np.abs(got - want) > ULP[dtype] * np.abs(want) + TINY[dtype]
    assert not bad.any(), f"{bad.sum()} values off, first g={g[bad][:3]}: got {got[bad][:3]}, want {want[bad][:3]}"


# ------------------------------------------------------------------------------- more than 2^31 elements
def test_gelu_mul_past_2_31(rng):
    """GEGLU's 64-bit index path: rows whose offsets pass 2^31 elements, checked on the tail rows."""
    n = 4096
    rows = (1 << 31) // (2 * n) + 3
    free, _ = cuda.current_device().mem_get_info()
    if free < 3 * rows * n * 2 + (1 << 30):
        pytest.skip("needs about 14 GB of free GPU memory")
    block = np.clip(randn(rng, 61, 2 * n, scale=3.0), -8, 8).astype(ml_dtypes.bfloat16)
    x_host = np.tile(block, (-(-rows // 61), 1))[:rows]
    out = poisoned(oc().gelu_mul, gpu(x_host))
    tail = slice(rows - 5, rows)
    err = rel_l2(out[tail].numpy().astype(np.float32), cpu.gelu_mul(x_host[tail]))
    assert err < TOL["bfloat16"], err
