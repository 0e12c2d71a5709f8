"""ops.cuda group_norm(channels_last=True) (kernels/group_norm_nhwc.cu) against ops.cpu's group_norm.

x is [N, *spatial, C]. Shapes: SDXL UNet's (C = 320 with 32 groups has Cg = 10, so a 16-byte pack of 8 bf16
channels straddles two groups), the VAE's (Cg = 4: every pack holds two groups), rows wider than one block of
column threads (C = 2560 in float32 is 640 packs, three slabs with idle columns), rows that need the opt-in shared
memory size (C = 8192), C not a multiple of the vector width (the scalar path), 3-d input, one chunk and many
chunks per sample. Before each op the allocator's free memory is filled with NaN bytes, so anything the kernels
leave unwritten (output or workspace) comes back NaN, and rel_l2 turns any NaN into a failure.
"""


import numpy as np
import pytest
from fastdm.runtime import cuda, ops
from fastdm.runtime.errors import CudaError, ShapeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from gpu_ops import DTYPES, gpu, group_ids, oc, poisoned, rand
from numerics import TOL, rel_l2

pytestmark = pytest.mark.gpu


# (shape [N, *spatial, C], groups)
SMALL = [((3, 5, 7, 24), 6), ((2, 9, 11, 12), 4), ((2, 50, 64), 8), ((1, 1, 1, 32), 32), ((4, 3, 40), 4),
         ((2, 4099, 64), 8), ((1, 64, 8192), 32), ((2, 17, 19, 2560), 32)]
SDXL = [((2, 128, 128, 320), 32), ((2, 64, 64, 640), 32), ((2, 32, 32, 1280), 32), ((2, 32, 32, 2560), 32),
        ((1, 128, 128, 960), 32)]
VAE = [((1, 256, 256, 512), 32), ((1, 1024, 1024, 128), 32)]


@pytest.fixture(autouse=True)
def three_kernel_path():
    """These are the three-kernel path's tests: on Hopper the automatic choice takes the one-pass cluster kernel
    where it fits (tests/test_ops_cuda_group_norm_sm90.py tests that one), so the path is forced here."""
    from fastdm import kernels

    kernels.call("fdm_group_norm_set_path", 2)
    yield
    kernels.call("fdm_group_norm_set_path", 0)


def check(out: Tensor, ref: np.ndarray, dtype: str, tol: float | None = None) -> None:
    """Every element of out against ref (NaN anywhere fails: rel_l2 returns inf)."""
    tol = TOL[dtype] if tol is None else tol
    assert out.dtype.name == dtype, (out.dtype.name, dtype)
    assert out.shape == ref.shape and out.is_contiguous(), (out.shape, ref.shape, out.strides)
    got = out.numpy().astype(np.float32)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} non-finite outputs"
    err = rel_l2(got, ref)
    assert err < tol, f"rel_l2 {err:.3g} >= {tol} (dtype {dtype}, shape {ref.shape})"


def run(rng, dtype: str, shape, groups: int, affine: bool, activation, shift: float = 0.5, scale: float = 2.0):
    x = rand(rng, dtype, *shape, scale=scale, shift=shift)  # a mean away from 0 checks the merged statistics
    c = shape[-1]
    w = rand(rng, dtype, c, shift=1.0) if affine else None
    b = rand(rng, dtype, c) if affine else None
    out = poisoned(oc().group_norm, gpu(x), None if w is None else gpu(w), None if b is None else gpu(b),
                   num_groups=groups, eps=1e-5, activation=activation, channels_last=True)
    ref = cpu.group_norm(x, w, b, num_groups=groups, eps=1e-5, activation=activation, channels_last=True)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SMALL, ids=group_ids(SMALL))
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_nhwc(rng, dtype, shape, groups, affine, activation):
    out, ref = run(rng, dtype, shape, groups, affine, activation)
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SDXL, ids=group_ids(SDXL))
@pytest.mark.parametrize("affine,activation", [(True, "silu"), (False, None)], ids=["affine_silu", "plain"])
def test_group_norm_nhwc_sdxl(rng, dtype, shape, groups, affine, activation):
    out, ref = run(rng, dtype, shape, groups, affine, activation)
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", VAE, ids=group_ids(VAE))
def test_group_norm_nhwc_vae(rng, dtype, shape, groups):
    out, ref = run(rng, dtype, shape, groups, True, "silu")
    check(out, ref, dtype)


def test_shapes_cover_several_chunks():
    """The statistics of the SMALL [2, 4099, 64] case and the SDXL cases may be split over several chunks per
    sample (the kernel runs min(this bound, one wave of blocks), and a wave is at least one block per SM), so the
    chunk merge is tested; [3, 5, 7, 24] runs as one."""
    from fastdm.runtime.ops.cuda.norms import nhwc_chunks

    sms = cuda.current_device().multiprocessor_count
    assert nhwc_chunks(2, 4099, 64 * 4, sms) > 1
    for (n, *spatial, c), _ in SDXL:
        assert nhwc_chunks(n, int(np.prod(spatial)), c * 2, sms) > 8
    assert nhwc_chunks(3, 35, 24 * 4, sms) == 1


@pytest.mark.parametrize("shape,groups", [((2, 64, 64, 320), 32), ((1, 3, 5, 24), 6), ((2, 9, 11, 12), 4)],
                         ids=["2x64x64x320-g32", "1x3x5x24-g6", "2x9x11x12-g4"])
def test_large_mean_offset_float32(rng, shape, groups):
    """x = 1000 + randn: a float32 mean near 1000 is only good to ~3e-5, so the statistics and y must be computed
    on x minus a reference value to stay at float32 accuracy (E[x^2] - E[x]^2 would lose everything)."""
    x = (1000.0 + rng.standard_normal(shape)).astype(np.float32)
    c = shape[-1]
    w = rand(rng, "float32", c, shift=1.0)
    b = rand(rng, "float32", c)
    out = poisoned(oc().group_norm, gpu(x), gpu(w), gpu(b), num_groups=groups, eps=1e-6, channels_last=True)
    check(out, cpu.group_norm(x, w, b, num_groups=groups, eps=1e-6, channels_last=True), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_nhwc_from_permuted_view(rng, dtype):
    """A channels-last view of an NCHW tensor (last dim not contiguous) is copied first; through ops.group_norm."""
    x = rand(rng, dtype, 2, 48, 9, 13, shift=0.3)  # [N, C, H, W]
    w, b = rand(rng, dtype, 48, shift=1.0), rand(rng, dtype, 48)
    xt = gpu(x).permute(0, 2, 3, 1)  # [N, H, W, C] view
    out = poisoned(ops.group_norm, xt, 8, gpu(w), gpu(b), eps=1e-5, activation="silu", channels_last=True)
    ref = cpu.group_norm(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, b, num_groups=8, eps=1e-5,
                         activation="silu", channels_last=True)
    check(out, ref, dtype)


def test_group_norm_nhwc_deterministic(rng):
    x = gpu(rand(rng, "bfloat16", 2, 64, 64, 640, shift=0.5))
    a, b = oc().group_norm(x, num_groups=32, channels_last=True), oc().group_norm(x, num_groups=32, channels_last=True)
    assert np.array_equal(a.numpy().view(np.uint16), b.numpy().view(np.uint16))


def test_group_norm_nhwc_rejects_bad_input(rng):
    x = gpu(rand(rng, "float32", 2, 3, 4, 12))
    with pytest.raises(ShapeError, match=r"\[N, \*spatial, C\]"):
        oc().group_norm(x, num_groups=5, channels_last=True)  # 12 channels (the last dim) into 5 groups
    with pytest.raises(ShapeError, match="weight"):
        oc().group_norm(x, gpu(rand(rng, "float32", 4)), num_groups=4, channels_last=True)
    with pytest.raises(ShapeError, match=r"\[N, \*spatial, C\]"):
        oc().group_norm(gpu(rand(rng, "float32", 12)), num_groups=4, channels_last=True)


def test_group_norm_nhwc_too_many_channels(rng):
    """Channels whose per-block statistics do not fit in shared memory are refused with a message, not run."""
    x = gpu(rand(rng, "bfloat16", 1, 2, 40000))
    with pytest.raises(CudaError, match="shared memory"):
        oc().group_norm(x, num_groups=8, channels_last=True)


def test_kernel_checks_workspace_size(rng):
    """fdm_group_norm_nhwc refuses a workspace smaller than N*G*chunks*2 + 3*N*C floats."""
    from fastdm.runtime import dtypes
    from fastdm.runtime.ops.cuda._common import stream
    from fastdm.runtime.ops.cuda.norms import nhwc_workspace_elems
    from fastdm.runtime.tensor import empty

    from fastdm import kernels

    n, s, c, g, chunks = 2, 30, 16, 4, 3
    x = gpu(rand(rng, "float32", n, s, c))
    y = empty((n, s, c), dtypes.float32, x.device)
    need = nhwc_workspace_elems(n, c, g, chunks)
    assert need == n * g * chunks * 2 + 3 * n * c
    ws = empty((need,), dtypes.float32, x.device)
    args = (x.data_ptr, None, None, y.data_ptr, ws.data_ptr)
    tail = (chunks, n, s, c, g, 1e-5, 0, x.dtype.code, stream(x.device))
    with pytest.raises(CudaError, match="workspace"):
        kernels.call("fdm_group_norm_nhwc", *args, need - 1, *tail)
    kernels.call("fdm_group_norm_nhwc", *args, need, *tail)
    xa = x.numpy()
    check(y, cpu.group_norm(xa, num_groups=g, eps=1e-5, channels_last=True), "float32")
    with pytest.raises(CudaError, match="groups"):
        kernels.call("fdm_group_norm_nhwc", *args, need, chunks, n, s, c, 5, 1e-5, 0, x.dtype.code,
                     stream(x.device))
    with pytest.raises(CudaError, match="required"):
        kernels.call("fdm_group_norm_nhwc", None, *args[1:], need, *tail)
