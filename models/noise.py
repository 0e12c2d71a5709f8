"""Initial noise identical, bit for bit, to `torch.randn(..., generator=torch.Generator("cpu").manual_seed(s))`.

A diffusers user who passes a CPU generator with a seed expects the same image from fastdm for the same seed, so
this reproduces torch's CPU generator exactly (as of torch 2.x):

- the engine is MT19937 (the reference `init_genrand` seeding of `seed mod 2**32`); numpy's MT19937 bit generator
  runs it once the state is set here;
- a float32 uniform is `(u32 & 0xFFFFFF) * 2**-24`; a float64 uniform takes the low 53 bits of `hi << 32 | lo`;
- `randn` of fewer than 16 elements draws each value from a float64 Box-Muller pair (log1p/sin/cos of the C
  library) and keeps the second value of the pair in the generator for the next draw;
- `randn` of 16 or more elements fills the tensor with float32 uniforms, then turns each block of 16 into
  8 Box-Muller pairs (uniforms j and j+8); a last partial block is recomputed from 16 fresh uniforms over the
  tensor's last 16 elements. bf16/fp16 tensors draw only the whole blocks (not the partial one) before the tail.

The block transform is computed by one of two torch kernels, chosen by torch's CPU capability:
`"avx2"` (every x86-64 CPU with AVX2, AVX-512 CPUs included: torch has no AVX-512 variant of this kernel) is a
cephes-style float32 polynomial (log, sincos), compiled with fused multiply-adds; it is emulated here exactly.
`"default"` (aarch64 hosts such as Grace, x86 without AVX2) calls the C library's logf/sinf/cosf; it is
reproduced by calling the same functions, so it matches torch running on the same platform.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..runtime import dtypes
from ..runtime.errors import InvalidArgumentError, UnsupportedDtypeError

TORCH_DEFAULT_SEED = 67280421310721  # torch.Generator("cpu").initial_seed() when never seeded
KERNELS = ("avx2", "default")

_f32 = np.float32


# ------------------------------------------------------------------------------------------------ MT19937 state
def _mt19937_key(seed: int) -> np.ndarray:
    """The 624-word state of MT19937's init_genrand(seed & 0xFFFFFFFF), which torch's manual_seed uses."""
    key = np.empty(624, dtype=np.uint32)
    x = seed & 0xFFFFFFFF
    key[0] = x
    for i in range(1, 624):
        x = (1812433253 * (x ^ (x >> 30)) + i) & 0xFFFFFFFF
        key[i] = x
    return key


# --------------------------------------------------------------------------------- float32 arithmetic of the kernel
def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add a*b + c with one rounding (what vfmadd computes), for float32 inputs.

    a*b is exact in float64; the float64 sum s is off from the exact value by err (TwoSum). Rounding s to float32
    gives the correctly rounded result except when s sits exactly on a float32 halfway point and err != 0; then s
    is moved one float64 step towards the exact value before rounding.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    # s: float64 with 52 fraction bits; float32 keeps 23, so a halfway point has the low 29 bits == 1 << 28
    tie = ((s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)) & (err != 0)
    if np.any(tie):
        s = s.copy()
        s[tie] = np.nextafter(s[tie], np.where(err[tie] > 0, np.inf, -np.inf))
    return s.astype(np.float32)


# log(x), cephes polynomial for log(1 + x) on [sqrt(1/2) - 1, sqrt(2) - 1]
_LOG_P = tuple(_f32(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                 3.3333331174e-1))
_LOG_Q1, _LOG_Q2 = _f32(-2.12194440e-4), _f32(0.693359375)  # ln 2 split in two (q2 exact in few bits)
_SQRT_HALF = _f32(0.707106781186547524)
# sin/cos: argument reduction by pi/4 in three parts, then polynomials on [-pi/4, pi/4]
_FOUR_OVER_PI = _f32(1.27323954473516)
_DP = (_f32(-0.78515625), _f32(-2.4187564849853515625e-4), _f32(-3.77489497744594108e-8))
_SIN_P = (_f32(-1.9515295891e-4), _f32(8.3321608736e-3), _f32(-1.6666654611e-1))
_COS_P = (_f32(2.443315711809948e-5), _f32(-1.388731625493765e-3), _f32(4.166664568298827e-2))
_TWO_PI_F32 = _f32(2.0 * math.pi)
_ONE, _HALF = _f32(1.0), _f32(0.5)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """log of positive normal float32 values, operation for operation as torch's AVX2 kernel computes it."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(np.float32) + _ONE
    m = ((bits & ~0x7F800000) | 0x3F000000).view(np.float32)  # mantissa scaled into [0.5, 1)
    small = m < _SQRT_HALF  # then use 2m - 1 and e - 1, keeping the polynomial's argument centred on 0
    t = m - _ONE
    e = e - np.where(small, _ONE, _f32(0))
    t = t + np.where(small, m, _f32(0))
    z = t * t
    y = np.full_like(t, _LOG_P[0])
    for coef in _LOG_P[1:]:
        y = _fma(y, t, coef)
    y = y * t
    y = _fma(y, z, e * _LOG_Q1)
    y = y - z * _HALF  # z * 0.5 is exact, so the fused and the plain forms agree
    t = t + y
    return _fma(e, _LOG_Q2, t)


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) of non-negative float32 values below 2**24, as torch's AVX2 kernel computes them."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)  # truncation, as cvttps2dq
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    r = _fma(y, _DP[0], x)
    r = _fma(y, _DP[1], r)
    r = _fma(y, _DP[2], r)
    z = r * r
    pc = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z
    pc = _fma(pc, z, -(z * _HALF)) + _ONE  # cos r
    ps = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z
    ps = _fma(r, ps, r)  # sin r
    use_sin_poly = (j & 2) == 0
    sin = np.where(use_sin_poly, ps, pc)
    cos = np.where(use_sin_poly, pc, ps)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where(((j - 2) & 4) == 0, -cos, cos)
    return sin, cos


def _box_muller_avx2(u: np.ndarray) -> np.ndarray:
    # u: [N, 16] float32 uniforms in [0, 1)
    radius = np.sqrt(_f32(-2.0) * _log_avx2(_ONE - u[:, :8]))
    sin, cos = _sincos_avx2(_TWO_PI_F32 * u[:, 8:])
    # the kernel ends with fma(n, std=1, mean=0): exact, except that it turns -0 into +0
    return np.concatenate([radius * cos + _f32(0), radius * sin + _f32(0)], axis=1)


@lru_cache(maxsize=1)
def _libm():
    """The C library's float functions, which torch's non-AVX2 kernel calls."""
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    funcs = []
    for name in ("logf", "sinf", "cosf"):
        f = getattr(lib, name)
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        funcs.append(f)
    return funcs


def _box_muller_default(u: np.ndarray) -> np.ndarray:
    # u: [N, 16] float32 uniforms in [0, 1)
    logf, sinf, cosf = _libm()
    u1 = (_ONE - u[:, :8]).ravel()
    log = np.array([logf(v) for v in u1.tolist()], dtype=np.float32).reshape(-1, 8)
    radius = np.sqrt(_f32(-2.0) * log)
    # theta is computed in double (2.0f * pi<double> * u2) and stored as float
    theta = (2.0 * math.pi * u[:, 8:].astype(np.float64)).astype(np.float32).ravel().tolist()
    sin = np.array([sinf(v) for v in theta], dtype=np.float32).reshape(-1, 8)
    cos = np.array([cosf(v) for v in theta], dtype=np.float32).reshape(-1, 8)
    return np.concatenate([radius * cos + _f32(0), radius * sin + _f32(0)], axis=1)


# ------------------------------------------------------------------------------------------------------ generator
class TorchCPUGenerator:
    """numpy twin of `torch.Generator("cpu")`: the same seed and the same calls give the same numbers.

    `kernel` picks torch's Box-Muller kernel to reproduce ("avx2": torch on x86-64; "default": torch on aarch64
    or on x86 without AVX2). The generator keeps its state across calls, as torch's does.
    """

    def __init__(self, seed: int | None = None, kernel: str = "avx2"):
        if kernel not in KERNELS:
            raise InvalidArgumentError(f"kernel={kernel!r} is not one of {KERNELS}: use 'avx2' to match torch on "
                                       "x86-64 hosts, 'default' to match torch on aarch64 hosts")
        self.kernel = kernel
        self._mt = np.random.MT19937(0)
        self.manual_seed(TORCH_DEFAULT_SEED if seed is None else seed)

    def manual_seed(self, seed: int) -> TorchCPUGenerator:
        """Reset the state as `torch.Generator.manual_seed(seed)` does; returns self."""
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise InvalidArgumentError(f"seed {seed} is out of range: torch takes seeds in [-2**63, 2**64)")
        self._seed = seed % 2**64  # torch stores negative seeds as their uint64 bit pattern
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(self._seed), "pos": 624}}
        self._next_normal: float | None = None  # second value of the last float64 Box-Muller pair
        return self

    def initial_seed(self) -> int:
        return self._seed

    # -- raw draws ---------------------------------------------------------------------------------------------
    def _u32(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return ((self._u32(n) & np.uint32(0xFFFFFF)).astype(np.float64) * 2.0**-24).astype(np.float32)

    def _uniform_f64(self, n: int) -> np.ndarray:
        w = self._u32(2 * n).astype(np.uint64).reshape(n, 2)
        v = ((w[:, 0] << np.uint64(32)) | w[:, 1]) & np.uint64((1 << 53) - 1)
        return v.astype(np.float64) * 2.0**-53

    def _normal_f64(self) -> float:
        if self._next_normal is not None:
            out, self._next_normal = self._next_normal, None
            return out * 1.0 + 0.0  # torch applies val * std + mean here as well
        u1, u2 = self._uniform_f64(2).tolist()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta) * 1.0 + 0.0

    def _box_muller(self, u: np.ndarray) -> np.ndarray:
        u = u.reshape(-1, 16)
        out = _box_muller_avx2(u) if self.kernel == "avx2" else _box_muller_default(u)
        return out.reshape(-1)

    # -- public draws ------------------------------------------------------------------------------------------
    def rand(self, shape: int | Sequence[int]) -> np.ndarray:
        """Uniform float32 in [0, 1): `torch.rand(shape, generator=g)`."""
        shape = _shape(shape)
        return self._uniform_f32(_numel(shape)).reshape(shape)

    def randn(self, shape: int | Sequence[int], dtype: dtypes.DType | str = "float32") -> np.ndarray:
        """Standard normal samples: `torch.randn(shape, generator=g, dtype=dtype)` (float32, bfloat16 or float16).

        Returns a numpy array of that dtype (ml_dtypes.bfloat16 for bfloat16).
        """
        shape = _shape(shape)
        dt = dtypes.dtype(dtype)
        if dt.name not in ("float32", "bfloat16", "float16"):
            raise UnsupportedDtypeError(f"randn makes float32, bfloat16 or float16 noise, not {dt.name}; "
                                        "draw float32 and cast it")
        n = _numel(shape)
        if n == 0:
            return np.empty(shape, dtype=dt.np)
        if n < 16:
            vals = np.array([self._normal_f64() for _ in range(n)], dtype=np.float64)
            # C++ narrows double -> float first, then float -> bf16/fp16
            return vals.astype(np.float32).astype(dt.np).reshape(shape)
        whole = n // 16 * 16
        out = np.empty(n, dtype=np.float32)
        if dt.name == "float32":
            # torch draws uniforms for the whole tensor (the partial block's too, then discarded)
            u = self._uniform_f32(n)
            out[:whole] = self._box_muller(u[:whole])
        else:
            out[:whole] = self._box_muller(self._uniform_f32(whole))
        if n != whole:
            out[n - 16:] = self._box_muller(self._uniform_f32(16))
        return out.astype(dt.np).reshape(shape)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"shape {shape} has a negative size")
    return shape


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def randn(shape: int | Sequence[int], seed: int, dtype: dtypes.DType | str = "float32",
          kernel: str = "avx2") -> np.ndarray:
    """`torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)` without torch."""
    return TorchCPUGenerator(seed, kernel=kernel).randn(shape, dtype=dtype)
