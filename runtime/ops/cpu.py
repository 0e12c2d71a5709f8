"""float32 numpy reference backend of runtime.ops: the executable specification of every op.

Every function takes numpy arrays and has the name and arguments that runtime/ops/__init__.py dispatches with.

Numerics, the contract the GPU kernels are measured against:
- Float inputs of any dtype (float32/16/64, ml_dtypes bfloat16 and float8) are first rounded to float32, as a
  kernel reads them; float scalar arguments (alpha, eps, scale) are rounded to float32 too.
- Matrix products (linear, linear_gated_residual, matmul, conv2d, attention) run as float32 BLAS products;
  attention's softmax is float32 as well (its score matrices are the biggest buffers here). Everything else
  (elementwise maths, norm statistics, transcendentals) is evaluated in float64 and rounded once to float32, so
  those results lie within about half a float32 ulp of the exact formula on the float32 inputs, and do not
  depend on which SIMD code path numpy picks for float32 exp/tanh/sin on a given CPU.
- Results are float32 arrays, except: cast returns the requested dtype; contiguous, permute and concat keep the
  input dtype; embedding returns the table's rows as float32.
- attention: a query row whose keys are all masked out (key_padding_mask all False for its batch) is defined to
  be all zeros. (torch's scaled_dot_product_attention returns NaN there.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import dtypes
from ..errors import InvalidArgumentError, ShapeError, UnsupportedDtypeError

f32 = np.float32
f64 = np.float64

# Temporary buffers of conv2d (im2col columns) and attention (score matrices) are cut into pieces of about this
# many bytes, so big images and long sequences stay within host memory.
_CHUNK_BYTES = 1 << 27

_FLOAT_NP = frozenset(d.np for d in dtypes.ALL if d.is_floating)
_LINEAR_ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")
_GELU_APPROXIMATIONS = ("none", "tanh")


# ------------------------------------------------------------------------------------------ input checks
def _is_float(dt: np.dtype) -> bool:
    return np.dtype(dt) in _FLOAT_NP


def _float(x, what: str) -> np.ndarray:
    """x as a float32 array; UnsupportedDtypeError for a non-float dtype."""
    arr = np.asarray(x)
    if not _is_float(arr.dtype):
        raise UnsupportedDtypeError(
            f"{what} has dtype {arr.dtype}; this op takes floating-point tensors "
            "(float32, float16, bfloat16, ...). Convert it first, e.g. with ops.cast(t, 'float32').")
    return arr.astype(f32, copy=False)


def _float_or_none(x, what: str) -> np.ndarray | None:
    return None if x is None else _float(x, what)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ShapeError(message)


def _check_vector(v: np.ndarray | None, n: int, what: str) -> None:
    if v is not None:
        _check(v.shape == (n,), f"{what} must have shape ({n},), got {v.shape}")


def _scalar(v, what: str) -> float:
    """A Python float holding the float32 rounding of v (kernels take float32 scalars)."""
    try:
        return float(f32(v))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a real number, got {v!r}") from None


def _axis(axis: int, ndim: int, what: str) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ShapeError(f"{what}: axis {axis!r} is out of range for a tensor with {ndim} dims")
    return int(axis) % ndim


# ------------------------------------------------------------------------------------------------- erf
# numpy has no erf. Two classical expansions, each used where it converges fast, evaluated in float64 with a
# maximum relative error of about 2e-14 (tests/test_ops_cpu.py checks it against math.erf / math.erfc):
#   |x| < 2.5: erf(x) = 2/sqrt(pi) * x * exp(-x^2) * sum_n (2x^2)^n / (1*3*...*(2n+1)), all terms positive
#              (no cancellation); 18 terms reach the float64 rounding floor for |x| < 1, 40 terms for |x| < 2.5.
#   x >= 2.5:  erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...))))), the Laplace
#              continued fraction, evaluated bottom-up to a fixed depth.
_ERF_SPLIT = 2.5
_ERF_SERIES_TIERS = ((1.0, 18), (_ERF_SPLIT, 40))  # (|x| below, number of series terms)
_ERFC_CF_DEPTH = 40
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _erf_series(ax: np.ndarray, terms: int) -> np.ndarray:
    x2 = ax * ax
    s = np.ones_like(ax)
    for n in range(terms, 0, -1):
        s *= x2
        s *= 2.0 / (2 * n + 1)
        s += 1.0
    return _TWO_OVER_SQRT_PI * ax * np.exp(-x2) * s


def _erfc_fraction(ax: np.ndarray) -> np.ndarray:
    ax = np.minimum(ax, 40.0)  # erfc(40) underflows to 0 anyway; keeps x*x finite (NaN passes through)
    f = ax.copy()
    for k in range(_ERFC_CF_DEPTH, 0, -1):
        f = ax + (0.5 * k) / f
    return np.exp(-ax * ax) / (math.sqrt(math.pi) * f)


def erf(x) -> np.ndarray:
    """The error function, elementwise, in float64 (relative error < 1e-13)."""
    x = np.asarray(x, dtype=f64)
    ax = np.abs(x)
    out = np.empty_like(ax)
    lower = 0.0
    for upper, terms in _ERF_SERIES_TIERS:
        near = (ax >= lower) & (ax < upper)
        out[near] = _erf_series(ax[near], terms)
        lower = upper
    far = ~(ax < _ERF_SPLIT)  # includes NaN, which stays NaN
    out[far] = 1.0 - _erfc_fraction(ax[far])
    return np.copysign(out, x)


def erfc(x) -> np.ndarray:
    """1 - erf(x), elementwise, in float64, without cancellation for large x (relative error < 1e-11)."""
    x = np.asarray(x, dtype=f64)
    out = np.empty_like(x)
    tail = x >= _ERF_SPLIT
    out[tail] = _erfc_fraction(x[tail])
    rest = ~tail  # here 1 - erf(x) >= erfc(2.5) = 4e-4, so the subtraction loses at most ~4 digits
    out[rest] = 1.0 - erf(x[rest])
    return out


# ------------------------------------------------------------------------------ activations (float64 in/out)
def _sigmoid64(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gelu64(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    # x * Phi(x), with Phi(x) = erfc(-x / sqrt 2) / 2 accurate in both tails
    return 0.5 * x * erfc(-x * (1.0 / math.sqrt(2.0)))


def _activate64(y: np.ndarray, activation: str | None) -> np.ndarray:
    if activation is None:
        return y
    if activation == "gelu":
        return _gelu64(y, "none")
    if activation == "gelu_tanh":
        return _gelu64(y, "tanh")
    if activation == "silu":
        return y * _sigmoid64(y)
    raise AssertionError(activation)  # callers validate


def _check_activation(activation, allowed: tuple, op: str) -> None:
    if activation not in allowed:
        raise InvalidArgumentError(f"ops.{op}: activation {activation!r} is not supported; use one of {list(allowed)}")


def _check_approximate(approximate, op: str) -> None:
    if approximate not in _GELU_APPROXIMATIONS:
        raise InvalidArgumentError(f"ops.{op}: approximate={approximate!r}; use 'none' (erf) or 'tanh'")


# ------------------------------------------------------------------------------------------ linear algebra
def _linear_f32(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, op: str) -> np.ndarray:
    """x @ w.T (+ b) in float32 BLAS, as float64. x: [..., K], w: [N, K] -> [..., N]."""
    _check(w.ndim == 2, f"ops.{op}: weight must be [N, K] (torch Linear layout), got shape {w.shape}")
    n, k = w.shape
    _check(x.ndim >= 1 and x.shape[-1] == k,
           f"ops.{op}: x's last dim must equal weight's K={k} (weight {w.shape}), got x {x.shape}")
    _check_vector(b, n, f"ops.{op}: bias")
    y = np.matmul(x.reshape(-1, k), w.T).astype(f64)  # [M, N]
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], n)


def linear(x, weight, bias=None, activation: str | None = None) -> np.ndarray:
    """act(x @ weight.T + bias). x: [..., K], weight: [N, K], bias: [N] -> [..., N]."""
    _check_activation(activation, _LINEAR_ACTIVATIONS, "linear")
    y = _linear_f32(_float(x, "ops.linear: x"), _float(weight, "ops.linear: weight"),
                    _float_or_none(bias, "ops.linear: bias"), "linear")
    return _activate64(y, activation).astype(f32)


def linear_gated_residual(x, weight, bias, gate, residual) -> np.ndarray:
    """residual + gate[:, None, :] * (x @ weight.T + bias). x: [B, S, K], gate: [B, N], residual: [B, S, N]."""
    op = "linear_gated_residual"
    x = _float(x, f"ops.{op}: x")
    gate = _float(gate, f"ops.{op}: gate")
    residual = _float(residual, f"ops.{op}: residual")
    _check(x.ndim == 3, f"ops.{op}: x must be [B, S, K], got {x.shape}")
    y = _linear_f32(x, _float(weight, f"ops.{op}: weight"), _float_or_none(bias, f"ops.{op}: bias"), op)
    bsz, s, n = y.shape
    _check(gate.shape == (bsz, n), f"ops.{op}: gate must be [B, N] = {(bsz, n)}, got {gate.shape}")
    _check(residual.shape == (bsz, s, n), f"ops.{op}: residual must be [B, S, N] = {(bsz, s, n)}, "
                                          f"got {residual.shape}")
    return (residual.astype(f64) + gate[:, None, :].astype(f64) * y).astype(f32)


def matmul(a, b) -> np.ndarray:
    """a @ b. a: [..., M, K], b: [..., K, N] with the same leading dims as a, or [K, N] -> [..., M, N]."""
    a = _float(a, "ops.matmul: a")
    b = _float(b, "ops.matmul: b")
    _check(a.ndim >= 2, f"ops.matmul: a must be [..., M, K], got {a.shape}")
    _check(b.ndim == 2 or (b.ndim == a.ndim and b.shape[:-2] == a.shape[:-2]),
           f"ops.matmul: b must be [K, N] or have a's leading dims {a.shape[:-2]}, got a {a.shape}, b {b.shape}")
    _check(b.shape[-2] == a.shape[-1], f"ops.matmul: inner dims differ: a {a.shape} @ b {b.shape}")
    return np.matmul(a, b)


def conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0, channels_last: bool = False) -> np.ndarray:
    """2-D cross-correlation as torch.nn.functional.conv2d (groups=1, dilation=1, symmetric zero padding).
    x: [N, C, H, W], weight: [O, C, kh, kw], bias: [O] -> [N, O, Ho, Wo], Ho = (H + 2p - kh) // stride + 1.
    channels_last: x [N, H, W, C], weight [O, kh, kw, C] -> [N, Ho, Wo, O]."""
    x = _float(x, "ops.conv2d: x")
    weight = _float(weight, "ops.conv2d: weight")
    if channels_last:
        _check(x.ndim == 4, f"ops.conv2d: x must be [N, H, W, C] (channels_last), got {x.shape}")
        _check(weight.ndim == 4, f"ops.conv2d: weight must be [O, kh, kw, C] (channels_last), got {weight.shape}")
        y = conv2d(x.transpose(0, 3, 1, 2), weight.transpose(0, 3, 1, 2), bias, stride, padding)
        return np.ascontiguousarray(y.transpose(0, 2, 3, 1))
    bias = _float_or_none(bias, "ops.conv2d: bias")
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise InvalidArgumentError(f"ops.conv2d: stride must be an int >= 1, got {stride!r}")
    if not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or padding < 0:
        raise InvalidArgumentError(f"ops.conv2d: padding must be an int >= 0, got {padding!r}")
    _check(x.ndim == 4, f"ops.conv2d: x must be [N, C, H, W], got {x.shape}")
    _check(weight.ndim == 4, f"ops.conv2d: weight must be [O, C, kh, kw], got {weight.shape}")
    n, c, h, w = x.shape
    o, cw, kh, kw = weight.shape
    _check(cw == c, f"ops.conv2d: weight has {cw} input channels, x has {c} (x {x.shape}, weight {weight.shape})")
    _check_vector(bias, o, "ops.conv2d: bias")
    _check(h + 2 * padding >= kh and w + 2 * padding >= kw,
           f"ops.conv2d: kernel {kh}x{kw} is larger than the padded input {h + 2 * padding}x{w + 2 * padding}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1

    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    # windows[n, c, i, j, p, q] = xp[n, c, i*stride + p, j*stride + q]: a view, nothing copied yet
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    wmat = weight.reshape(o, c * kh * kw).T  # [C*kh*kw, O], same (c, p, q) order as the columns
    out = np.empty((n, ho, wo, o), dtype=f32)
    row_bytes = max(1, n * wo * c * kh * kw * 4)
    rows = max(1, _CHUNK_BYTES // row_bytes)
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        cols = windows[:, :, r0:r1].transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # im2col: [n*rows*Wo, CKK]
        out[:, r0:r1] = np.matmul(cols, wmat).reshape(n, r1 - r0, wo, o)
    if bias is not None:
        out += bias
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # [N, O, Ho, Wo]


# ---------------------------------------------------------------------------------------------- attention
def attention(q, k, v, key_padding_mask=None, scale: float | None = None) -> np.ndarray:
    """softmax(q k^T * scale, keys masked) v per head. q: [B, Sq, H, D], k, v: [B, Sk, H, D],
    key_padding_mask: [B, Sk] bool, True = may be attended. Rows with no key to attend are zeros."""
    q = _float(q, "ops.attention: q")
    k = _float(k, "ops.attention: k")
    v = _float(v, "ops.attention: v")
    _check(q.ndim == 4, f"ops.attention: q must be [B, Sq, H, D], got {q.shape}")
    bsz, sq, nh, d = q.shape
    _check(k.ndim == 4 and k.shape[0] == bsz and k.shape[2:] == (nh, d),
           f"ops.attention: k must be [B, Sk, H, D] with B, H, D of q {q.shape}, got {k.shape}")
    _check(v.shape == k.shape, f"ops.attention: v must have k's shape {k.shape}, got {v.shape}")
    sk = k.shape[1]
    mask = None
    if key_padding_mask is not None:
        mask = np.asarray(key_padding_mask)
        if mask.dtype != np.bool_:
            raise UnsupportedDtypeError(f"ops.attention: key_padding_mask must be bool (True = attend), got "
                                        f"{mask.dtype}; convert e.g. with `mask != 0`")
        _check(mask.shape == (bsz, sk), f"ops.attention: key_padding_mask must be [B, Sk] = {(bsz, sk)}, "
                                        f"got {mask.shape}")
        mask = mask[:, None, None, :]  # [B, 1, 1, Sk]
    scale = _scalar(d ** -0.5 if scale is None else scale, "ops.attention: scale")

    qh = q.transpose(0, 2, 1, 3)  # [B, H, Sq, D]
    kt = k.transpose(0, 2, 3, 1)  # [B, H, D, Sk]
    vh = v.transpose(0, 2, 1, 3)  # [B, H, Sk, D]
    out = np.empty((bsz, sq, nh, d), dtype=f32)
    rows = max(1, _CHUNK_BYTES // max(1, bsz * nh * sk * 4))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        s = np.matmul(qh[:, :, r0:r1], kt)  # [B, H, rows, Sk]
        s *= f32(scale)
        if mask is not None:
            s = np.where(mask, s, f32(-np.inf))
        m = s.max(axis=-1, keepdims=True, initial=-np.inf)
        m = np.where(np.isfinite(m), m, f32(0))  # fully masked rows: exp(-inf - 0) = 0 everywhere
        p = np.exp(s - m)
        denom = p.sum(axis=-1, keepdims=True)
        o = np.matmul(p, vh) / np.where(denom > 0, denom, f32(1))  # [B, H, rows, D]; masked rows stay 0
        out[:, r0:r1] = o.transpose(0, 2, 1, 3)
    return out


# -------------------------------------------------------------------------------------------------- norms
def _normalize_last64(x: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over the last axis (biased variance), float64."""
    x = x.astype(f64)
    xc = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + eps)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last dim; weight/bias [D] optional (each may be None)."""
    x = _float(x, "ops.layer_norm: x")
    weight = _float_or_none(weight, "ops.layer_norm: weight")
    bias = _float_or_none(bias, "ops.layer_norm: bias")
    _check(x.ndim >= 1, "ops.layer_norm: x must have at least 1 dim")
    _check_vector(weight, x.shape[-1], "ops.layer_norm: weight")
    _check_vector(bias, x.shape[-1], "ops.layer_norm: bias")
    y = _normalize_last64(x, _scalar(eps, "eps"))
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y.astype(f32)


def _check_modulation(x: np.ndarray, named: dict[str, np.ndarray], op: str) -> None:
    _check(x.ndim == 3, f"ops.{op}: x must be [B, S, D], got {x.shape}")
    want = (x.shape[0], x.shape[2])
    for name, t in named.items():
        _check(t.shape == want, f"ops.{op}: {name} must be [B, D] = {want} for x {x.shape}, got {t.shape}")


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6) -> np.ndarray:
    """layer_norm(x, no affine) * (1 + scale[:, None]) + shift[:, None]. x: [B, S, D], shift, scale: [B, D]."""
    x = _float(x, "ops.layer_norm_modulate: x")
    shift = _float(shift, "ops.layer_norm_modulate: shift")
    scale = _float(scale, "ops.layer_norm_modulate: scale")
    _check_modulation(x, {"shift": shift, "scale": scale}, "layer_norm_modulate")
    y = _normalize_last64(x, _scalar(eps, "eps"))
    return (y * (1.0 + scale[:, None].astype(f64)) + shift[:, None]).astype(f32)


def rms_norm(x, weight=None, eps: float = 1e-6) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim (diffusers / transformers RMSNorm)."""
    x = _float(x, "ops.rms_norm: x")
    weight = _float_or_none(weight, "ops.rms_norm: weight")
    _check(x.ndim >= 1, "ops.rms_norm: x must have at least 1 dim")
    _check_vector(weight, x.shape[-1], "ops.rms_norm: weight")
    x64 = x.astype(f64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + _scalar(eps, "eps"))
    if weight is not None:
        y *= weight
    return y.astype(f32)


def _check_groups(op: str, c: int, num_groups) -> None:
    if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) or num_groups < 1:
        raise InvalidArgumentError(f"ops.{op}: num_groups must be an int >= 1, got {num_groups!r}")
    _check(c % num_groups == 0, f"ops.{op}: {c} channels do not split into {num_groups} groups")


class GroupMoments:
    """The CPU backend's payload of ops.GroupStats: mean and variance (biased) of each (sample, group), float64
    [N, G] each, of the tensor add_group_stats or concat_group_stats returned."""

    def __init__(self, mean: np.ndarray, var: np.ndarray):
        self.mean, self.var = mean, var


def group_norm(x, weight=None, bias=None, *, num_groups: int, eps: float = 1e-5,
               activation: str | None = None, channels_last: bool = False,
               stats: GroupMoments | None = None) -> np.ndarray:
    """GroupNorm over [N, C, *spatial] (C split into num_groups), per-channel affine, then optional "silu"
    (channels_last: x is [N, *spatial, C]). num_groups is keyword-only here because ops.group_norm passes it that
    way. stats: x's group moments from add_group_stats or concat_group_stats (channels_last only), used instead of
    x's own."""
    x = _float(x, "ops.group_norm: x")
    if channels_last:
        _check(x.ndim >= 2, f"ops.group_norm: x must be [N, *spatial, C] (channels_last), got {x.shape}")
        order = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))  # -> [N, C, *spatial]
        y = group_norm(x.transpose(order), weight, bias, num_groups=num_groups, eps=eps, activation=activation,
                       stats=stats)
        return np.ascontiguousarray(y.transpose(np.argsort(order)))
    _check(stats is None or isinstance(stats, GroupMoments),
           "ops.group_norm: stats must come from ops.add_group_stats or ops.concat_group_stats")
    weight = _float_or_none(weight, "ops.group_norm: weight")
    bias = _float_or_none(bias, "ops.group_norm: bias")
    _check_activation(activation, (None, "silu"), "group_norm")
    _check(x.ndim >= 2, f"ops.group_norm: x must be [N, C, *spatial], got {x.shape}")
    n, c = x.shape[:2]
    _check_groups("group_norm", c, num_groups)
    _check_vector(weight, c, "ops.group_norm: weight")
    _check_vector(bias, c, "ops.group_norm: bias")
    eps = _scalar(eps, "eps")
    if stats is None:
        y = _normalize_last64(x.reshape(n, num_groups, -1), eps).reshape(x.shape)
    else:
        _check(stats.mean.shape == (n, num_groups),
               f"ops.group_norm: stats are for {stats.mean.shape[1]} groups of {stats.mean.shape[0]} samples, x has "
               f"{num_groups} of {n}")
        groups = x.astype(f64).reshape(n, num_groups, -1)
        y = ((groups - stats.mean[..., None]) / np.sqrt(stats.var[..., None] + eps)).reshape(x.shape)
    per_channel = (c,) + (1,) * (x.ndim - 2)  # broadcasts over the spatial dims
    if weight is not None:
        y *= weight.reshape(per_channel)
    if bias is not None:
        y += bias.reshape(per_channel)
    return _activate64(y, activation).astype(f32)


# ------------------------------------------------------------------------------------- positions and time
def rope(x, cos, sin, interleaved: bool = True) -> np.ndarray:
    """Rotary embedding. x: [B, S, H, D]; cos, sin: [S, D/2]. interleaved: pairs (x[2i], x[2i+1]), else
    rotate-half pairs (x[i], x[i + D/2]); each pair (a, b) -> (a cos_i - b sin_i, b cos_i + a sin_i)."""
    x = _float(x, "ops.rope: x")
    cos = _float(cos, "ops.rope: cos")
    sin = _float(sin, "ops.rope: sin")
    _check(x.ndim == 4, f"ops.rope: x must be [B, S, H, D], got {x.shape}")
    s, d = x.shape[1], x.shape[3]
    _check(d % 2 == 0, f"ops.rope: head dim D must be even, got {d}")
    _check(cos.shape == (s, d // 2) and sin.shape == (s, d // 2),
           f"ops.rope: cos and sin must be [S, D/2] = {(s, d // 2)} for x {x.shape}, got {cos.shape}, {sin.shape}")
    c = cos.astype(f64)[None, :, None, :]  # [1, S, 1, D/2]
    sn = sin.astype(f64)[None, :, None, :]
    x64 = x.astype(f64)
    if interleaved:
        a, b = x64[..., 0::2], x64[..., 1::2]
    else:
        a, b = x64[..., : d // 2], x64[..., d // 2:]
    ra, rb = a * c - b * sn, b * c + a * sn
    out = np.empty(x.shape, dtype=f32)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    return out


def qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps: float = 1e-6, interleaved: bool = True,
                 out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q = rope(rms_norm(qkv[:, :, 0], q_weight, eps), cos, sin), k likewise with k_weight, v = qkv[:, :, 2].
    qkv: [B, S, 3, H, D]. Returns (q, k, v) [B, S, H, D], views of one [B, S, 3, H, D] float32 array, or of `out`
    (any float array of qkv's shape; qkv itself works in place) when given."""
    x = _float(qkv, "ops.qk_norm_rope: qkv")
    _check(x.ndim == 5 and x.shape[2] == 3, f"ops.qk_norm_rope: qkv must be [B, S, 3, H, D], got {x.shape}")
    q = rope(rms_norm(x[:, :, 0], q_weight, eps), cos, sin, interleaved)
    k = rope(rms_norm(x[:, :, 1], k_weight, eps), cos, sin, interleaved)
    if out is None:
        out = np.empty(x.shape, dtype=f32)
    else:
        _check(isinstance(out, np.ndarray) and _is_float(out.dtype) and out.shape == x.shape,
               f"ops.qk_norm_rope: out must be a float array of shape {x.shape}, got "
               f"{getattr(out, 'shape', type(out))}")
        if not out.flags.writeable:
            raise InvalidArgumentError("ops.qk_norm_rope: out is read-only; pass a writable array")
    out[:, :, 2] = x[:, :, 2]
    out[:, :, 0] = q
    out[:, :, 1] = k
    return out[:, :, 0], out[:, :, 1], out[:, :, 2]


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal embedding of t: [B] -> [B, dim] float32, as diffusers' get_timestep_embedding.

    The float32 steps of diffusers are repeated exactly (each Python scalar is rounded to float32 before it meets
    a float32 array, as torch does); exp, sin and cos are correctly rounded (evaluated in float64), where torch's
    are within 1 ulp."""
    t = np.asarray(t)
    if not (_is_float(t.dtype) or np.issubdtype(t.dtype, np.integer)):
        raise UnsupportedDtypeError(f"ops.timestep_embedding: t must be integer or float, got {t.dtype}")
    _check(t.ndim == 1, f"ops.timestep_embedding: t must be 1-D [B], got shape {t.shape}")
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
        raise ShapeError(f"ops.timestep_embedding: dim must be an int >= 1, got {dim!r}")
    half = dim // 2
    _check(half == 0 or half != downscale_freq_shift,
           f"ops.timestep_embedding: dim={dim} with downscale_freq_shift={downscale_freq_shift} divides by zero "
           "(dim // 2 - downscale_freq_shift == 0); use a larger dim")
    exponent = f32(-math.log(max_period)) * np.arange(half, dtype=f32)
    exponent = exponent / f32(half - downscale_freq_shift)
    freqs = np.exp(exponent.astype(f64)).astype(f32)
    emb = t.astype(f32)[:, None] * freqs[None, :]  # [B, half]
    emb = f32(scale) * emb
    emb64 = emb.astype(f64)
    sin_part, cos_part = np.sin(emb64).astype(f32), np.cos(emb64).astype(f32)
    parts = [cos_part, sin_part] if flip_sin_to_cos else [sin_part, cos_part]
    if dim % 2 == 1:
        parts.append(np.zeros((t.shape[0], 1), dtype=f32))
    return np.concatenate(parts, axis=-1)


# ------------------------------------------------------------------------------------------- activations
def gelu(x, approximate: str = "none") -> np.ndarray:
    """GELU; approximate "none" (x * Phi(x) with the exact erf) or "tanh"."""
    _check_approximate(approximate, "gelu")
    return _gelu64(_float(x, "ops.gelu: x").astype(f64), approximate).astype(f32)


def gelu_mul(x, approximate: str = "none") -> np.ndarray:
    """GEGLU: x: [..., 2N] split in halves (h, g) -> h * gelu(g): [..., N]."""
    _check_approximate(approximate, "gelu_mul")
    x = _float(x, "ops.gelu_mul: x")
    _check(x.ndim >= 1 and x.shape[-1] % 2 == 0, f"ops.gelu_mul: last dim must be even (2N), got {x.shape}")
    n = x.shape[-1] // 2
    h, g = x[..., :n].astype(f64), x[..., n:].astype(f64)
    return (h * _gelu64(g, approximate)).astype(f32)


def quick_gelu(x) -> np.ndarray:
    """x * sigmoid(1.702 x) (CLIP)."""
    x64 = _float(x, "ops.quick_gelu: x").astype(f64)
    return (x64 * _sigmoid64(1.702 * x64)).astype(f32)


def silu(x) -> np.ndarray:
    """x * sigmoid(x)."""
    x64 = _float(x, "ops.silu: x").astype(f64)
    return (x64 * _sigmoid64(x64)).astype(f32)


def softmax(x, axis: int = -1) -> np.ndarray:
    """Softmax along `axis` (a row of all -inf gives NaN, as torch)."""
    x = _float(x, "ops.softmax: x")
    axis = _axis(axis, x.ndim, "ops.softmax")
    x64 = x.astype(f64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(f32)


# ------------------------------------------------------------------------------------ elementwise, adaLN
def _operand_b(a: np.ndarray, b, op: str) -> np.ndarray:
    """b as float32 that broadcasts to a's shape; Python numbers allowed."""
    if isinstance(b, (bool, np.bool_)):
        raise UnsupportedDtypeError(f"ops.{op}: b is a bool; pass a number or a float tensor")
    if isinstance(b, (int, float, np.integer, np.floating)):
        return np.asarray(_scalar(b, f"ops.{op}: b"), dtype=f32)
    b = _float(b, f"ops.{op}: b")
    try:
        ok = np.broadcast_shapes(a.shape, b.shape) == a.shape
    except ValueError:
        ok = False
    _check(ok, f"ops.{op}: b of shape {b.shape} does not broadcast to a's shape {a.shape}")
    return b


def add(a, b, alpha: float = 1.0) -> np.ndarray:
    """a + alpha * b with numpy broadcasting of b to a's shape (b may be a Python number)."""
    a = _float(a, "ops.add: a")
    b = _operand_b(a, b, "add")
    return (a.astype(f64) + _scalar(alpha, "ops.add: alpha") * b.astype(f64)).astype(f32)


def per_sample_shape(a_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a per-sample operand of channels-last a [N, *spatial, C]: [N, 1, ..., 1, C]."""
    return (a_shape[0],) + (1,) * (len(a_shape) - 2) + (a_shape[-1],)


def add_group_stats(a, b, *, num_groups: int, alpha: float = 1.0) -> tuple[np.ndarray, GroupMoments]:
    """add(a, b, alpha) of channels-last a [N, *spatial, C] (b: a's shape, or [N, 1, ..., 1, C]) and the moments
    of the result's num_groups channel groups per sample, for group_norm(..., stats=)."""
    a = _float(a, "ops.add_group_stats: a")
    _check(a.ndim >= 2, f"ops.add_group_stats: a must be channels-last [N, *spatial, C], got {a.shape}")
    _check_groups("add_group_stats", a.shape[-1], num_groups)
    b = _float(b, "ops.add_group_stats: b")
    _check(b.shape in (a.shape, per_sample_shape(a.shape)),
           f"ops.add_group_stats: b must have a's shape {a.shape} or one row a sample {per_sample_shape(a.shape)}, "
           f"got {b.shape}; use ops.add for other broadcasts")
    out = add(a, b, alpha)
    return out, _group_moments(out, num_groups)


def _group_moments(out: np.ndarray, num_groups: int) -> GroupMoments:
    """The moments of each (sample, group) of channels-last `out` [N, *spatial, C], float64."""
    groups = out.astype(f64).reshape(out.shape[0], -1, num_groups, out.shape[-1] // num_groups)
    return GroupMoments(groups.mean(axis=(1, 3)), groups.var(axis=(1, 3)))


def concat_group_stats(a, b, *, num_groups: int) -> tuple[np.ndarray, GroupMoments]:
    """concat([a, b], axis=-1) of channels-last a [N, *spatial, Ca] and b [N, *spatial, Cb] and the moments of the
    result's num_groups channel groups per sample, for group_norm(..., stats=)."""
    a, b = np.asarray(a), np.asarray(b)
    _check(a.ndim >= 2 and b.ndim == a.ndim and a.shape[:-1] == b.shape[:-1],
           f"ops.concat_group_stats: a and b must be channels-last [N, *spatial, C] with the same N and spatial "
           f"sizes, got {a.shape} and {b.shape}")
    _check_groups("concat_group_stats", a.shape[-1] + b.shape[-1], num_groups)
    out = concat([a, b], axis=-1)
    return out, _group_moments(out, num_groups)


def mul(a, b) -> np.ndarray:
    """a * b with numpy broadcasting of b to a's shape (b may be a Python number)."""
    a = _float(a, "ops.mul: a")
    b = _operand_b(a, b, "mul")
    return (a.astype(f64) * b.astype(f64)).astype(f32)


def modulate(x, shift, scale) -> np.ndarray:
    """x * (1 + scale[:, None]) + shift[:, None]. x: [B, S, D], shift, scale: [B, D]."""
    x = _float(x, "ops.modulate: x")
    shift = _float(shift, "ops.modulate: shift")
    scale = _float(scale, "ops.modulate: scale")
    _check_modulation(x, {"shift": shift, "scale": scale}, "modulate")
    return (x.astype(f64) * (1.0 + scale[:, None].astype(f64)) + shift[:, None]).astype(f32)


def gated_residual(x, gate, y) -> np.ndarray:
    """x + gate[:, None] * y. x, y: [B, S, D], gate: [B, D]."""
    x = _float(x, "ops.gated_residual: x")
    gate = _float(gate, "ops.gated_residual: gate")
    y = _float(y, "ops.gated_residual: y")
    _check_modulation(x, {"gate": gate}, "gated_residual")
    _check(y.shape == x.shape, f"ops.gated_residual: y must have x's shape {x.shape}, got {y.shape}")
    return (x.astype(f64) + gate[:, None].astype(f64) * y).astype(f32)


# ------------------------------------------------------------------------------------ copies and layout
def contiguous(x) -> np.ndarray:
    """A C-contiguous copy of x (x itself when it already is), same dtype."""
    x = np.asarray(x)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def permute(x, dims: Sequence[int]) -> np.ndarray:
    """A contiguous copy of x with its axes reordered (numpy.transpose), same dtype."""
    x = np.asarray(x)
    dims = tuple(dims)
    ok = len(dims) == x.ndim and all(isinstance(d, (int, np.integer)) and -x.ndim <= d < x.ndim for d in dims)
    _check(ok and sorted(int(d) % x.ndim for d in dims) == list(range(x.ndim)),
           f"ops.permute: dims {list(dims)} are not a permutation of the {x.ndim} dims of shape {x.shape}")
    return np.ascontiguousarray(np.transpose(x, dims))


def concat(tensors: Sequence, axis: int = 0) -> np.ndarray:
    """Concatenate along `axis` into a new contiguous array of the inputs' (common) dtype."""
    arrays = [np.asarray(t) for t in tensors]
    _check(len(arrays) > 0, "ops.concat: needs at least one tensor")
    first = arrays[0]
    axis = _axis(axis, first.ndim, "ops.concat")
    for i, a in enumerate(arrays):
        if a.dtype != first.dtype:
            raise UnsupportedDtypeError(f"ops.concat: tensor {i} has dtype {a.dtype}, tensor 0 has {first.dtype}; "
                                        "cast them to one dtype first")
        _check(a.ndim == first.ndim and all(a.shape[j] == first.shape[j] for j in range(a.ndim) if j != axis),
               f"ops.concat: tensor {i} of shape {a.shape} does not match tensor 0 of shape {first.shape} "
               f"outside axis {axis}")
    return np.concatenate(arrays, axis=axis)


def cast(x, dtype) -> np.ndarray:
    """x converted to `dtype` (a DType, a name or a numpy dtype), rounding to nearest even; a new C-contiguous array.
    Float to integer is refused (the rounding would be ambiguous)."""
    x = np.asarray(x)
    target = dtypes.dtype(dtype)
    if _is_float(x.dtype) and not target.is_floating:
        raise UnsupportedDtypeError(f"ops.cast: cannot cast floating-point {x.dtype} to {target.name}; "
                                    "round explicitly on the host first (e.g. numpy.rint(...).astype(...))")
    return x.astype(target.np, order="C")


def embedding(ids, table) -> np.ndarray:
    """table[ids] as float32. ids: integer [...], table: [V, D] -> [..., D]."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise UnsupportedDtypeError(f"ops.embedding: ids must be an integer tensor, got {ids.dtype}")
    table = np.asarray(table)
    if not _is_float(table.dtype):
        raise UnsupportedDtypeError(f"ops.embedding: table must be floating-point, got {table.dtype}")
    _check(table.ndim == 2, f"ops.embedding: table must be [V, D], got {table.shape}")
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise ShapeError(f"ops.embedding: ids must lie in [0, {v}) for a table of {v} rows; "
                         f"got ids in [{ids.min()}, {ids.max()}]")
    return table[ids].astype(f32)  # gather first: never converts the whole (possibly huge) table


def upsample_nearest2x(x, channels_last: bool = False) -> np.ndarray:
    """Nearest-neighbour 2x upsampling of [N, C, H, W] -> [N, C, 2H, 2W] (channels_last: [N, H, W, C] ->
    [N, 2H, 2W, C])."""
    x = _float(x, "ops.upsample_nearest2x: x")
    if channels_last:
        _check(x.ndim == 4, f"ops.upsample_nearest2x: x must be [N, H, W, C] (channels_last), got {x.shape}")
        return np.ascontiguousarray(upsample_nearest2x(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1))
    _check(x.ndim == 4, f"ops.upsample_nearest2x: x must be [N, C, H, W], got {x.shape}")
    n, c, h, w = x.shape
    return np.ascontiguousarray(np.broadcast_to(x[:, :, :, None, :, None], (n, c, h, 2, w, 2))).reshape(
        n, c, 2 * h, 2 * w)
