"""ops.attention on Hopper's wgmma/TMA kernel (kernels/sm90/attention_sm90.cu) against ops.cpu.attention.

The sm90 path is forced through fdm_attention_set_path and fdm_attention_last_path confirms it ran. The sweep is
tests/test_ops_cuda_attention.py's: bf16 and fp16, head dims 64 and 128, lengths that are and are not multiples of
the kernel's tiles (1, 7, 129, 1000, 4608), Sq != Sk, strided q/k/v views of a fused [B, S, 3, H, D] buffer.
Calls the sm90 kernel does not take (key padding masks, a non-positive scale, a stride-0 head dim) must run on
the mma.sync kernel under the automatic choice and fail with the reason when sm90 is forced. Outputs are
NaN-poisoned with a NaN guard past their end, and q/k/v rows past the sequence end are NaN, so unwritten
outputs, stores past the end and reads past the end all fail.

Runs only on a compute capability 9.0 GPU with a library built for sm_90a.
"""


import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import CudaError
from fastdm.runtime.ops import cpu
from numerics import TOL, rel_l2
from test_ops_cuda_attention import (
    LENGTHS,
    B,
    H,
    check,
    cuda_attention,
    gpu,
    guard_intact,
    guarded,
    nan_padded,
    padding_mask,
    poisoned,
    rand,
)

from fastdm import kernels

pytestmark = pytest.mark.gpu

AUTO, SM90, MMA = 0, 1, 2


def sm90_available() -> bool:
    return cuda.Device(0).compute_capability == (9, 0) and bool(kernels.library().fdm_has_sm90())


def set_path(path: int) -> None:
    kernels.call("fdm_attention_set_path", path)


def last_path() -> int:
    return kernels.library().fdm_attention_last_path()


@pytest.fixture(autouse=True)
def forced_sm90():
    """Every test starts with the sm90 path forced; automatic choice is restored afterwards."""
    if not sm90_available():
        pytest.skip("needs a compute capability 9.0 GPU and a kernel library built for sm_90a")
    set_path(SM90)
    yield
    set_path(AUTO)


def run(*args, **kwargs):
    """cuda_attention, then the path that ran it."""
    out = cuda_attention(*args, **kwargs)
    return out, last_path()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk", LENGTHS, ids=[f"sq{a}-sk{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_cpu(rng, dtype, d, sq, sk, masked):
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    mask = padding_mask(rng, B, sk) if masked else None
    if masked:
        set_path(AUTO)  # masks are the mma.sync kernel's
    out, whole = guarded((B, sq, H, d), dtype)
    res, path = run(nan_padded(q), nan_padded(k), nan_padded(v), None if mask is None else gpu(mask), out=out)
    assert res is out
    assert path == (MMA if masked else SM90)
    check(out, cpu.attention(q, k, v, mask), dtype)
    assert guard_intact(whole)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [1, 7, 129, 1000])
def test_fused_qkv_views(rng, dtype, d, s):
    qkv = rand(rng, dtype, B, s, 3, H, d)  # a fused QKV projection's output
    t = gpu(qkv)
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    assert not q.is_contiguous() and q.strides == (s * 3 * H * d, 3 * H * d, d, 1)
    out, whole = guarded((B, s, H, d), dtype)
    _, path = run(q, k, v, out=out)
    assert path == SM90
    check(out, cpu.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), dtype)
    assert guard_intact(whole)


@pytest.mark.parametrize("d", [64, 128])
def test_long_sequence_4608_single_batch(rng, d):
    # FLUX.1 at 1024x1024 attends over 4096 image + 512 text tokens; B = 1 makes the batch stride unused (0)
    dtype, s = "bfloat16", 4608
    qkv = rand(rng, dtype, 1, s, 3, H, d)
    t = gpu(qkv)
    out, path = run(t[:, :, 0], t[:, :, 1], t[:, :, 2], out=poisoned((1, s, H, d), dtype))
    assert path == SM90
    check(out, cpu.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("scale", [1.0, 0.05, None], ids=["peaky", "small", "default"])
def test_scale_is_honoured(rng, dtype, scale):
    # scale 1 with D=128 gives scores of std ~11: nearly one-hot rows that stress the online max and rescaling
    sq, sk, d = 200, 300, 128
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    out, path = run(gpu(q), gpu(k), gpu(v), scale=scale, out=poisoned((B, sq, H, d), dtype))
    assert path == SM90
    check(out, cpu.attention(q, k, v, scale=scale), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_negative_scale_falls_back(rng, dtype):
    # the collective scales the row max after taking it, which is only right for scale > 0
    sq, sk, d = 70, 90, 64
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    with pytest.raises(CudaError, match="scale"):
        cuda_attention(gpu(q), gpu(k), gpu(v), scale=-0.3)
    set_path(AUTO)
    out, path = run(gpu(q), gpu(k), gpu(v), scale=-0.3, out=poisoned((B, sq, H, d), dtype))
    assert path == MMA
    check(out, cpu.attention(q, k, v, scale=-0.3), dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_masked_call_falls_back(rng, d):
    dtype, sq, sk = "float16", 150, 200
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    mask = padding_mask(rng, B, sk)
    with pytest.raises(CudaError, match="key padding mask"):
        cuda_attention(gpu(q), gpu(k), gpu(v), gpu(mask))
    set_path(AUTO)
    out, path = run(gpu(q), gpu(k), gpu(v), gpu(mask), out=poisoned((B, sq, H, d), dtype))
    assert path == MMA
    check(out, cpu.attention(q, k, v, mask), dtype)
    # the same call without its mask goes back to the sm90 kernel under automatic choice
    out, path = run(gpu(q), gpu(k), gpu(v), out=poisoned((B, sq, H, d), dtype))
    assert path == SM90
    check(out, cpu.attention(q, k, v), dtype)


def test_head_broadcast_stride_falls_back(rng):
    # k and v shared by all heads through a stride-0 head dim: TMA cannot express it, the mma.sync kernel can
    dtype, sq, sk, d = "bfloat16", 100, 130, 128
    q = rand(rng, dtype, B, sq, H, d)
    k1, v1 = rand(rng, dtype, B, sk, 1, d), rand(rng, dtype, B, sk, 1, d)
    k, v = gpu(k1).expand(B, sk, H, d), gpu(v1).expand(B, sk, H, d)
    assert k.strides[2] == 0
    with pytest.raises(CudaError, match="stride"):
        cuda_attention(gpu(q), k, v)
    set_path(AUTO)
    out, path = run(gpu(q), k, v, out=poisoned((B, sq, H, d), dtype))
    assert path == MMA
    ref = cpu.attention(q, np.broadcast_to(k1, (B, sk, H, d)), np.broadcast_to(v1, (B, sk, H, d)))
    check(out, ref, dtype)


def test_agrees_with_mma_kernel_and_is_deterministic(rng):
    dtype, sq, sk, d = "bfloat16", 333, 517, 128
    q, k, v = rand(rng, dtype, B, sq, H, d), rand(rng, dtype, B, sk, H, d), rand(rng, dtype, B, sk, H, d)
    args = (gpu(q), gpu(k), gpu(v))
    out1, path1 = run(*args)
    out2, path2 = run(*args)
    assert path1 == path2 == SM90
    a, b = out1.numpy(), out2.numpy()
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    set_path(MMA)
    ref_mma, path = run(*args)
    assert path == MMA
    # two fp32-accumulating kernels that round P to bf16 at different points: close, not bitwise equal
    assert rel_l2(a.astype(np.float32), ref_mma.numpy().astype(np.float32)) < TOL[dtype]


def test_set_path_rejects_unknown_path():
    with pytest.raises(CudaError, match="unknown attention path"):
        set_path(3)
