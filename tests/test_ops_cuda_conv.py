"""ops.cuda conv2d / conv2d_nhwc (runtime/ops/cuda/conv.py): the CUTLASS implicit GEMMs (kernels/conv_implicit.cu:
two sm80 tile configurations, and on an H100/H200 the sm90 TMA/wgmma kernel of kernels/sm90/conv_sm90.cu) and the
im2col fallback, against ops.cpu.conv2d (float32) on fresh random inputs.

Shapes are the convs of the SDXL UNet (3x3 at 320 channels, the stride-2 downsampler, a 1x1 shortcut) and of the
VAE (512 and 128 channels at its large resolutions), odd spatial sizes, channel counts that leave partial tiles
(C = 24, 40; O = 72), a 5x5 filter, channel counts that are zero-padded to 8 around the implicit GEMM (RGB in, RGB
out, 4-channel latents) and float32, which falls back to im2col. Each test checks which path ran through the
fdm_conv2d_nhwc_last_config hook (-1: the implicit GEMM did not run), and every configuration is also forced on its
own. Outputs are NaN-poisoned (given as `out`) so unwritten
elements fail.
"""

import gc

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime.errors import CudaError, InvalidArgumentError, ShapeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import TOL, randn, rel_l2

from fastdm import kernels

needs_gpu = pytest.mark.gpu  # every test but the emulated-kernel ones at the end
NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
HALF_DTYPES = ["bfloat16", "float16"]
BIG, MEDIUM, SM90 = 0, 1, 2  # configurations of conv_implicit.cu (kConvBig, kConvMedium, kConvSm90)
IMPLICIT = (BIG, MEDIUM, SM90)


@pytest.fixture(autouse=True)
def auto_config(request):
    """Every GPU test starts and ends with the automatic choice (set_config also forgets the last one)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    kernels.call("fdm_conv2d_nhwc_set_config", -1)
    yield
    kernels.call("fdm_conv2d_nhwc_set_config", -1)


def conv_mod():
    from fastdm.runtime.ops.cuda import conv  # imported per test, as the other ops.cuda tests do

    return conv


def last_config() -> int:
    return kernels.library().fdm_conv2d_nhwc_last_config()


def sm90_available() -> bool:
    return kernels.library().fdm_conv2d_nhwc_config_available(SM90) == 1


def expected_auto(c: int) -> tuple[int, ...]:
    """The configurations the automatic choice may take for an implicit-GEMM shape with C input channels: the sm90
    kernel whenever it can run (C a multiple of 64 on an sm90 device), else one of the sm80 tiles."""
    if sm90_available() and c % 64 == 0:
        return (SM90,)
    return (BIG, MEDIUM)


def gpu(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a), device="cuda")


def rand(rng, dtype: str, *shape, scale: float = 1.0) -> np.ndarray:
    return randn(rng, *shape, scale=scale).astype(NP_DTYPES[dtype])


def poisoned(shape, dtype: str) -> Tensor:
    return gpu(np.full(shape, np.nan, dtype=NP_DTYPES[dtype]))


def check(out: Tensor, ref: np.ndarray, dtype: str) -> None:
    assert out.dtype.name == dtype
    err = rel_l2(out.numpy().astype(np.float32), ref)
    assert err < TOL[dtype], f"rel L2 {err:.3g} >= {TOL[dtype]} ({dtype})"


def conv_inputs(rng, dtype, n, c, h, w, o, k, with_bias=True):
    x = rand(rng, dtype, n, c, h, w)
    wt = rand(rng, dtype, o, c, k, k, scale=(c * k * k) ** -0.5)  # outputs ~N(0, 1)
    b = rand(rng, dtype, o, scale=0.5) if with_bias else None
    return x, wt, b


def out_shape(n, h, w, o, k, stride, padding):
    return (n, o, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)


def fast(dtype, c, o) -> bool:
    """Whether the implicit GEMM runs (C and O that are not multiples of 8 are zero-padded for it)."""
    return dtype in HALF_DTYPES


# (N, C, H, W, O, k, stride, padding)
MODEL_CASES = {
    "sdxl_320_3x3": (2, 320, 128, 128, 320, 3, 1, 1),
    "sdxl_640_down_s2": (2, 640, 64, 64, 640, 3, 2, 1),
    "sdxl_shortcut_1x1": (2, 640, 64, 64, 1280, 1, 1, 0),
    "vae_512_3x3": (1, 512, 64, 64, 512, 3, 1, 1),
}
SMALL_CASES = {
    "odd_13x11": (2, 32, 13, 11, 48, 3, 1, 1),
    "odd_s2": (1, 64, 13, 11, 24, 3, 2, 1),
    "1x1_s2": (3, 16, 7, 9, 8, 1, 2, 0),
    "valid_c24": (1, 24, 5, 6, 40, 3, 1, 0),     # C not a multiple of the 32-wide k-block
    "c40_o72": (2, 40, 17, 19, 72, 3, 1, 1),     # partial k-block and partial 128-channel tile
    "5x5_p2": (1, 8, 9, 9, 16, 5, 1, 2),
    "pad_over_2x2": (2, 16, 2, 2, 16, 3, 1, 1),  # every output touches the padding
}
PADDED_CASES = {
    "rgb_in": (1, 3, 33, 31, 128, 3, 1, 1),     # a VAE's conv_in
    "rgb_out": (1, 128, 20, 18, 3, 3, 1, 1),    # a VAE's conv_out
    "latent_4ch": (2, 4, 16, 16, 8, 1, 1, 0),   # SDXL's post_quant_conv has C = O = 4
    "c12": (1, 12, 10, 9, 16, 3, 2, 1),
}


def run_case(rng, dtype, case, with_bias=True):
    n, c, h, w, o, k, stride, padding = case
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, k, with_bias)
    out = conv_mod().conv2d(gpu(x), gpu(wt), None if b is None else gpu(b), stride=stride, padding=padding,
                            out=poisoned(out_shape(n, h, w, o, k, stride, padding), dtype))
    check(out, cpu.conv2d(x, wt, b, stride=stride, padding=padding), dtype)
    return out


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_shapes(rng, dtype, name):
    run_case(rng, dtype, MODEL_CASES[name])
    assert last_config() in expected_auto(MODEL_CASES[name][1])


@needs_gpu
def test_vae_256x256_once(rng):
    run_case(rng, "bfloat16", (1, 128, 256, 256, 128, 3, 1, 1))
    assert last_config() in expected_auto(128)


@needs_gpu
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_small_shapes(rng, dtype, name, with_bias):
    run_case(rng, dtype, SMALL_CASES[name], with_bias)
    assert last_config() in expected_auto(SMALL_CASES[name][1])


# Shapes every configuration takes (C a multiple of 64 for the sm90 kernel); odd sizes, partial tiles, stride 2.
FORCED_CASES = {
    "odd_s2": SMALL_CASES["odd_s2"],
    "several_tiles": (2, 64, 40, 36, 136, 3, 1, 1),
    "c128_s2_o40": (1, 128, 17, 15, 40, 3, 2, 1),
    "1x1_c192": (2, 192, 9, 10, 264, 1, 1, 0),
    "pad_over_2x2": (2, 64, 2, 2, 16, 3, 1, 1),
    "sdxl_640_down_s2": MODEL_CASES["sdxl_640_down_s2"],
}


@needs_gpu
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", IMPLICIT, ids=["big", "medium", "sm90"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(FORCED_CASES))
def test_forced_config(rng, dtype, name, config, with_bias):
    """Every configuration computes the same convolution, whatever the automatic choice would be."""
    if config == SM90 and not sm90_available():
        pytest.skip("the sm90 conv kernel needs a compute capability 9.0 GPU and a library built for sm_90a")
    kernels.call("fdm_conv2d_nhwc_set_config", config)
    run_case(rng, dtype, FORCED_CASES[name], with_bias)
    assert last_config() == config


@needs_gpu
@pytest.mark.parametrize("config", [BIG, MEDIUM], ids=["big", "medium"])
@pytest.mark.parametrize("name", ["c40_o72", "valid_c24"])
def test_forced_sm80_partial_kblock(rng, name, config):
    """The sm80 tiles with C not a multiple of their 32-channel k-block."""
    kernels.call("fdm_conv2d_nhwc_set_config", config)
    run_case(rng, "bfloat16", SMALL_CASES[name])
    assert last_config() == config


@needs_gpu
def test_forced_sm90_declines_loudly(rng):
    """Forced, the sm90 kernel raises for C = 40 (not a multiple of 64) instead of silently running another one;
    automatic, the same shape runs on an sm80 tile."""
    if not sm90_available():
        pytest.skip("the sm90 conv kernel needs a compute capability 9.0 GPU and a library built for sm_90a")
    n, c, h, w, o, k, stride, padding = SMALL_CASES["c40_o72"]
    x, wt, b = conv_inputs(rng, "bfloat16", n, c, h, w, o, k)
    kernels.call("fdm_conv2d_nhwc_set_config", SM90)
    with pytest.raises(CudaError):
        conv_mod().conv2d(gpu(x), gpu(wt), gpu(b), stride=stride, padding=padding)
    kernels.call("fdm_conv2d_nhwc_set_config", -1)
    run_case(rng, "bfloat16", SMALL_CASES["c40_o72"])
    assert last_config() in (BIG, MEDIUM)


@needs_gpu
def test_config_hooks():
    lib = kernels.library()
    assert lib.fdm_conv2d_nhwc_config_count() == 3
    assert lib.fdm_conv2d_nhwc_config_available(BIG) == 1 and lib.fdm_conv2d_nhwc_config_available(MEDIUM) == 1
    assert lib.fdm_conv2d_nhwc_config_available(3) == 0
    with pytest.raises(CudaError):
        kernels.call("fdm_conv2d_nhwc_set_config", 3)


@needs_gpu
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", HALF_DTYPES + ["float32"])
@pytest.mark.parametrize("name", list(PADDED_CASES))
def test_channels_padded_to_8(rng, dtype, name, with_bias):
    run_case(rng, dtype, PADDED_CASES[name], with_bias)
    if dtype == "float32":
        assert last_config() == -1  # the im2col path ran
    else:
        assert last_config() >= 0  # the implicit GEMM, on zero-padded channels


@needs_gpu
def test_float32_aligned_shape_falls_back(rng):
    run_case(rng, "float32", SMALL_CASES["odd_13x11"])
    assert last_config() == -1


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_default_output_and_noncontiguous_input(rng, dtype):
    """x is a channel slice of a bigger tensor (a strided view); no `out` given."""
    n, c, h, w, o = 2, 24, 11, 13, 32
    big = rand(rng, dtype, n, c + 16, h, w)
    x = big[:, 8:8 + c]
    _, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, 3)
    xg = gpu(big).narrow(1, 8, c)
    assert not xg.is_contiguous()
    out = conv_mod().conv2d(xg, gpu(wt), gpu(b), stride=1, padding=1)
    assert out.shape == (n, o, h, w) and out.is_contiguous()
    check(out, cpu.conv2d(x, wt, b, stride=1, padding=1), dtype)
    assert last_config() in expected_auto(c)


# -------------------------------------------------------------------------------------------- NHWC entry
@needs_gpu
@pytest.mark.parametrize("layout", ["oihw", "ohwi"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [MODEL_CASES["sdxl_640_down_s2"], SMALL_CASES["odd_13x11"],
                                  SMALL_CASES["c40_o72"], PADDED_CASES["rgb_in"], PADDED_CASES["rgb_out"]],
                         ids=["sdxl_down_s2", "odd_13x11", "c40_o72", "rgb_in_padded", "rgb_out_padded"])
def test_conv2d_nhwc(rng, dtype, case, layout):
    n, c, h, w, o, k, stride, padding = case
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, k)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w_arg = wt if layout == "oihw" else np.ascontiguousarray(wt.transpose(0, 2, 3, 1))
    out = conv_mod().conv2d_nhwc(gpu(x_nhwc), gpu(w_arg), gpu(b), stride=stride, padding=padding,
                                 weight_layout=layout)
    ref = cpu.conv2d(x, wt, b, stride=stride, padding=padding).transpose(0, 2, 3, 1)
    assert out.shape == ref.shape
    check(out, ref, dtype)
    if c % 8:
        assert last_config() >= 0  # zero-padded to 8 channels
    else:
        assert last_config() in expected_auto(c)


@needs_gpu
@pytest.mark.parametrize("case", [MODEL_CASES["sdxl_640_down_s2"], PADDED_CASES["latent_4ch"],
                                  PADDED_CASES["rgb_out"]], ids=["sdxl_down_s2", "latent_4ch", "rgb_out"])
def test_ops_conv2d_channels_last(rng, case):
    """The public op: ops.conv2d(channels_last=True) with an OHWI weight from ops.conv_weight_channels_last."""
    from fastdm.runtime import ops

    n, c, h, w, o, k, stride, padding = case
    x, wt, b = conv_inputs(rng, "bfloat16", n, c, h, w, o, k)
    w_cl = ops.conv_weight_channels_last(gpu(wt))
    assert w_cl.shape == (o, k, k, c)
    out = ops.conv2d(gpu(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), w_cl, gpu(b), stride=stride,
                     padding=padding, channels_last=True)
    check(out, cpu.conv2d(x, wt, b, stride=stride, padding=padding).transpose(0, 2, 3, 1), "bfloat16")
    assert out.is_contiguous()


@needs_gpu
def test_conv2d_nhwc_misaligned_views(rng):
    """x, weight and bias that start 2 bytes into a buffer: the wrapper copies them to aligned memory."""
    dtype = "bfloat16"
    n, c, h, w, o = 1, 16, 9, 7, 24
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, 3)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w_ohwi = np.ascontiguousarray(wt.transpose(0, 2, 3, 1))

    def shifted(a):  # a contiguous view that starts one element into its buffer
        flat = gpu(np.concatenate([np.zeros(1, a.dtype), a.ravel()]))
        view = flat.narrow(0, 1, a.size).view(*a.shape)
        assert view.data_ptr % 16 != 0
        return view

    out = conv_mod().conv2d_nhwc(shifted(x_nhwc), shifted(w_ohwi), shifted(b), stride=1, padding=1,
                                 weight_layout="ohwi")
    check(out, cpu.conv2d(x, wt, b, stride=1, padding=1).transpose(0, 2, 3, 1), dtype)
    assert last_config() in expected_auto(c)


# ---------------------------------------------------------------------------------------------- weight cache
@needs_gpu
def test_weight_cache(rng):
    mod = conv_mod()
    dtype = "float16"
    n, c, h, w, o = 1, 16, 8, 8, 16
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, 3)
    xg, wg, bg = gpu(x), gpu(wt), gpu(b)
    first = mod.conv2d(xg, wg, bg, padding=1).numpy()
    cached = mod.cached_ohwi(wg)
    assert mod.cached_ohwi(wg) is cached  # converted once
    np.testing.assert_array_equal(cached.numpy(), wt.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(mod.conv2d(xg, wg, bg, padding=1).numpy(), first)  # deterministic, cached

    # Another weight Tensor gets its own conversion, never the first one's.
    wt2 = rand(rng, dtype, o, c, 3, 3, scale=(c * 9) ** -0.5)
    wg2 = gpu(wt2)
    check(mod.conv2d(xg, wg2, bg, padding=1), cpu.conv2d(x, wt2, b, padding=1), dtype)
    assert mod.cached_ohwi(wg2) is not cached

    # A freed weight leaves the cache.
    key = id(wg2)
    del wg2
    gc.collect()
    assert key not in mod._OHWI_CACHE

    mod.clear_weight_cache()
    assert mod.cached_ohwi(wg) is not cached
    np.testing.assert_array_equal(mod.conv2d(xg, wg, bg, padding=1).numpy(), first)


# ------------------------------------------------------------------------------------------- bad arguments
@needs_gpu
def test_errors(rng):
    mod = conv_mod()
    x = gpu(rand(rng, "bfloat16", 1, 16, 6, 6))
    wt = gpu(rand(rng, "bfloat16", 8, 16, 3, 3))
    with pytest.raises(InvalidArgumentError):
        mod.conv2d(x, wt, stride=0)
    with pytest.raises(InvalidArgumentError):
        mod.conv2d(x, wt, padding=-1)
    with pytest.raises(ShapeError):
        mod.conv2d(x, gpu(rand(rng, "bfloat16", 8, 24, 3, 3)))  # channel mismatch
    with pytest.raises(ShapeError):
        mod.conv2d(x, wt, gpu(rand(rng, "bfloat16", 9)))  # bias length
    with pytest.raises(ShapeError):
        mod.conv2d(x, gpu(rand(rng, "bfloat16", 8, 16, 9, 9)))  # kernel larger than the padded input
    with pytest.raises(ShapeError):
        mod.conv2d(x, wt, padding=1, out=poisoned((1, 8, 5, 5), "bfloat16"))  # wrong out shape
    x_nhwc = gpu(rand(rng, "bfloat16", 1, 6, 6, 16))
    with pytest.raises(InvalidArgumentError):
        mod.conv2d_nhwc(x_nhwc, wt, weight_layout="hwio")
    with pytest.raises(ShapeError):
        mod.conv2d_nhwc(x_nhwc, wt, weight_layout="ohwi")  # [8, 16, 3, 3] read as OHWI has C = 3


# ------------------------------------------------------------------- the wrapper alone, kernels emulated (no GPU)
@pytest.fixture
def emulated(monkeypatch):
    """conv.py on CPU Tensors: fdm_conv2d_nhwc is emulated in numpy from the raw pointers and sizes the wrapper
    passes it (reading x as NHWC and w as OHWI), and im2col by ops.cpu. This checks the layouts handed to the
    kernel, which path each shape takes and the weight cache where no GPU exists (CI). Returns (module, calls)."""
    import ctypes

    from fastdm.runtime import dtypes

    mod = conv_mod()
    calls: list[str] = []
    np_of = {dtypes.bfloat16.code: ml_dtypes.bfloat16, dtypes.float16.code: np.float16}

    def memory(ptr, shape, npdt):
        count = int(np.prod(shape))
        raw = np.frombuffer((ctypes.c_uint16 * count).from_address(ptr), dtype=np.uint16)
        return raw.view(npdt).reshape(shape)

    def fake_call(name, *args):
        assert name == "fdm_conv2d_nhwc", name
        xp, wp, bp, yp, n, h, w, c, o, kh, kw, sh, sw, ph, pw, code, _stream = args
        assert all(p % 16 == 0 for p in (xp, wp, yp) + ((bp,) if bp else ()))
        npdt = np_of[code]
        x = memory(xp, (n, h, w, c), npdt).astype(np.float32).transpose(0, 3, 1, 2)
        wt = memory(wp, (o, kh, kw, c), npdt).astype(np.float32).transpose(0, 3, 1, 2)
        b = memory(bp, (o,), npdt).astype(np.float32) if bp else None
        assert sh == sw and ph == pw
        ref = cpu.conv2d(x, wt, b, stride=sh, padding=ph)  # [N, O, Ho, Wo]
        memory(yp, (n,) + ref.shape[2:] + (o,), npdt)[...] = ref.transpose(0, 2, 3, 1).astype(npdt)
        calls.append("implicit")

    def fake_im2col(x, w, b=None, stride=1, padding=0, out=None):
        calls.append("im2col")
        ref = cpu.conv2d(x.numpy(), w.numpy(), None if b is None else b.numpy(), stride=stride, padding=padding)
        ref = ref.astype(x.numpy().dtype)
        if out is None:
            return Tensor.from_numpy(ref)
        out.numpy()[...] = ref
        return out

    class Dev:
        def set_current(self):
            pass

    def host_copy(src, dst):
        dst.numpy()[...] = src.numpy()

    def host_permute(x, dims):
        return Tensor.from_numpy(np.ascontiguousarray(x.numpy().transpose(dims)))

    monkeypatch.setattr(mod, "call", fake_call)
    monkeypatch.setattr(mod, "conv2d_im2col", fake_im2col)
    monkeypatch.setattr(mod, "gpu_device", lambda op, *ts: Dev())
    monkeypatch.setattr(mod, "stream", lambda device: 0)
    monkeypatch.setattr(mod, "permute", host_permute)
    monkeypatch.setattr(mod, "_copy", host_copy)
    monkeypatch.setattr(mod, "contiguous", lambda t: t if t.is_contiguous() else host_permute(t, tuple(range(t.ndim))))
    monkeypatch.setattr(mod, "contig", lambda t: t if t is None or t.is_contiguous() else host_permute(
        t, tuple(range(t.ndim))))
    mod.clear_weight_cache()
    yield mod, calls
    mod.clear_weight_cache()


def host(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [SMALL_CASES["odd_s2"], SMALL_CASES["c40_o72"], SMALL_CASES["1x1_s2"],
                                  SMALL_CASES["5x5_p2"], PADDED_CASES["rgb_in"], PADDED_CASES["rgb_out"]],
                         ids=["odd_s2", "c40_o72", "1x1_s2", "5x5_p2", "rgb_in", "rgb_out"])
def test_emulated_layouts_and_routing(emulated, rng, dtype, case):
    mod, calls = emulated
    n, c, h, w, o, k, stride, padding = case
    x, wt, b = conv_inputs(rng, dtype, n, c, h, w, o, k)
    ref = cpu.conv2d(x, wt, b, stride=stride, padding=padding)
    path = "implicit" if fast(dtype, c, o) else "im2col"

    out = mod.conv2d(host(x), host(wt), host(b), stride=stride, padding=padding)
    check(out, ref, dtype)
    poisoned_out = host(np.full(ref.shape, np.nan, NP_DTYPES[dtype]))
    assert mod.conv2d(host(x), host(wt), host(b), stride=stride, padding=padding, out=poisoned_out) is poisoned_out
    check(poisoned_out, ref, dtype)

    x_nhwc = host(x.transpose(0, 2, 3, 1))
    for layout, w_arg in (("oihw", host(wt)), ("ohwi", host(wt.transpose(0, 2, 3, 1)))):
        got = mod.conv2d_nhwc(x_nhwc, w_arg, host(b), stride=stride, padding=padding, weight_layout=layout)
        check(got, ref.transpose(0, 2, 3, 1), dtype)
    assert calls == [path] * 4


def test_emulated_weight_cache(emulated, rng):
    mod, calls = emulated
    x, wt, b = conv_inputs(rng, "bfloat16", 1, 16, 6, 6, 8, 3)
    w1 = host(wt)
    first = mod.conv2d(host(x), w1, host(b), padding=1).numpy()
    cached = mod.cached_ohwi(w1)
    assert mod.cached_ohwi(w1) is cached
    np.testing.assert_array_equal(cached.numpy(), wt.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(mod.conv2d(host(x), w1, host(b), padding=1).numpy(), first)
    key = id(w1)
    del w1
    gc.collect()
    assert key not in mod._OHWI_CACHE


def test_scratch_bytes():
    mod = conv_mod()
    # implicit GEMM: the NHWC copies of x and of the result
    assert mod.conv2d_scratch_bytes((2, 320, 128, 128), (320, 320, 3, 3), "bfloat16", 1, 1) == \
        2 * (2 * 320 * 128 * 128 + 2 * 320 * 128 * 128)
    assert mod.conv2d_scratch_bytes((2, 640, 64, 64), (640, 640, 3, 3), "float16", 2, 1) == \
        2 * (2 * 640 * 64 * 64 + 2 * 640 * 32 * 32)
    # RGB in, implicit GEMM on channels zero-padded to 8: the NHWC copies, then the padded x and weight
    px = 33 * 31
    assert mod.conv2d_scratch_bytes((1, 3, 33, 31), (128, 3, 3, 3), "bfloat16", 1, 1) == \
        2 * (px * 3 + px * 128) + 2 * (px * 8 + 128 * 9 * 8)
    # float32 takes im2col: padded weight and bias, then one chunk of rows of K = 32 (27 padded) and O = 128
    assert mod.conv2d_scratch_bytes((1, 3, 33, 31), (128, 3, 3, 3), "float32", 1, 1) == \
        4 * (128 * 32 + 128) + px * (32 + 128) * 4
