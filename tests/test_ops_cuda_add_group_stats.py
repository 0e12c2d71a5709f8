"""ops.cuda add_group_stats / concat_group_stats + group_norm(stats=) (kernels/group_norm_nhwc.cu:
fdm_add_group_stats_nhwc, fdm_concat_group_stats_nhwc, fdm_group_norm_nhwc_apply) against ops.cuda add / concat and
ops.cpu group_norm.

add_group_stats writes a + alpha * b and the group moments of what it wrote; group_norm(..., stats=) then runs only
the finalize and apply kernels. The sum must be ops.add's bit for bit, and the GroupNorm of it must match the float32
reference GroupNorm of those same stored values. Shapes cover packs straddling two groups (Cg = 4, 10), rows wider
than one block of column threads, rows needing the opt-in shared memory size, C not a multiple of the vector width
(the scalar path), one and many chunks a sample, and b of a's shape or one row a sample (the UNet's time embedding).
Outputs and workspace start as NaN bytes (poisoned), so anything left unwritten fails.
"""


import numpy as np
import pytest
from fastdm.runtime import ops
from fastdm.runtime.errors import CudaError, ShapeError
from fastdm.runtime.ops import cpu
from gpu_ops import DTYPES, gpu, group_ids, oc, poisoned, rand
from numerics import TOL, rel_l2

pytestmark = pytest.mark.gpu

# (a's shape [N, *spatial, C], groups)
CASES = [((3, 5, 7, 24), 6), ((2, 9, 11, 12), 4), ((2, 50, 64), 8), ((1, 1, 1, 32), 32), ((2, 4099, 64), 8),
         ((1, 64, 8192), 32), ((2, 17, 19, 2560), 32), ((2, 5, 7, 36), 4), ((2, 64, 64, 320), 32),
         ((2, 32, 32, 1280), 32)]
LARGE = [((2, 128, 128, 512), 32), ((1, 256, 256, 256), 32)]


def per_sample(shape):
    return (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)


def bits(t) -> np.ndarray:
    a = t.numpy()
    return a.view(np.uint8).reshape(a.shape + (-1,))


def run_pair(rng, dtype, shape, groups, b_shape, alpha=1.0, activation="silu", affine=True):
    a = gpu(rand(rng, dtype, *shape, scale=2.0, shift=0.5))  # a mean away from 0 checks the merged statistics
    b = gpu(rand(rng, dtype, *b_shape, scale=0.5, shift=0.25))
    c = shape[-1]
    w = gpu(rand(rng, dtype, c, shift=1.0)) if affine else None
    bias = gpu(rand(rng, dtype, c)) if affine else None
    out, stats = poisoned(ops.add_group_stats, a, b, groups, alpha=alpha)
    assert np.array_equal(bits(out), bits(oc().add(a, b, alpha=alpha))), "the sum differs from ops.add's"
    y = poisoned(ops.group_norm, out, groups, w, bias, eps=1e-5, activation=activation, channels_last=True,
                 stats=stats)
    ref = cpu.group_norm(out.numpy(), None if w is None else w.numpy(), None if bias is None else bias.numpy(),
                         num_groups=groups, eps=1e-5, activation=activation, channels_last=True)
    return out, y, ref


def check(y, ref, dtype, tol=None):
    got = y.numpy().astype(np.float32)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} non-finite outputs"
    err = rel_l2(got, ref)
    assert err < (TOL[dtype] if tol is None else tol), f"rel_l2 {err:.3g} (dtype {dtype}, shape {ref.shape})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", CASES, ids=group_ids(CASES))
@pytest.mark.parametrize("b_kind", ["full", "per_sample"])
def test_add_group_stats_then_group_norm(rng, dtype, shape, groups, b_kind):
    b_shape = shape if b_kind == "full" else per_sample(shape)
    _, y, ref = run_pair(rng, dtype, shape, groups, b_shape)
    check(y, ref, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape,groups", LARGE, ids=group_ids(LARGE))
def test_add_group_stats_large(rng, dtype, shape, groups):
    _, y, ref = run_pair(rng, dtype, shape, groups, shape)
    check(y, ref, dtype)


@pytest.mark.parametrize("activation,affine", [(None, False), (None, True), ("silu", False)])
def test_apply_options(rng, activation, affine):
    _, y, ref = run_pair(rng, "float32", (2, 6, 10, 48), 8, (2, 1, 1, 48), activation=activation, affine=affine)
    check(y, ref, "float32")


def test_alpha(rng):
    _, y, ref = run_pair(rng, "bfloat16", (2, 12, 12, 64), 8, (2, 12, 12, 64), alpha=-0.75)
    check(y, ref, "bfloat16")


def test_same_result_as_group_norm_without_stats(rng):
    """The statistics from the producer and GroupNorm's own give the same output up to float32 rounding."""
    out, y, _ = run_pair(rng, "float32", (2, 32, 32, 320), 32, (2, 1, 1, 320), affine=False)
    from fastdm import kernels

    kernels.call("fdm_group_norm_set_path", 2)  # the three-kernel path: the same finalize and apply kernels
    try:
        plain = oc().group_norm(out, None, None, num_groups=32, eps=1e-5, activation="silu", channels_last=True)
    finally:
        kernels.call("fdm_group_norm_set_path", 0)
    assert rel_l2(y.numpy(), plain.numpy()) < 2e-6


def test_large_mean_offset_float32(rng):
    """x = 1000 + randn through the producer: its statistics are taken on x minus a reference value too."""
    shape = (2, 16, 16, 96)
    a = gpu((1000.0 + rng.standard_normal(shape)).astype(np.float32))
    b = gpu(rng.standard_normal(shape).astype(np.float32) * np.float32(0.1))
    out, stats = ops.add_group_stats(a, b, 12)
    y = ops.group_norm(out, 12, eps=1e-6, channels_last=True, stats=stats)
    check(y, cpu.group_norm(out.numpy(), num_groups=12, eps=1e-6, channels_last=True), "float32")


def test_deterministic(rng):
    a = gpu(rand(rng, "bfloat16", 2, 64, 64, 640, shift=0.5))
    b = gpu(rand(rng, "bfloat16", 2, 1, 1, 640))
    ys = []
    for _ in range(2):
        out, stats = ops.add_group_stats(a, b, 32)
        ys.append(bits(ops.group_norm(out, 32, activation="silu", channels_last=True, stats=stats)))
    assert np.array_equal(ys[0], ys[1])


def test_rejects_bad_input(rng):
    a = gpu(rand(rng, "float32", 2, 3, 4, 12))
    with pytest.raises(ShapeError, match="one row a sample"):
        ops.add_group_stats(a, gpu(rand(rng, "float32", 12)), 4)  # broadcast over the batch: ops.add's job
    with pytest.raises(ShapeError, match="groups"):
        ops.add_group_stats(a, a, 5)
    with pytest.raises(ShapeError, match=r"\[N, \*spatial, C\]"):
        ops.add_group_stats(gpu(rand(rng, "float32", 12)), gpu(rand(rng, "float32", 12)), 4)
    with pytest.raises(Exception, match="float16"):
        ops.add_group_stats(a, gpu(rand(rng, "float16", 2, 3, 4, 12)), 4)
    out, stats = ops.add_group_stats(a, a, 4)
    with pytest.raises(ShapeError, match="another tensor"):
        ops.group_norm(ops.contiguous(a), 4, channels_last=True, stats=stats)
    with pytest.raises(ShapeError, match="groups"):
        ops.group_norm(out, 2, channels_last=True, stats=stats)
    with pytest.raises(ShapeError, match="channels_last"):
        ops.group_norm(out, 4, stats=stats)


def test_kernel_checks_workspace_size(rng):
    """Both entries refuse a workspace smaller than N*G*chunks*2 + 3*N*C floats."""
    from fastdm.runtime import dtypes
    from fastdm.runtime.ops.cuda._common import stream
    from fastdm.runtime.ops.cuda.norms import nhwc_workspace_elems
    from fastdm.runtime.tensor import empty

    from fastdm import kernels

    n, s, c, g, chunks = 2, 30, 16, 4, 3
    a = gpu(rand(rng, "float32", n, s, c))
    out = empty((n, s, c), dtypes.float32, a.device)
    y = empty((n, s, c), dtypes.float32, a.device)
    need = nhwc_workspace_elems(n, c, g, chunks)
    ws = empty((need,), dtypes.float32, a.device)
    st = stream(a.device)
    with pytest.raises(CudaError, match="workspace"):
        kernels.call("fdm_add_group_stats_nhwc", a.data_ptr, a.data_ptr, 0, 1.0, out.data_ptr, ws.data_ptr, need - 1,
                     chunks, n, s, c, g, a.dtype.code, st)
    kernels.call("fdm_add_group_stats_nhwc", a.data_ptr, a.data_ptr, 0, 1.0, out.data_ptr, ws.data_ptr, need, chunks,
                 n, s, c, g, a.dtype.code, st)
    with pytest.raises(CudaError, match="workspace"):
        kernels.call("fdm_group_norm_nhwc_apply", out.data_ptr, None, None, y.data_ptr, ws.data_ptr, need - 1, chunks,
                     n, s, c, g, 1e-5, 0, a.dtype.code, st)
    kernels.call("fdm_group_norm_nhwc_apply", out.data_ptr, None, None, y.data_ptr, ws.data_ptr, need, chunks, n, s,
                 c, g, 1e-5, 0, a.dtype.code, st)
    x = 2.0 * a.numpy()
    check(y, cpu.group_norm(x, num_groups=g, eps=1e-5, channels_last=True), "float32")
    with pytest.raises(CudaError, match="required"):
        kernels.call("fdm_add_group_stats_nhwc", a.data_ptr, None, 0, 1.0, out.data_ptr, ws.data_ptr, need, chunks,
                     n, s, c, g, a.dtype.code, st)


# (a's and b's shapes' last dims, spatial, groups): the UNet's up-block concatenations, a pack boundary inside a group,
# channel counts that are not whole packs (the scalar path), and a tall tensor split into many chunks
CONCAT = [(640, 320, (2, 16, 16), 32), (320, 320, (2, 9, 7), 32), (12, 20, (2, 5, 7), 8), (8, 24, (1, 3, 3), 4),
          (1280, 640, (2, 8, 8), 32), (64, 64, (2, 4099), 8)]


@pytest.fixture
def concat_stats_always(monkeypatch):
    """concat_group_stats takes statistics from _CONCAT_STATS_MIN_BYTES up only; here the kernel runs at any size."""
    from fastdm.runtime.ops.cuda import norms

    monkeypatch.setattr(norms, "_CONCAT_STATS_MIN_BYTES", 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ca,cb,spatial,groups", CONCAT, ids=[f"{a}+{b}-{'x'.join(map(str, s))}-g{g}"
                                                              for a, b, s, g in CONCAT])
def test_concat_group_stats_then_group_norm(rng, concat_stats_always, dtype, ca, cb, spatial, groups):
    a = gpu(rand(rng, dtype, *spatial, ca, scale=2.0, shift=0.5))
    b = gpu(rand(rng, dtype, *spatial, cb, scale=0.5, shift=-1.0))
    c = ca + cb
    w, bias = gpu(rand(rng, dtype, c, shift=1.0)), gpu(rand(rng, dtype, c))
    out, stats = poisoned(ops.concat_group_stats, a, b, groups)
    assert np.array_equal(bits(out), bits(oc().concat([a, b], axis=-1))), "the concatenation differs from ops.concat's"
    y = poisoned(ops.group_norm, out, groups, w, bias, eps=1e-5, activation="silu", channels_last=True, stats=stats)
    ref = cpu.group_norm(out.numpy(), w.numpy(), bias.numpy(), num_groups=groups, eps=1e-5, activation="silu",
                         channels_last=True)
    check(y, ref, dtype)
    assert stats.payload is not None


@pytest.mark.parametrize("spatial,taken", [((2, 64, 64), True), ((2, 8, 8), False)], ids=["15.7MB", "small"])
def test_concat_statistics_only_where_they_pay(rng, spatial, taken):
    """From 12 MiB of result the concatenation takes the statistics; under it the GroupNorm takes its own. The
    output is right either way."""
    a, b = gpu(rand(rng, "bfloat16", *spatial, 640, shift=0.5)), gpu(rand(rng, "bfloat16", *spatial, 320))
    out, stats = ops.concat_group_stats(a, b, 32)
    assert (stats.payload is not None) == taken
    y = ops.group_norm(out, 32, activation="silu", channels_last=True, stats=stats)
    check(y, cpu.group_norm(out.numpy(), num_groups=32, activation="silu", channels_last=True), "bfloat16")


def test_concat_rejects_bad_input(rng):
    a = gpu(rand(rng, "float32", 2, 3, 4, 12))
    with pytest.raises(ShapeError, match="same N and spatial"):
        ops.concat_group_stats(a, gpu(rand(rng, "float32", 2, 3, 5, 12)), 4)
    with pytest.raises(ShapeError, match="groups"):
        ops.concat_group_stats(a, a, 5)
