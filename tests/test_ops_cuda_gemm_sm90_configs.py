"""Every sm90 GEMM configuration (kSm90Configs in kernels/gemm.cuh, forced through fdm_gemm_sm90_set_config)
against ops.cpu, the float32 reference, on a Hopper GPU with a library built for sm_90a.

Shapes are picked to reach each scheduler path: partial tiles in M, N and K; a problem much smaller than one wave
whose K is split over more stream-K units than tiles, unevenly (K = 8192 on 9-15 tiles); one of about two waves
(data-parallel tiles plus a stream-K tail); tiny M. Each configuration must run on the sm90 path (checked with
fdm_gemm_sm90_last_config) and match the reference; stream-K runs must also be bit-identical when repeated
(deterministic reduction) and work on a second stream (its own workspace). Outputs are NaN-poisoned first.
"""

import ctypes

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import CudaError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import TOL, randn, rel_l2

from fastdm import kernels

pytestmark = pytest.mark.gpu

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPES = list(NP_DTYPES)
SM90 = 1  # fdm_gemm_set_path code
EPILOGUES = [(None, False), (None, True), ("gelu_tanh", True), ("gelu", True), ("silu", True)]
EPILOGUE_IDS = ["plain", "bias", "bias_gelu_tanh", "bias_gelu", "bias_silu"]
# (M, K, N)
SHAPES = [
    (1, 64, 32),        # one row, one K tile
    (300, 520, 392),    # partial tiles in M, N and K (520 = 8 * 64 + 8)
    (300, 8192, 520),   # 9-15 tiles, 128 K tiles each: stream-K units outnumber tiles and split K unevenly
    (2176, 1000, 2048), # about two waves of 128x128 tiles: data-parallel tiles plus a stream-K tail; K % 64 != 0
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
# (B, S, K, N) for the gated residual (one fused launch per batch). The last one has more cluster tiles than an
# H100 holds clusters at once for every hand-written tiling (81-117 of 128x256 / 192x192 / 128x160 pairs against 66
# resident), so their persistent loop and the residual ring wrap across tiles; partial tiles in M, N and K.
GATED_SHAPES = [(2, 129, 136, 264), (1, 300, 8192, 520), (1, 2700, 200, 2056)]


@pytest.fixture(scope="module")
def lib():
    major_minor = cuda.Device(0).compute_capability
    library = kernels.library()
    if tuple(major_minor) != (9, 0) or not library.fdm_has_sm90():
        pytest.skip("the sm90 GEMM configurations need compute capability 9.0 and a library built for sm_90a")
    return library


@pytest.fixture
def forced_sm90(lib):
    """Force the sm90 path for one test; restore the automatic path and configuration choice afterwards."""
    kernels.call("fdm_gemm_set_path", SM90)
    yield lib
    kernels.call("fdm_gemm_sm90_set_config", -1)
    kernels.call("fdm_gemm_set_path", 0)


def ops_cuda():
    from fastdm.runtime.ops import cuda as mod  # loads the kernel library: only where a GPU test runs

    return mod


def ctypes_buffer():
    return ctypes.create_string_buffer(128)


def takes_gate(name: str) -> bool:
    return "lean" not in name


def gpu(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a), device="cuda")


def rand(rng, dtype: str, *shape, scale: float = 1.0) -> np.ndarray:
    return randn(rng, *shape, scale=scale).astype(NP_DTYPES[dtype])


def poisoned(shape, dtype: str) -> Tensor:
    return gpu(np.full(shape, np.nan, dtype=NP_DTYPES[dtype]))


def error_of(out: Tensor, ref: np.ndarray) -> float:
    return rel_l2(out.numpy().astype(np.float32), ref)


def run_config(lib, index: int, fn) -> Tensor:
    """fn() with configuration `index` forced; checks that it ran on the sm90 path with that configuration."""
    kernels.call("fdm_gemm_sm90_set_config", index)
    out = fn()
    assert lib.fdm_gemm_last_path() == SM90
    assert lib.fdm_gemm_sm90_last_config() == index
    return out


def check_every_config(lib, fn, ref: np.ndarray, dtype: str, gated: bool = False) -> None:
    """fn() under every configuration (every one that takes a gate, when gated) against ref; one report."""
    failures = []
    for index, name in enumerate(kernels.sm90_config_names()):
        if gated and not takes_gate(name):
            continue
        err = error_of(run_config(lib, index, fn), ref)
        if not err < TOL[dtype]:
            failures.append(f"config {index} ({name}): rel L2 {err:.3g} >= {TOL[dtype]}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_linear_every_config(rng, forced_sm90, dtype, epilogue, shape):
    act, with_bias = epilogue
    m, k, n = shape
    x = rand(rng, dtype, m, k)
    w = rand(rng, dtype, n, k, scale=k ** -0.5)
    b = rand(rng, dtype, n, scale=0.5) if with_bias else None
    xg, wg, bg = gpu(x), gpu(w), None if b is None else gpu(b)
    ref = cpu.linear(x, w, b, activation=act)

    def fn():
        return ops_cuda().linear(xg, wg, bg, activation=act, out=poisoned((m, n), dtype))

    check_every_config(forced_sm90, fn, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_every_config(rng, forced_sm90, dtype, shape):
    bsz, s, k, n = shape
    x = rand(rng, dtype, bsz, s, k)
    w = rand(rng, dtype, n, k, scale=k ** -0.5)
    b = rand(rng, dtype, n, scale=0.5)
    gate = rand(rng, dtype, bsz, n)
    residual = rand(rng, dtype, bsz, s, n)
    args = [gpu(a) for a in (x, w, b, gate, residual)]
    ref = cpu.linear_gated_residual(x, w, b, gate, residual)

    def fn():
        return ops_cuda().linear_gated_residual(*args, out=poisoned((bsz, s, n), dtype))

    check_every_config(forced_sm90, fn, ref, dtype, gated=True)


def test_lean_config_refuses_gated_problems(rng, forced_sm90):
    """The C-free (lean) kernel cannot add a residual: forced, it must fail loudly, not drop the residual."""
    lean = [i for i, name in enumerate(kernels.sm90_config_names()) if not takes_gate(name)]
    assert lean, "expected at least one lean configuration"
    x, w, b = rand(rng, "bfloat16", 1, 17, 64), rand(rng, "bfloat16", 48, 64, scale=0.125), None
    gate, residual = rand(rng, "bfloat16", 1, 48), rand(rng, "bfloat16", 1, 17, 48)
    for index in lean:
        kernels.call("fdm_gemm_sm90_set_config", index)
        with pytest.raises(CudaError):
            ops_cuda().linear_gated_residual(gpu(x), gpu(w), b, gpu(gate), gpu(residual))


# ------------------------------------------------------------------------------------------- stream-K specifics
def stream_k_configs(lib) -> list[int]:
    return [i for i, name in enumerate(kernels.sm90_config_names()) if "stream-k" in name]


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_k_is_deterministic_and_per_stream(rng, forced_sm90, dtype):
    """Stream-K sums partial tiles in a fixed order: repeated runs are bit-identical, also on a second stream
    (which gets its own workspace), and a larger problem after a smaller one (a grown workspace) is right."""
    m, k, n = 300, 8192, 520
    x, w = rand(rng, dtype, m, k), rand(rng, dtype, n, k, scale=k ** -0.5)
    b = rand(rng, dtype, n, scale=0.5)
    xg, wg, bg = gpu(x), gpu(w), gpu(b)
    ref = cpu.linear(x, w, b, activation="silu")
    big_m = 2176
    xb = rand(rng, dtype, big_m, k)
    xbg = gpu(xb)
    ref_big = cpu.linear(xb, w, b)
    configs = stream_k_configs(forced_sm90)
    assert configs, "expected stream-K configurations"
    side = cuda.Stream()
    for index in configs:
        def fn():
            return ops_cuda().linear(xg, wg, bg, activation="silu", out=poisoned((m, n), dtype))

        first = run_config(forced_sm90, index, fn).numpy()
        again = run_config(forced_sm90, index, fn).numpy()
        assert rel_l2(first.astype(np.float32), ref) < TOL[dtype], f"config {index}"
        assert np.array_equal(first.view(np.uint16), again.view(np.uint16)), f"config {index}: not deterministic"
        with cuda.use_stream(side):
            other = run_config(forced_sm90, index, fn).numpy()
        assert np.array_equal(first.view(np.uint16), other.view(np.uint16)), f"config {index}: second stream"
        big = run_config(forced_sm90, index,
                         lambda: ops_cuda().linear(xbg, wg, bg, out=poisoned((big_m, n), dtype)))
        assert error_of(big, ref_big) < TOL[dtype], f"config {index}: after workspace growth"


# ------------------------------------------------------------------------------------------ automatic choice
TENSOR_CORE_SHAPES = [s for s in SHAPES if s[0] > 4]  # x of at most 4 rows takes the GEMV kernel


@pytest.mark.parametrize("shape", TENSOR_CORE_SHAPES, ids=["x".join(map(str, s)) for s in TENSOR_CORE_SHAPES])
def test_automatic_choice(rng, lib, shape):
    """With no forced configuration every shape runs on sm90 with some configuration and is right (x of at most four
    rows takes the GEMV kernel instead: tests/test_ops_cuda_gemm.py)."""
    kernels.call("fdm_gemm_sm90_set_config", -1)
    m, k, n = shape
    x, w = rand(rng, "bfloat16", m, k), rand(rng, "bfloat16", n, k, scale=k ** -0.5)
    b = rand(rng, "bfloat16", n, scale=0.5)
    out = ops_cuda().linear(gpu(x), gpu(w), gpu(b), activation="gelu_tanh", out=poisoned((m, n), "bfloat16"))
    assert lib.fdm_gemm_last_path() == SM90
    assert 0 <= lib.fdm_gemm_sm90_last_config() < lib.fdm_gemm_sm90_config_count()
    assert error_of(out, cpu.linear(x, w, b, activation="gelu_tanh")) < TOL["bfloat16"]


def test_config_hook_arguments(lib):
    count = lib.fdm_gemm_sm90_config_count()
    names = kernels.sm90_config_names()
    assert len(set(names)) == count and all(names)
    with pytest.raises(CudaError):
        kernels.call("fdm_gemm_sm90_set_config", count)
    with pytest.raises(CudaError):
        kernels.call("fdm_gemm_sm90_set_config", -2)
    with pytest.raises(CudaError):
        kernels.call("fdm_gemm_sm90_config_name", count, ctypes_buffer(), 128)
    kernels.call("fdm_gemm_sm90_set_config", -1)


# ------------------------------------------------------------------------------------------ the winners table
def test_winners_pick_per_epilogue(rng, forced_sm90):
    """kSm90Winners in kernels/gemm.cu picks by epilogue at FLUX's attention-out shape (4608 x 3072 -> 3072): the
    plain winner for a bias-only linear and for linear + gelu_tanh, the row's gated winner (a configuration that
    takes a gate) for a gated residual; each is what fdm_gemm_sm90_auto_config names for this card, and each result
    equals what the same configuration gives when forced."""
    m, k, n = 4608, 3072, 3072
    x, w = gpu(rand(rng, "bfloat16", m, k)), gpu(rand(rng, "bfloat16", n, k, scale=k ** -0.5))
    b = gpu(rand(rng, "bfloat16", n, scale=0.5))
    gate, residual = gpu(rand(rng, "bfloat16", 1, n)), gpu(rand(rng, "bfloat16", 1, m, n))
    names = kernels.sm90_config_names()
    auto = forced_sm90.fdm_gemm_sm90_auto_config
    dev = cuda.Device(0)
    card = (dev.multiprocessor_count, dev.l2_cache_size >> 20)
    cases = {
        "bias": lambda: ops_cuda().linear(x, w, b),
        "gelu_tanh": lambda: ops_cuda().linear(x, w, b, activation="gelu_tanh"),
        "gated": lambda: ops_cuda().linear_gated_residual(x.reshape(1, m, k), w, b, gate, residual),
    }
    picked = {}
    for kind, fn in cases.items():
        kernels.call("fdm_gemm_sm90_set_config", -1)
        auto_out = fn().numpy().view(np.uint16)
        picked[kind] = forced_sm90.fdm_gemm_sm90_last_config()
        assert picked[kind] == auto(m, n, k, int(kind == "gated"), *card), kind
        forced = run_config(forced_sm90, picked[kind], fn).numpy().view(np.uint16)
        assert np.array_equal(auto_out, forced), kind
    assert picked["bias"] == picked["gelu_tanh"], picked
    assert takes_gate(names[picked["gated"]]), picked


def test_winners_per_card(rng, forced_sm90):
    """Rows of kSm90Winners tagged with a card's L2 size win on that card; untagged rows serve every card. FLUX's
    mlp-up shape (4608 x 3072 -> 12288) has an H100 row (50 MiB of L2) besides the H200-swept one, so the choice
    differs between the two cards, and both gated choices take a gate; a shape with one untagged row (the
    double-stream text attention out) and one with no row (the rule) choose alike on both. On this GPU the
    configuration a real linear runs is the one fdm_gemm_sm90_auto_config names for this card's SM count and L2
    size."""
    auto = forced_sm90.fdm_gemm_sm90_auto_config
    names = kernels.sm90_config_names()
    h100, h200 = (auto(4608, 12288, 3072, 0, 132, 50), auto(4608, 12288, 3072, 0, 132, 60))
    assert h100 != h200
    for l2 in (50, 60):
        assert takes_gate(names[auto(4608, 12288, 3072, 1, 132, l2)])
    for m, n, k in [(512, 3072, 3072), (1000, 2000, 3000)]:
        assert auto(m, n, k, 0, 132, 50) == auto(m, n, k, 0, 132, 60)
    m, k, n = 4608, 3072, 3072
    x, w = gpu(rand(rng, "bfloat16", m, k)), gpu(rand(rng, "bfloat16", n, k, scale=k ** -0.5))
    kernels.call("fdm_gemm_sm90_set_config", -1)
    ops_cuda().linear(x, w, None)
    dev = cuda.Device(0)
    want = auto(m, n, k, 0, dev.multiprocessor_count, dev.l2_cache_size >> 20)
    assert forced_sm90.fdm_gemm_sm90_last_config() == want
