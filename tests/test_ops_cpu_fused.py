"""ops.cpu.qk_norm_rope (the reference of the fused QK RMSNorm + RoPE op) against a float64 reference written here
independently (complex rotation, not cpu.rope), and ops.qk_norm_rope's dispatch of CPU tensors."""


import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import ops
from fastdm.runtime.errors import ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import TOL, randn, rel_l2

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def angles(rng, s: int, d: int):
    theta = rng.uniform(-20, 20, (s, d // 2))
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def reference(qkv, qw, kw, cos, sin, eps, interleaved):
    """float64: RMSNorm over the last dim with the weight, then each pair (a, b) as the complex a + ib times
    cos + i sin. Returns [B, S, 3, H, D]."""
    x = np.asarray(qkv).astype(np.float64)
    d = x.shape[-1]
    rot = (np.asarray(cos, np.float64) + 1j * np.asarray(sin, np.float64))[None, :, None, :]  # [1, S, 1, D/2]
    out = x.copy()
    for i, w in ((0, qw), (1, kw)):
        y = x[:, :, i] / np.sqrt(np.mean(x[:, :, i] ** 2, axis=-1, keepdims=True) + eps)
        if w is not None:
            y = y * np.asarray(w).astype(np.float64)
        if interleaved:
            z = (y[..., 0::2] + 1j * y[..., 1::2]) * rot
            y = np.stack([z.real, z.imag], axis=-1).reshape(y.shape)
        else:
            z = (y[..., : d // 2] + 1j * y[..., d // 2:]) * rot
            y = np.concatenate([z.real, z.imag], axis=-1)
        out[:, :, i] = y
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 7, 3, 64), (3, 5, 2, 6), (1, 9, 4, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize("weights", [True, False])
def test_qk_norm_rope_matches_reference(rng, dtype, shape, interleaved, weights):
    b, s, h, d = shape
    qkv = (randn(rng, b, s, 3, h, d, scale=2.0) + 0.3).astype(dtype)
    qw = randn(rng, d).astype(dtype) if weights else None
    kw = randn(rng, d).astype(dtype) if weights else None
    cos, sin = angles(rng, s, d)
    q, k, v = cpu.qk_norm_rope(qkv, qw, kw, cos, sin, eps=1e-5, interleaved=interleaved)
    ref = reference(qkv, qw, kw, cos, sin, 1e-5, interleaved)
    for i, t in enumerate((q, k, v)):
        assert t.dtype == np.float32 and t.shape == (b, s, h, d)
        assert rel_l2(t, ref[:, :, i]) < TOL["float32"], i
    np.testing.assert_array_equal(v, qkv[:, :, 2].astype(np.float32))
    # views of one [B, S, 3, H, D] array
    assert q.base is not None and q.base is k.base and k.base is v.base and q.base.shape == (b, s, 3, h, d)


def test_qk_norm_rope_is_the_composition(rng):
    """Same values as rope(rms_norm(.)) on q and k, the two ops it fuses."""
    qkv = randn(rng, 2, 5, 3, 3, 16)
    qw, kw = randn(rng, 16), randn(rng, 16)
    cos, sin = angles(rng, 5, 16)
    q, k, _ = cpu.qk_norm_rope(qkv, qw, kw, cos, sin, eps=1e-6, interleaved=False)
    np.testing.assert_array_equal(q, cpu.rope(cpu.rms_norm(qkv[:, :, 0], qw, eps=1e-6), cos, sin, interleaved=False))
    np.testing.assert_array_equal(k, cpu.rope(cpu.rms_norm(qkv[:, :, 1], kw, eps=1e-6), cos, sin, interleaved=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_qk_norm_rope_out_and_in_place(rng, dtype):
    qkv = randn(rng, 1, 6, 3, 2, 8, scale=2.0).astype(dtype)
    qw, kw = randn(rng, 8).astype(dtype), randn(rng, 8).astype(dtype)
    cos, sin = angles(rng, 6, 8)
    ref = reference(qkv, qw, kw, cos, sin, 1e-6, True)
    out = np.full(qkv.shape, np.nan, dtype=ml_dtypes.bfloat16)
    q, k, v = cpu.qk_norm_rope(qkv, qw, kw, cos, sin, out=out)
    assert q.base is out or np.shares_memory(q, out)
    assert rel_l2(out.astype(np.float32), ref) < TOL["bfloat16"]
    inplace = qkv.copy()
    q, k, v = cpu.qk_norm_rope(inplace, qw, kw, cos, sin, out=inplace)
    assert np.shares_memory(q, inplace) and q.dtype == np.dtype(dtype)
    assert rel_l2(inplace.astype(np.float32), ref) < TOL[np.dtype(dtype).name]
    np.testing.assert_array_equal(inplace[:, :, 2], qkv[:, :, 2])


def test_ops_qk_norm_rope_dispatches_cpu_tensors(rng):
    qkv = randn(rng, 2, 3, 3, 2, 4)
    qw, kw = randn(rng, 4), randn(rng, 4)
    cos, sin = angles(rng, 3, 4)
    out = ops.qk_norm_rope(*(Tensor.from_numpy(a) for a in (qkv, qw, kw, cos, sin)), eps=1e-6, interleaved=False)
    assert isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, Tensor) for t in out)
    ref = reference(qkv, qw, kw, cos, sin, 1e-6, False)
    for i, t in enumerate(out):
        assert t.shape == (2, 3, 2, 4)
        assert rel_l2(t.numpy(), ref[:, :, i]) < TOL["float32"]
    buf = Tensor.from_numpy(qkv.copy())
    q, _, _ = ops.qk_norm_rope(buf, Tensor.from_numpy(qw), None, Tensor.from_numpy(cos), Tensor.from_numpy(sin),
                               interleaved=False, out=buf)
    assert rel_l2(buf.numpy()[:, :, 0], reference(qkv, qw, None, cos, sin, 1e-6, False)[:, :, 0]) < TOL["float32"]
    assert rel_l2(q.numpy(), buf.numpy()[:, :, 0]) == 0.0


def test_qk_norm_rope_rejects_bad_input(rng):
    cos, sin = angles(rng, 3, 8)
    with pytest.raises(ShapeError, match=r"\[B, S, 3, H, D\]"):
        cpu.qk_norm_rope(randn(rng, 1, 3, 2, 2, 8), None, None, cos, sin)
    with pytest.raises(ShapeError, match="S, D/2"):
        cpu.qk_norm_rope(randn(rng, 1, 4, 3, 2, 8), None, None, cos, sin)
    with pytest.raises(ShapeError):
        cpu.qk_norm_rope(randn(rng, 1, 3, 3, 2, 8), randn(rng, 4), None, cos, sin)
    with pytest.raises(ShapeError, match="out"):
        cpu.qk_norm_rope(randn(rng, 1, 3, 3, 2, 8), None, None, cos, sin, out=np.zeros((1, 3, 3, 2, 4), np.float32))
    with pytest.raises(UnsupportedDtypeError):
        cpu.qk_norm_rope(np.ones((1, 3, 3, 2, 8), np.int32), None, None, cos, sin)
