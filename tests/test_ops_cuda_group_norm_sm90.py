"""The one-pass Hopper GroupNorm kernels, NCHW and channels-last, against ops.cpu's group_norm: the cluster kernels
(kernels/sm90/group_norm_sm90.cu) and the channels-last whole-tensor-on-chip kernel
(kernels/sm90/group_norm_resident_sm90.cu).

fdm_group_norm_set_path forces the one-pass kernels and fdm_group_norm_last_path confirms they ran. NCHW shapes cover
one CTA a group, 2-7 CTAs (a register-held tail beside the shared memory piece), a 14-CTA non-portable cluster,
pieces that end inside a channel with a shorter last piece, and channel counts per group from 1 to 35. Channels-last
shapes cover rows of a group (64 bytes and up; narrower ones go to the three-kernel path) moved as 4-, 8- and
16-byte units, 1 to 15 CTAs a group and a shorter last piece. x has a large mean (the merged statistics must not
cancel). Before each op the allocator's free memory is filled with NaN bytes, so anything left unwritten comes back
NaN. The whole-tensor kernel's shapes cover groups whose channels straddle 16-byte packs (Cg 10, 20, 24), one to
three samples, fewer rows than SMs, one thread a column (C = 2560 in 16-bit), and x too large for shared memory alone
(a register-held tail), and a CUDA graph replay of its cooperative launch.
"""


import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import CudaError
from fastdm.runtime.ops import cpu
from gpu_ops import DTYPES, gpu, group_ids, oc, poisoned, rand
from numerics import TOL, rel_l2

from fastdm import kernels

pytestmark = pytest.mark.gpu

AUTO, ONE_PASS, TWO_PASS, RESIDENT = 0, 1, 2, 3

# (shape [N, C, *spatial], groups); per dtype the group is 2 (fp16/bf16) or 4 (fp32) bytes an element.
SHAPES = [
    ((1, 32, 8, 8), 32),        # one channel a group, 128-256 bytes
    ((2, 64, 33, 16), 32),      # HW 528
    ((2, 320, 32, 32), 32),     # SDXL: Cg 10, one CTA
    ((2, 320, 64, 64), 32),     # SDXL: 80 / 160 KB groups, 2 / 3 CTAs
    ((1, 512, 64, 64), 32),     # 128 / 256 KB groups, 2 / 4 CTAs
    ((1, 70, 1928), 2),         # Cg 35, 3 / 5 CTAs: pieces end inside a channel, the last one shorter
    ((1, 32, 128, 128), 4),     # 256 / 512 KB groups: 4 / 7 CTAs
    ((1, 32, 128, 128), 2),     # 512 KB / 1 MB groups: 7 / 14 CTAs (a non-portable cluster)
]
# channels-last (shape [N, *spatial, C], groups); row of a group: Cg x 2 (or 4) bytes
SHAPES_NHWC = [
    ((2, 16, 16, 1280), 32),    # Cg 40: 80-byte rows (16-byte units), 160 in float32
    ((2, 8, 8, 2176), 32),      # Cg 68: 136 bytes (8-byte units), 272 in float32
    ((1, 8, 9, 1088), 32),      # Cg 34: 68 bytes (4-byte units), pieces of 4 rows; 136 (8-byte units) in float32
    ((1, 64, 64, 1024), 32),    # Cg 32: 64-byte rows, 256 / 512 KB groups: 4 / 8 CTAs
    ((1, 3, 37, 192), 4),       # Cg 48, S = 111 rows
    ((1, 24, 32, 1280), 4),     # Cg 320: 480 / 960 KB groups, 8 / 15 CTAs (non-portable; the last one shorter)
]

# channels-last for the whole-tensor-on-chip kernel (shape [N, *spatial, C], groups)
SHAPES_RESIDENT = [
    ((2, 32, 32, 1280), 32),    # SDXL 32x32: Cg 40
    ((2, 16, 16, 320), 32),     # Cg 10: packs straddle two groups (8 channels a pack in 16-bit, 4 in float32)
    ((3, 24, 40, 640), 32),     # three samples (44 CTAs each), Cg 20
    ((1, 7, 9, 96), 4),         # S = 63 rows: fewer rows than SMs, a row a CTA; Cg 24
    ((1, 16, 16, 2560), 32),    # 320 packs a row in 16-bit: one thread a column; 640 in float32: declined
    ((1, 128, 128, 512), 32),   # 16.8 MB in 16-bit; in float32 33.5 MB, past shared memory: a register tail
]


def set_path(path: int) -> None:
    kernels.call("fdm_group_norm_set_path", path)


def last_path() -> int:
    return kernels.library().fdm_group_norm_last_path()


@pytest.fixture(autouse=True)
def sm90():
    if cuda.Device(0).compute_capability != (9, 0) or not kernels.library().fdm_has_sm90():
        pytest.skip("needs a compute capability 9.0 GPU and a kernel library built for sm_90a")
    yield
    set_path(AUTO)


def run(x, w, b, groups, activation, path, channels_last=False):
    set_path(path)
    out = poisoned(oc().group_norm, gpu(x), None if w is None else gpu(w), None if b is None else gpu(b),
                   num_groups=groups, eps=1e-5, activation=activation, channels_last=channels_last)
    return out, last_path()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=group_ids(SHAPES))
@pytest.mark.parametrize("affine,activation", [(True, "silu"), (False, None), (True, None)],
                         ids=["affine_silu", "plain", "affine"])
def test_one_pass(rng, dtype, shape, groups, affine, activation):
    x = rand(rng, dtype, *shape, scale=3.0, shift=5.0)
    c = shape[1]
    w = rand(rng, dtype, c, shift=1.0) if affine else None
    b = rand(rng, dtype, c) if affine else None
    out, path = run(x, w, b, groups, activation, ONE_PASS)
    assert path == ONE_PASS
    ref = cpu.group_norm(x, w, b, num_groups=groups, eps=1e-5, activation=activation)
    err = rel_l2(out.numpy().astype(np.float32), ref)
    assert err < TOL[dtype], f"rel_l2 {err:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (1, 640, 32, 32), (1, 256, 128, 128), (2, 1280, 32, 32),
                                   (2, 512, 128, 128)], ids=lambda s: "x".join(map(str, s)))
def test_auto_takes_the_cluster_kernel_from_a_group_per_four_sms(rng, shape):
    """Unforced, the NCHW cluster kernel takes a call only where it has at least a cluster (a group) for every four
    SMs; the two-pass kernels take the rest."""
    x = rand(rng, "bfloat16", *shape, scale=2.0, shift=3.0)
    out, path = run(x, None, None, 32, "silu", AUTO)
    assert path == (ONE_PASS if 4 * shape[0] * 32 >= cuda.Device(0).multiprocessor_count else TWO_PASS)
    ref = cpu.group_norm(x, None, None, num_groups=32, eps=1e-5, activation="silu")
    assert rel_l2(out.numpy().astype(np.float32), ref) < TOL["bfloat16"]


def channels_last_case(rng, dtype, shape, affine):
    """x [N, *spatial, C] with a large mean, and the affine weight and bias (or None)."""
    x = rand(rng, dtype, *shape, scale=3.0, shift=5.0)
    c = shape[-1]
    w = rand(rng, dtype, c, shift=1.0) if affine else None
    b = rand(rng, dtype, c) if affine else None
    return x, w, b


def check_channels_last(x, w, b, groups, activation, path, dtype):
    """The forced channels-last path runs and matches ops.cpu."""
    out, ran = run(x, w, b, groups, activation, path, channels_last=True)
    assert ran == path
    ref = cpu.group_norm(x, w, b, num_groups=groups, eps=1e-5, activation=activation, channels_last=True)
    got = out.numpy().astype(np.float32)
    assert np.isfinite(got).all()
    err = rel_l2(got, ref)
    assert err < TOL[dtype], f"rel_l2 {err:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SHAPES_NHWC, ids=group_ids(SHAPES_NHWC))
@pytest.mark.parametrize("affine,activation", [(True, "silu"), (False, None)], ids=["affine_silu", "plain"])
def test_one_pass_channels_last(rng, dtype, shape, groups, affine, activation):
    x, w, b = channels_last_case(rng, dtype, shape, affine)
    check_channels_last(x, w, b, groups, activation, ONE_PASS, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SHAPES_RESIDENT, ids=group_ids(SHAPES_RESIDENT))
@pytest.mark.parametrize("affine,activation", [(True, "silu"), (False, None)], ids=["affine_silu", "plain"])
def test_resident_channels_last(rng, dtype, shape, groups, affine, activation):
    x, w, b = channels_last_case(rng, dtype, shape, affine)
    if shape[-1] * x.itemsize // 16 > 512:  # more than 512 packs a row (C = 2560 in float32): one CTA cannot walk it
        with pytest.raises(CudaError, match="whole-tensor-on-chip path was forced"):
            run(x, w, b, groups, activation, RESIDENT, channels_last=True)
        return
    check_channels_last(x, w, b, groups, activation, RESIDENT, dtype)


def test_resident_register_tail_bf16(rng):
    """SDXL's [2, 128, 128, 512] (33.5 MB): more than the SMs' shared memory, so every CTA holds rows in registers."""
    x = rand(rng, "bfloat16", 2, 128, 128, 512, scale=2.0, shift=3.0)
    w, b = rand(rng, "bfloat16", 512, shift=1.0), rand(rng, "bfloat16", 512)
    out, path = run(x, w, b, 32, "silu", RESIDENT, channels_last=True)
    assert path == RESIDENT
    ref = cpu.group_norm(x, w, b, num_groups=32, eps=1e-5, activation="silu", channels_last=True)
    assert rel_l2(out.numpy().astype(np.float32), ref) < TOL["bfloat16"]


def test_resident_agrees_repeats_and_replays_in_a_graph(rng):
    """The whole-tensor kernel gives the three-kernel path's normalization (to rounding), the same bits on every
    call, and the same bits replayed from a CUDA graph (its launch is cooperative)."""
    from fastdm.runtime import graphs

    x = rand(rng, "float32", 2, 32, 32, 640, scale=2.0, shift=-3.0)
    w, b = rand(rng, "float32", 640, shift=1.0), rand(rng, "float32", 640)
    one, path = run(x, w, b, 32, "silu", RESIDENT, channels_last=True)
    assert path == RESIDENT
    again, _ = run(x, w, b, 32, "silu", RESIDENT, channels_last=True)
    three, path = run(x, w, b, 32, "silu", TWO_PASS, channels_last=True)
    assert path == TWO_PASS
    assert np.array_equal(one.numpy(), again.numpy())
    assert rel_l2(one.numpy(), three.numpy()) < 1e-6
    set_path(RESIDENT)
    gw, gb = gpu(w), gpu(b)
    call = graphs.CapturedCall(lambda t: oc().group_norm(t, gw, gb, num_groups=32, eps=1e-5, activation="silu",
                                                         channels_last=True), "group_norm")
    for _ in range(3):  # eager, capture + replay, replay
        assert np.array_equal(call(gpu(x)).numpy(), one.numpy())
    assert last_path() == RESIDENT


def test_channels_last_paths_agree(rng):
    x = rand(rng, "float32", 2, 32, 32, 640, scale=2.0, shift=-3.0)
    w, b = rand(rng, "float32", 640, shift=1.0), rand(rng, "float32", 640)
    one, _ = run(x, w, b, 32, "silu", ONE_PASS, channels_last=True)
    three, path = run(x, w, b, 32, "silu", TWO_PASS, channels_last=True)
    assert path == TWO_PASS
    assert rel_l2(one.numpy(), three.numpy()) < 1e-6


def test_paths_agree_and_repeat(rng):
    """One-pass and two-pass give the same normalization (to rounding); the one-pass kernel is deterministic."""
    x = rand(rng, "float32", 2, 320, 64, 64, scale=2.0, shift=-3.0)
    w, b = rand(rng, "float32", 320, shift=1.0), rand(rng, "float32", 320)
    one, _ = run(x, w, b, 32, "silu", ONE_PASS)
    again, _ = run(x, w, b, 32, "silu", ONE_PASS)
    two, path = run(x, w, b, 32, "silu", TWO_PASS)
    assert path == TWO_PASS
    assert np.array_equal(one.numpy(), again.numpy())
    assert rel_l2(one.numpy(), two.numpy()) < 1e-6


def test_auto_takes_one_pass_where_it_fits(rng):
    x = rand(rng, "bfloat16", 2, 320, 32, 32)
    _, path = run(x, None, None, 32, "silu", AUTO)
    assert path == ONE_PASS
    # HW = 65 is not a whole number of 16-byte packs, a 2 MB group does not fit a cluster: both go two-pass.
    for shape, groups in (((1, 64, 5, 13), 4), ((1, 64, 128, 128), 1)):
        x = rand(rng, "bfloat16", *shape, shift=2.0)
        out, path = run(x, None, None, groups, None, AUTO)
        assert path == TWO_PASS
        ref = cpu.group_norm(x, None, None, num_groups=groups, eps=1e-5)
        assert rel_l2(out.numpy().astype(np.float32), ref) < TOL["bfloat16"]


def test_channels_last_auto_choice(rng):
    """The whole-tensor kernel takes what fits the chips (groups of at least one 16-byte pack of channels) from 6 MiB
    up (7.9 MB here); under that the cluster kernel goes first where it can (80-byte group rows, 5.2 MB) and the
    whole-tensor kernel takes what it declines (40-byte rows); the cluster kernel takes C = 68 (not a whole number of
    packs, but 68-byte group rows); groups of 3 channels and a 42 MB tensor with 40-byte group rows go to the
    three-kernel path; all correctly."""
    for shape, groups, want in (((2, 32, 32, 1920), 32, RESIDENT), ((2, 32, 32, 1280), 32, ONE_PASS),
                                ((2, 32, 32, 640), 32, RESIDENT), ((1, 8, 9, 68), 2, ONE_PASS),
                                ((1, 8, 8, 12), 4, TWO_PASS), ((2, 128, 128, 640), 32, TWO_PASS)):
        x = rand(rng, "bfloat16", *shape, shift=2.0)
        out, path = run(x, None, None, groups, None, AUTO, channels_last=True)
        assert path == want, shape
        ref = cpu.group_norm(x, None, None, num_groups=groups, eps=1e-5, channels_last=True)
        assert rel_l2(out.numpy().astype(np.float32), ref) < TOL["bfloat16"], shape


def test_channels_last_cluster_kernel_declines(rng):
    """The cluster kernel's own limits, forced: 40-byte group rows (under 64), S = 25 rows of 68 bytes (no split into
    whole 16-byte packs), a 4 MB group, and 64 groups of 480 KB (more clusters than fit the GPU at once)."""
    for shape, groups in (((2, 32, 32, 640), 32), ((1, 5, 5, 1088), 32), ((1, 256, 256, 64), 2),
                          ((2, 64, 64, 1920), 32)):
        x = gpu(rand(rng, "bfloat16", *shape, shift=2.0))
        set_path(ONE_PASS)
        with pytest.raises(CudaError, match="one-pass path was forced"):
            oc().group_norm(x, num_groups=groups, channels_last=True)


def test_forced_one_pass_says_why_it_cannot(rng):
    x = gpu(rand(rng, "bfloat16", 1, 64, 128, 128))  # one 2 MB group: more than 16 CTAs of shared memory
    set_path(ONE_PASS)
    with pytest.raises(CudaError, match="one-pass path was forced"):
        oc().group_norm(x, num_groups=1)
    x = gpu(rand(rng, "bfloat16", 1, 8, 8, 12))  # 6-byte rows: no 4-byte unit
    with pytest.raises(CudaError, match="one-pass path was forced"):
        oc().group_norm(x, num_groups=4, channels_last=True)


def test_forced_resident_says_why_it_cannot(rng):
    set_path(RESIDENT)
    x = gpu(rand(rng, "bfloat16", 2, 128, 128, 640))  # 42 MB: more than the chips hold
    with pytest.raises(CudaError, match="whole-tensor-on-chip path was forced"):
        oc().group_norm(x, num_groups=32, channels_last=True)
    x = gpu(rand(rng, "bfloat16", 1, 8, 8, 12))  # groups of 3 channels: under one 16-byte pack
    with pytest.raises(CudaError, match="whole-tensor-on-chip path was forced"):
        oc().group_norm(x, num_groups=4, channels_last=True)
    x = gpu(rand(rng, "bfloat16", 1, 64, 8, 8))  # NCHW
    with pytest.raises(CudaError, match="channels-last input only"):
        oc().group_norm(x, num_groups=32)
