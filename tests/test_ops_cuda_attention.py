"""ops.attention on the GPU (kernels/attention.cu) against ops.cpu.attention, the float32 reference.

bf16 and fp16, head dims 64 and 128, lengths that are and are not multiples of the kernel's tiles (128 queries,
64 keys), Sq != Sk, key padding masks (random per batch, with holes, one batch fully masked), strided q/k/v views
of a fused [B, S, 3, H, D] QKV buffer. Outputs are NaN-poisoned before the kernel runs, and q/k/v are views into
buffers whose rows past the sequence end are NaN, so unwritten outputs and reads past the end both fail.
"""


import ml_dtypes
import numpy as np
import pytest
from fastdm.kernels import call as kernel_call
from fastdm.runtime import cuda, ops
from fastdm.runtime.errors import CudaError, ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import TOL, randn, rel_l2

pytestmark = pytest.mark.gpu

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
B, H = 2, 3


def gpu(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a), device="cuda")


def cuda_attention(*args, **kwargs) -> Tensor:
    from fastdm.runtime.ops import cuda as ops_cuda  # loads the kernel library: only where a GPU test runs

    return ops_cuda.attention(*args, **kwargs)


def rand(rng, dtype: str, *shape, scale: float = 1.0) -> np.ndarray:
    return randn(rng, *shape, scale=scale).astype(NP_DTYPES[dtype])


def poisoned(shape, dtype: str) -> Tensor:
    """A NaN-filled GPU tensor to pass as `out`: any element the kernel leaves unwritten fails rel_l2."""
    return gpu(np.full(shape, np.nan, dtype=NP_DTYPES[dtype]))


def guarded(shape, dtype: str, guard: int = 4096) -> tuple[Tensor, Tensor]:
    """(out, whole): `out` is a NaN-filled contiguous view at the start of a bigger NaN buffer `whole`, whose
    last `guard` elements must still be NaN afterwards (no stores past the last query row)."""
    n = int(np.prod(shape))
    whole = gpu(np.full(n + guard, np.nan, dtype=NP_DTYPES[dtype]))
    return whole[:n].view(*shape), whole


def guard_intact(whole: Tensor, guard: int = 4096) -> bool:
    return bool(np.isnan(whole.numpy()[-guard:].astype(np.float32)).all())


def nan_padded(a: np.ndarray, pad: int = 37) -> Tensor:
    """a: [B, S, H, D] -> a GPU view of rows [:S] of a [B, S + pad, H, D] buffer whose extra rows are NaN, so a
    kernel that reads past the end of the sequence (instead of masking the tail tile) produces NaN."""
    buf = np.full((a.shape[0], a.shape[1] + pad) + a.shape[2:], np.nan, dtype=a.dtype)
    buf[:, : a.shape[1]] = a
    return gpu(buf)[:, : a.shape[1]]


def padding_mask(rng, bsz: int, sk: int) -> np.ndarray:
    """[B, Sk] bool, True = attend: each batch keeps a random-length prefix (at least one key)."""
    lengths = rng.integers(1, sk + 1, size=bsz)
    return np.arange(sk)[None, :] < lengths[:, None]


def check(out: Tensor, ref: np.ndarray, dtype: str) -> None:
    assert out.dtype.name == dtype and out.shape == ref.shape and out.is_contiguous()
    got = out.numpy().astype(np.float32)
    err = rel_l2(got, ref)
    assert err < TOL[dtype], f"rel_l2 {err:.3g} >= {TOL[dtype]} (dtype {dtype}, shape {ref.shape})"


LENGTHS = [(1, 1), (7, 7), (64, 64), (129, 129), (1000, 1000), (7, 129), (129, 7), (1, 1000), (1000, 1),
           (64, 200), (300, 65)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk", LENGTHS, ids=[f"sq{a}-sk{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_cpu(rng, dtype, d, sq, sk, masked):
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    mask = padding_mask(rng, B, sk) if masked else None
    out, whole = guarded((B, sq, H, d), dtype)
    res = cuda_attention(nan_padded(q), nan_padded(k), nan_padded(v), None if mask is None else gpu(mask),
                         out=out)
    assert res is out
    check(out, cpu.attention(q, k, v, mask), dtype)
    assert guard_intact(whole)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
def test_fully_masked_batch_and_masks_with_holes(rng, dtype, d):
    bsz, sq, sk = 3, 150, 200
    q, k, v = rand(rng, dtype, bsz, sq, H, d), rand(rng, dtype, bsz, sk, H, d), rand(rng, dtype, bsz, sk, H, d)
    mask = rng.random((bsz, sk)) < 0.6  # holes inside every key tile
    mask[1] = False  # batch 1: nothing to attend -> zeros, as ops.cpu defines
    mask[2, :130] = False  # batch 2: the first two key tiles entirely masked, then some keys
    mask[2, 190] = True
    out = poisoned((bsz, sq, H, d), dtype)
    cuda_attention(gpu(q), gpu(k), gpu(v), gpu(mask), out=out)
    ref = cpu.attention(q, k, v, mask)
    assert np.all(out.numpy()[1].astype(np.float32) == 0)
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [7, 129, 1000])
def test_fused_qkv_views(rng, dtype, d, s):
    qkv = rand(rng, dtype, B, s, 3, H, d)  # a fused QKV projection's output
    t = gpu(qkv)
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    assert not q.is_contiguous() and q.strides == (s * 3 * H * d, 3 * H * d, d, 1)
    mask = padding_mask(rng, B, s)
    out = cuda_attention(q, k, v, gpu(mask), out=poisoned((B, s, H, d), dtype))
    check(out, cpu.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_public_api_dispatch_and_default_scale(rng, dtype):
    sq, sk, d = 77, 150, 64
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    mask = padding_mask(rng, B, sk)
    out = ops.attention(gpu(q), gpu(k), gpu(v), gpu(mask))  # allocates its own output
    assert out.is_cuda
    check(out, cpu.attention(q, k, v, mask), dtype)
    out = ops.attention(gpu(q), gpu(k), gpu(v), scale=0.05)
    check(out, cpu.attention(q, k, v, scale=0.05), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("scale", [1.0, -0.3], ids=["peaky", "negative"])
def test_scales(rng, dtype, scale):
    # scale 1 with D=128 gives scores of std ~11: nearly one-hot rows that stress the online max and rescaling
    sq, sk, d = 200, 300, 128
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    out = cuda_attention(gpu(q), gpu(k), gpu(v), scale=scale, out=poisoned((B, sq, H, d), dtype))
    check(out, cpu.attention(q, k, v, scale=scale), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_masked_keys_have_no_influence(rng, dtype):
    sq, sk, d = 100, 140, 64
    q, k, v = rand(rng, dtype, 1, sq, H, d), rand(rng, dtype, 1, sk, H, d), rand(rng, dtype, 1, sk, H, d)
    keep = np.zeros((1, sk), dtype=bool)
    keep[0, 10:75] = True
    k[:, ~keep[0]] = (k[:, ~keep[0]].astype(np.float32) * 300).astype(k.dtype)  # huge scores on masked keys
    out = cuda_attention(gpu(q), gpu(k), gpu(v), gpu(keep))
    check(out, cpu.attention(q, k[:, 10:75], v[:, 10:75]), dtype)


def test_strided_mask_view_and_determinism(rng):
    dtype, sq, sk, d = "bfloat16", 130, 129, 128
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    big = rng.random((B, sk + 11)) < 0.5
    big[:, 0] = True
    mask = gpu(big)[:, :sk]  # batch stride sk + 11
    args = (gpu(q), gpu(k), gpu(v), mask)
    out1 = cuda_attention(*args).numpy()
    out2 = cuda_attention(*args).numpy()
    assert np.array_equal(out1.view(np.uint16), out2.view(np.uint16))
    assert rel_l2(out1.astype(np.float32), cpu.attention(q, k, v, big[:, :sk])) < TOL[dtype]


def test_long_sequence_4608(rng):
    # FLUX.1 at 1024x1024 attends over 4096 image + 512 text tokens
    dtype, s, d = "bfloat16", 4608, 128
    qkv = rand(rng, dtype, B, s, 3, H, d)
    t = gpu(qkv)
    mask = padding_mask(rng, B, s)
    out = cuda_attention(t[:, :, 0], t[:, :, 1], t[:, :, 2], gpu(mask), out=poisoned((B, s, H, d), dtype))
    check(out, cpu.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask), dtype)


def test_rejects_bad_input(rng):
    q = gpu(rand(rng, "bfloat16", 1, 8, 2, 64))
    with pytest.raises(ShapeError, match="head dims"):
        x = gpu(rand(rng, "bfloat16", 1, 8, 2, 32))
        cuda_attention(x, x, x)
    with pytest.raises(UnsupportedDtypeError, match="bfloat16 or float16"):
        x = gpu(randn(rng, 1, 8, 2, 64))
        cuda_attention(x, x, x)
    with pytest.raises(UnsupportedDtypeError, match="share one dtype"):
        cuda_attention(q, gpu(rand(rng, "float16", 1, 8, 2, 64)), q)
    with pytest.raises(ShapeError, match="k must be"):
        cuda_attention(q, gpu(rand(rng, "bfloat16", 1, 8, 3, 64)), q)
    with pytest.raises(ShapeError, match="v must"):
        cuda_attention(q, q, gpu(rand(rng, "bfloat16", 1, 9, 2, 64)))
    with pytest.raises(UnsupportedDtypeError, match="bool"):
        cuda_attention(q, q, q, gpu(np.ones((1, 8), dtype=np.uint8)))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        cuda_attention(q, q, q, gpu(np.ones((1, 7), dtype=bool)))
    with pytest.raises(ShapeError, match="16-byte"):
        x = gpu(rand(rng, "bfloat16", 1, 8, 2, 72))[..., 4:68]  # rows start 8 bytes off a 16-byte boundary
        cuda_attention(x, x, x)
    with pytest.raises(ShapeError, match="GPU Tensor"):
        cuda_attention(Tensor.from_numpy(rand(rng, "bfloat16", 1, 8, 2, 64)), q, q)


def test_kernel_rejects_unsupported_head_dim(rng):
    # the C entry point checks on its own (status < 0 with a message), whatever calls it
    x = gpu(rand(rng, "bfloat16", 1, 8, 2, 96))
    with pytest.raises(CudaError, match="head dim 96 is not supported"):
        kernel_call("fdm_attention", x.data_ptr, x.data_ptr, x.data_ptr, None, x.data_ptr, 1, 8, 8, 2, 96,
                     *(8 * 2 * 96, 2 * 96, 96) * 3, 0, 0.1, x.dtype.code, cuda.current_stream().handle)
