"""ops.cuda linear / linear_gated_residual / matmul / conv2d (kernels/gemm*.cu, sm90/gemm_sm90.cu, im2col.cu)
against ops.cpu, the float32 reference.

Every kernel family is exercised on the test GPU: the automatic choice (sm90 CUTLASS kernels on Hopper, sm80
elsewhere, the SIMT kernel for fp32 and odd shapes; the test checks which one ran) and each family forced through
the fdm_gemm_set_path hook; x of at most 4 rows goes to the GEMV kernel. Shapes include odd M/N/K (1, 17, 129), K
and N that are not multiples of 8, a
misaligned (contiguous) input, non-contiguous views and one FLUX-sized GEMM. Outputs are NaN-poisoned before the
kernel runs so unwritten elements fail; inputs are fresh random normals.
"""


import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import CudaError, InvalidArgumentError, ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import TOL, randn, rel_l2

from fastdm import kernels

pytestmark = pytest.mark.gpu

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
DTYPES = list(NP_DTYPES)
HALF_DTYPES = ["bfloat16", "float16"]
AUTO, SM90, SM80, SIMT, GEMV = 0, 1, 2, 3, 4
# (activation, with bias): the linear epilogues
EPILOGUES = [(None, False), (None, True), ("gelu_tanh", True), ("gelu", True), ("silu", True)]
EPILOGUE_IDS = ["plain", "bias", "bias_gelu_tanh", "bias_gelu", "bias_silu"]
# (M, K, N): aligned (K, N multiples of 8) and odd ones
ALIGNED_SHAPES = [(1, 64, 32), (17, 64, 40), (129, 136, 264), (300, 520, 392)]
ODD_SHAPES = [(17, 27, 48), (33, 13, 24), (65, 64, 30), (1, 9, 7)]


@pytest.fixture
def path():
    """Set the GEMM path for one test and restore automatic choice afterwards."""
    def force(p: int) -> None:
        kernels.call("fdm_gemm_set_path", p)

    yield force
    kernels.call("fdm_gemm_set_path", AUTO)


def ops_cuda():
    from fastdm.runtime.ops import cuda as mod  # loads the kernel library: only where a GPU test runs

    return mod


def last_path() -> int:
    return kernels.library().fdm_gemm_last_path()


def tensor_core_path() -> int:
    """The path the automatic choice must take for aligned 16-bit problems on this GPU."""
    major = cuda.Device(0).compute_capability[0]
    if major == 9 and kernels.library().fdm_has_sm90():
        return SM90
    return SM80 if major >= 8 else SIMT


def auto_path(dtype: str, m: int, k: int, n: int) -> int:
    """The path the automatic choice must take for a contiguous, 16-byte aligned linear [m, k] x [n, k]^T."""
    if dtype == "float32":
        return SIMT
    if m <= 4 and k % 8 == 0:
        return GEMV
    return tensor_core_path() if k % 8 == 0 and n % 8 == 0 else SIMT


def gpu(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a), device="cuda")


def rand(rng, dtype: str, *shape, scale: float = 1.0) -> np.ndarray:
    return randn(rng, *shape, scale=scale).astype(NP_DTYPES[dtype])


def poisoned(shape, dtype: str) -> Tensor:
    return gpu(np.full(shape, np.nan, dtype=NP_DTYPES[dtype]))


def check(out: Tensor, ref: np.ndarray, dtype: str) -> None:
    assert out.dtype.name == dtype
    got = out.numpy().astype(np.float32)
    err = rel_l2(got, ref)
    assert err < TOL[dtype], f"rel L2 {err:.3g} >= {TOL[dtype]} ({dtype})"


def linear_inputs(rng, dtype, m, k, n, bias=True):
    x = rand(rng, dtype, m, k)
    w = rand(rng, dtype, n, k, scale=k ** -0.5)  # keeps outputs ~N(0, 1) so the activations matter
    b = rand(rng, dtype, n, scale=0.5) if bias else None
    return x, w, b


def run_linear(rng, dtype, shape, epilogue) -> tuple[Tensor, np.ndarray]:
    """ops.cuda.linear on fresh inputs of `shape` (M, K, N) into a poisoned output, and ops.cpu's reference."""
    act, with_bias = epilogue
    m, k, n = shape
    x, w, b = linear_inputs(rng, dtype, m, k, n, with_bias)
    out = ops_cuda().linear(gpu(x), gpu(w), None if b is None else gpu(b), activation=act,
                            out=poisoned((m, n), dtype))
    return out, cpu.linear(x, w, b, activation=act)


# ----------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", ALIGNED_SHAPES + ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_auto_path(rng, dtype, epilogue, shape):
    out, ref = run_linear(rng, dtype, shape, epilogue)
    check(out, ref, dtype)
    assert last_path() == auto_path(dtype, *shape)


@pytest.mark.parametrize("forced", [SM90, SM80, SIMT], ids=["sm90", "sm80", "simt"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", ALIGNED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_forced_path(rng, path, forced, dtype, epilogue, shape):
    if forced == SM90 and tensor_core_path() != SM90:
        pytest.skip("the sm90 kernels need a Hopper GPU and a library built for sm_90a")
    if forced == SM80 and tensor_core_path() == SIMT:
        pytest.skip("the sm80 kernels need compute capability 8.0 or newer")
    path(forced)
    out, ref = run_linear(rng, dtype, shape, epilogue)
    assert last_path() == forced
    check(out, ref, dtype)


def test_linear_activation_without_bias(rng):
    x, w, _ = linear_inputs(rng, "bfloat16", 70, 128, 96, bias=False)
    out = ops_cuda().linear(gpu(x), gpu(w), None, activation="silu", out=poisoned((70, 96), "bfloat16"))
    check(out, cpu.linear(x, w, None, activation="silu"), "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_batched_input_and_default_output(rng, dtype):
    x = rand(rng, dtype, 2, 37, 96)
    w = rand(rng, dtype, 80, 96, scale=96 ** -0.5)
    b = rand(rng, dtype, 80)
    out = ops_cuda().linear(gpu(x), gpu(w), gpu(b), activation="gelu")
    assert out.shape == (2, 37, 80)
    check(out, cpu.linear(x, w, b, activation="gelu"), dtype)


def test_linear_misaligned_and_strided_inputs(rng):
    """A contiguous x that starts 2 bytes past a 16-byte boundary, and a non-contiguous (transposed) weight."""
    dtype, m, k, n = "bfloat16", 33, 64, 48
    x, w, b = linear_inputs(rng, dtype, m, k, n)
    flat = np.concatenate([np.zeros(1, NP_DTYPES[dtype]), x.ravel()])
    x_gpu = gpu(flat).narrow(0, 1, m * k).view(m, k)
    assert x_gpu.data_ptr % 16 != 0
    w_t = gpu(np.ascontiguousarray(w.T)).transpose(0, 1)  # [N, K] view of a [K, N] buffer
    assert not w_t.is_contiguous()
    out = ops_cuda().linear(x_gpu, w_t, gpu(b), out=poisoned((m, n), dtype))
    check(out, cpu.linear(x, w, b), dtype)


def test_linear_flux_shape(rng, path):
    """M=4608 (4096 image + 512 text tokens), K=3072, N=9216 (FLUX MLP up-projection), bf16, bias + gelu_tanh,
    on the automatic path and on the sm80 path."""
    dtype, m, k, n = "bfloat16", 4608, 3072, 9216
    x, w, b = linear_inputs(rng, dtype, m, k, n)
    ref = cpu.linear(x, w, b, activation="gelu_tanh")
    xg, wg, bg = gpu(x), gpu(w), gpu(b)
    out = ops_cuda().linear(xg, wg, bg, activation="gelu_tanh", out=poisoned((m, n), dtype))
    assert last_path() == tensor_core_path()
    check(out, ref, dtype)
    if tensor_core_path() == SM90:
        path(SM80)
        out = ops_cuda().linear(xg, wg, bg, activation="gelu_tanh", out=poisoned((m, n), dtype))
        assert last_path() == SM80
        check(out, ref, dtype)


# ------------------------------------------------------------------------------------------------- gemv
# (M, K, N): one to four rows of x; K a multiple of 8 (one 16-byte pack) with and without a partial last sweep of
# the warp (K / 8 not a multiple of 32 x 4), N odd and below one block's 8 columns
GEMV_SHAPES = [(1, 8, 1), (2, 64, 7), (3, 520, 300), (4, 1032, 96), (1, 3072, 18432)]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_gemv(rng, dtype, epilogue, shape):
    out, ref = run_linear(rng, dtype, shape, epilogue)
    assert last_path() == GEMV
    check(out, ref, dtype)


def test_linear_gemv_is_deterministic_and_declines_what_it_cannot_take(rng, path):
    """Repeated runs are bit-identical; fp32, five rows, K % 8 != 0 or a misaligned x go to the other paths, and
    forcing the GEMV on such a problem is an error rather than a silent fallback."""
    x, w, b = linear_inputs(rng, "bfloat16", 3, 1024, 200)
    xg, wg, bg = gpu(x), gpu(w), gpu(b)
    first = ops_cuda().linear(xg, wg, bg).numpy().view(np.uint16)
    assert np.array_equal(first, ops_cuda().linear(xg, wg, bg).numpy().view(np.uint16))
    for dtype, m, k in [("float32", 2, 64), ("bfloat16", 5, 64), ("bfloat16", 2, 60)]:
        x, w, b = linear_inputs(rng, dtype, m, k, 40)
        out = ops_cuda().linear(gpu(x), gpu(w), gpu(b))
        assert last_path() == auto_path(dtype, m, k, 40) != GEMV
        check(out, cpu.linear(x, w, b), dtype)
        path(GEMV)
        with pytest.raises(CudaError, match="gemv"):
            ops_cuda().linear(gpu(x), gpu(w), gpu(b))
        path(AUTO)
    x, w, b = linear_inputs(rng, "bfloat16", 2, 64, 40)
    flat = gpu(np.concatenate([np.zeros(1, NP_DTYPES["bfloat16"]), x.ravel()]))
    x_odd = flat.narrow(0, 1, x.size).view(2, 64)  # 2 bytes past a 16-byte boundary
    out = ops_cuda().linear(x_odd, gpu(w), gpu(b))
    assert last_path() != GEMV
    check(out, cpu.linear(x, w, b), "bfloat16")


# ---------------------------------------------------------------------------------------- gated residual
# (B, S, K, N): B > 8 takes the unfused route on sm90; K = 27 and N = 30 the SIMT kernel.
GATED_SHAPES = [(1, 17, 64, 48), (2, 129, 136, 264), (3, 1, 64, 32), (12, 5, 64, 32), (2, 33, 27, 40),
                (2, 9, 64, 30)]


def gated_inputs(rng, dtype, bsz, s, k, n, bias=True):
    x = rand(rng, dtype, bsz, s, k)
    w = rand(rng, dtype, n, k, scale=k ** -0.5)
    b = rand(rng, dtype, n, scale=0.5) if bias else None
    gate = rand(rng, dtype, bsz, n)
    residual = rand(rng, dtype, bsz, s, n)
    return x, w, b, gate, residual


def run_gated(x, w, b, gate, residual, dtype):
    bsz, s, _ = x.shape
    n = w.shape[0]
    return ops_cuda().linear_gated_residual(gpu(x), gpu(w), None if b is None else gpu(b), gpu(gate), gpu(residual),
                                            out=poisoned((bsz, s, n), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_gated_residual(rng, dtype, with_bias, shape):
    args = gated_inputs(rng, dtype, *shape, bias=with_bias)
    out = run_gated(*args, dtype)
    check(out, cpu.linear_gated_residual(*args), dtype)
    aligned = shape[2] % 8 == 0 and shape[3] % 8 == 0
    assert last_path() == (tensor_core_path() if dtype != "float32" and aligned else SIMT)


@pytest.mark.parametrize("forced", [SM90, SM80, SIMT], ids=["sm90", "sm80", "simt"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(1, 17, 64, 48), (2, 129, 136, 264), (12, 5, 64, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_gated_residual_forced_path(rng, path, forced, dtype, shape):
    if forced == SM90 and tensor_core_path() != SM90:
        pytest.skip("the sm90 kernels need a Hopper GPU and a library built for sm_90a")
    if forced == SM80 and tensor_core_path() == SIMT:
        pytest.skip("the sm80 kernels need compute capability 8.0 or newer")
    args = gated_inputs(rng, dtype, *shape)
    path(forced)
    out = run_gated(*args, dtype)
    assert last_path() == forced
    check(out, cpu.linear_gated_residual(*args), dtype)


def test_linear_gated_residual_out_must_not_alias(rng):
    x, w, b, gate, residual = gated_inputs(rng, "bfloat16", 1, 8, 64, 32)
    r = gpu(residual)
    with pytest.raises(ShapeError, match="overlaps"):
        ops_cuda().linear_gated_residual(gpu(x), gpu(w), gpu(b), gpu(gate), r, out=r)


# ----------------------------------------------------------------------------------------------- matmul
# (a shape, b shape)
MATMUL_SHAPES = [
    ((3, 17, 64), (3, 64, 40)),        # batched, aligned
    ((2, 3, 33, 72), (2, 3, 72, 24)),  # two batch dims
    ((4, 129, 64), (64, 136)),         # one b shared by every batch
    ((65, 32), (32, 48)),              # plain 2-D
    ((3, 17, 27), (3, 27, 13)),        # odd K and N
    ((2, 1, 9), (9, 5)),               # M = 1, shared odd b
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"{s[0]}@{s[1]}".replace(" ", ""))
def test_matmul(rng, dtype, shapes):
    a = rand(rng, dtype, *shapes[0])
    b = rand(rng, dtype, *shapes[1], scale=shapes[1][-2] ** -0.5)
    out_shape = shapes[0][:-1] + (shapes[1][-1],)
    out = ops_cuda().matmul(gpu(a), gpu(b), out=poisoned(out_shape, dtype))
    check(out, cpu.matmul(a, b), dtype)
    aligned = shapes[0][-1] % 8 == 0 and shapes[1][-1] % 8 == 0
    tensor_cores = dtype != "float32" and aligned and tensor_core_path() != SIMT
    assert last_path() == (SM80 if tensor_cores else SIMT)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_matmul_forced_simt(rng, path, dtype):
    a = rand(rng, dtype, 3, 40, 64)
    b = rand(rng, dtype, 3, 64, 56, scale=0.125)
    path(SIMT)
    out = ops_cuda().matmul(gpu(a), gpu(b), out=poisoned((3, 40, 56), dtype))
    assert last_path() == SIMT
    check(out, cpu.matmul(a, b), dtype)


# ----------------------------------------------------------------------------------------------- conv2d
# (N, C, H, W, O, k, stride, padding)
CONV_CASES = [
    (2, 16, 9, 11, 24, 1, 1, 0),   # 1x1
    (1, 8, 13, 10, 16, 1, 2, 0),   # 1x1 stride 2
    (2, 3, 17, 15, 16, 3, 1, 1),   # RGB in: K = 27 is padded to 32
    (2, 16, 12, 12, 32, 3, 1, 1),  # aligned 3x3
    (1, 16, 15, 13, 24, 3, 2, 1),  # 3x3 stride 2, odd size
    (2, 5, 10, 9, 3, 3, 2, 0),     # RGB out: O = 3 is padded to 8; no padding, stride 2
    (1, 12, 8, 8, 8, 3, 1, 0),     # 3x3 valid
]


def conv_inputs(rng, dtype, n, c, h, w, o, k, with_bias=True):
    x = rand(rng, dtype, n, c, h, w)
    wt = rand(rng, dtype, o, c, k, k, scale=(c * k * k) ** -0.5)
    b = rand(rng, dtype, o, scale=0.5) if with_bias else None
    return x, wt, b


def conv_out_shape(n, h, w, o, k, stride, padding):
    return (n, o, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}".format(*c))
def test_conv2d(rng, dtype, case):
    n, c, h, w, o, k, stride, padding = case
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, k)
    out = ops_cuda().conv2d(gpu(x), gpu(wt), gpu(b), stride=stride, padding=padding,
                            out=poisoned(conv_out_shape(n, h, w, o, k, stride, padding), dtype))
    check(out, cpu.conv2d(x, wt, b, stride=stride, padding=padding), dtype)


def test_conv2d_without_bias_default_output(rng):
    x, wt, _ = conv_inputs(rng, "float16", 1, 8, 9, 9, 16, 3, with_bias=False)
    out = ops_cuda().conv2d(gpu(x), gpu(wt), None, stride=1, padding=1)
    assert out.shape == (1, 16, 9, 9)
    check(out, cpu.conv2d(x, wt, None, stride=1, padding=1), "float16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_conv2d_in_many_chunks(rng, monkeypatch, dtype):
    """A tiny workspace budget makes the kernel walk the output pixels in many chunks, some crossing images."""
    from fastdm.runtime.ops.cuda import gemm as gemm_mod

    monkeypatch.setattr(gemm_mod, "_CONV_WORKSPACE_BYTES", 100 * (40 + 16) * np.dtype(NP_DTYPES[dtype]).itemsize)
    n, c, h, w, o, k = 3, 4, 11, 7, 13, 3
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, k)
    out = ops_cuda().conv2d(gpu(x), gpu(wt), gpu(b), stride=1, padding=1,
                            out=poisoned(conv_out_shape(n, h, w, o, k, 1, 1), dtype))
    check(out, cpu.conv2d(x, wt, b, stride=1, padding=1), dtype)


# ------------------------------------------------------------------------------------------ bad arguments
def test_errors(rng):
    mod = ops_cuda()
    x, w, b = linear_inputs(rng, "bfloat16", 4, 16, 8)
    xg, wg, bg = gpu(x), gpu(w), gpu(b)
    with pytest.raises(UnsupportedDtypeError):
        mod.linear(gpu(np.ones((4, 16), np.int32)), wg)
    with pytest.raises(UnsupportedDtypeError):
        mod.linear(xg, gpu(w.astype(np.float16)))
    with pytest.raises(ShapeError):
        mod.linear(xg, gpu(np.ascontiguousarray(w[:, :8])))
    with pytest.raises(ShapeError):
        mod.linear(xg, wg, gpu(np.ascontiguousarray(b[:4])))
    with pytest.raises(InvalidArgumentError):
        mod.linear(xg, wg, bg, activation="relu")
    with pytest.raises(ShapeError):
        mod.linear(xg, wg, out=poisoned((4, 9), "bfloat16"))
    with pytest.raises(ShapeError):
        mod.matmul(xg, gpu(np.ones((8, 4), ml_dtypes.bfloat16)))
    with pytest.raises(ShapeError):
        mod.conv2d(gpu(rand(rng, "bfloat16", 1, 3, 2, 2)), gpu(rand(rng, "bfloat16", 4, 3, 3, 3)))
    with pytest.raises(InvalidArgumentError):
        mod.conv2d(gpu(rand(rng, "bfloat16", 1, 3, 5, 5)), gpu(rand(rng, "bfloat16", 4, 3, 3, 3)), stride=0)


def test_forced_path_that_cannot_run_fails_loudly(rng, path):
    """A forced tensor-core path with K not a multiple of 8 must raise, not fall back silently."""
    x, w, b = linear_inputs(rng, "bfloat16", 8, 12, 16)
    path(SM80)
    with pytest.raises(CudaError):
        ops_cuda().linear(gpu(x), gpu(w), gpu(b))
