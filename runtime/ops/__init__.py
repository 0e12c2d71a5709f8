"""The one functional API that models call. Two backends with identical semantics:

- `ops.cpu`: float32 numpy reference, the executable specification. Takes numpy arrays of any float dtype,
  computes in float32, returns float32 arrays.
- `ops.cuda`: kernels from the library. Takes device Tensors, computes in float32 internally, returns Tensors
  of the input's dtype (bf16 / fp16 / fp32).

Every op here takes `Tensor`s and picks the backend from the device of its tensor arguments, which must all be
on one device. Shapes use B=batch, S=sequence, H=heads, D=head dim, N/K=features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError
from ..tensor import Tensor
from . import cpu

Activation = str | None  # None, "gelu" (erf), "gelu_tanh", "silu"


# ----------------------------------------------------------------------------------------------- dispatch
def _tensors_in(args) -> list[Tensor]:
    out = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


def _to_numpy(a):
    if isinstance(a, Tensor):
        return a.numpy()
    if isinstance(a, (list, tuple)):
        return type(a)(_to_numpy(t) for t in a)
    return a


def _wrap(out):
    if isinstance(out, np.ndarray):
        return Tensor.from_numpy(out)
    if isinstance(out, (list, tuple)):
        return [_wrap(o) for o in out]
    return out


def _dispatch(name: str, *args, **kwargs):
    tensors = _tensors_in(list(args) + list(kwargs.values()))
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ShapeError(f"ops.{name}: tensors are on different devices ({sorted(map(str, devices))}); "
                         "move them to one device with .to(device) first")
    if tensors and tensors[0].is_cuda:
        from . import cuda  # imported on first GPU use: loads the kernel library

        return getattr(cuda, name)(*args, **kwargs)
    result = getattr(cpu, name)(*_to_numpy(args), **{k: _to_numpy(v) for k, v in kwargs.items()})
    return _wrap(result)


# ------------------------------------------------------------------------------------------ linear algebra
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: Activation = None) -> Tensor:
    """act(x @ weight.T + bias). x: [..., K], weight: [N, K] (torch Linear layout), bias: [N] -> [..., N]."""
    return _dispatch("linear", x, weight, bias, activation=activation)


def linear_gated_residual(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, residual: Tensor) -> Tensor:
    """residual + gate[:, None, :] * (x @ weight.T + bias). x: [B, S, K], gate: [B, N], residual: [B, S, N]."""
    return _dispatch("linear_gated_residual", x, weight, bias, gate, residual)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b. a: [..., M, K], b: [..., K, N] with the same leading dims as a, or [K, N] -> [..., M, N]."""
    return _dispatch("matmul", a, b)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
           channels_last: bool = False) -> Tensor:
    """2-D cross-correlation as torch.nn.functional.conv2d. x: [N, C, H, W], weight: [O, C, kh, kw] -> NCHW.
    channels_last=True: x [N, H, W, C], weight [O, kh, kw, C] (see conv_weight_channels_last) -> [N, Ho, Wo, O];
    on the GPU this is the layout the implicit-GEMM kernels read, so no permutes happen."""
    return _dispatch("conv2d", x, weight, bias, stride=stride, padding=padding, channels_last=channels_last)


def conv_weight_channels_last(weight: Tensor) -> Tensor:
    """A [O, C, kh, kw] conv weight (torch layout) as the [O, kh, kw, C] copy that conv2d(channels_last=True)
    takes."""
    if weight.ndim != 4:
        raise ShapeError(f"ops.conv_weight_channels_last: weight must be [O, C, kh, kw], got {weight.shape}")
    return permute(weight, (0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------- attention
def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v, non-causal, per head. q: [B, Sq, H, D], k, v: [B, Sk, H, D] (strided views
    with a contiguous last dim are fine, e.g. slices of a fused QKV output); key_padding_mask: [B, Sk] bool, True
    where a key may be attended; scale defaults to D**-0.5. Returns [B, Sq, H, D], contiguous."""
    return _dispatch("attention", q, k, v, key_padding_mask, scale=scale)


# -------------------------------------------------------------------------------------------------- norms
def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim; weight/bias [D] optional (no affine when None)."""
    return _dispatch("layer_norm", x, weight, bias, eps=eps)


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """layer_norm(x, no affine) * (1 + scale[:, None]) + shift[:, None]. x: [B, S, D], shift, scale: [B, D]."""
    return _dispatch("layer_norm_modulate", x, shift, scale, eps=eps)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32."""
    return _dispatch("rms_norm", x, weight, eps=eps)


class GroupStats:
    """The moments of each (sample, channel group) of one channels-last tensor, made by add_group_stats or
    concat_group_stats while they wrote that tensor, for a group_norm of it that then reads it once instead of twice.
    They describe the values the tensor held when it was made: do not pass them after writing into it."""

    def __init__(self, of: Tensor, num_groups: int, payload):
        self.of = of  # the tensor they describe
        self.num_groups = num_groups
        self.payload = payload  # the backend's: cpu.GroupMoments, or ops.cuda's workspace of per-chunk moments


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, activation: Activation = None, channels_last: bool = False,
               stats: GroupStats | None = None) -> Tensor:
    """GroupNorm over [N, C, *spatial] (C split into num_groups), per-channel affine, then optional "silu".
    channels_last=True: x is [N, *spatial, C]. stats: x's moments from add_group_stats or concat_group_stats
    (channels_last only)."""
    payload = None
    if stats is not None:
        if not isinstance(stats, GroupStats):
            raise ShapeError(f"ops.group_norm: stats must be the GroupStats ops.add_group_stats or "
                             f"ops.concat_group_stats returned, got {type(stats).__name__}")
        if stats.of is not x:
            raise ShapeError("ops.group_norm: stats describe another tensor; pass the tensor returned with them (not "
                             "a copy or a view of it)")
        if not channels_last:
            raise ShapeError("ops.group_norm: stats are for channels-last tensors; pass channels_last=True")
        if stats.num_groups != num_groups:
            raise ShapeError(f"ops.group_norm: stats are for {stats.num_groups} groups, num_groups is {num_groups}")
        payload = stats.payload
    return _dispatch("group_norm", x, weight, bias, num_groups=num_groups, eps=eps, activation=activation,
                     channels_last=channels_last, stats=payload)


def add_group_stats(a: Tensor, b: Tensor, num_groups: int | None,
                    alpha: float = 1.0) -> tuple[Tensor, GroupStats | None]:
    """add(a, b, alpha) of channels-last a [N, *spatial, C], with b of a's shape or one row a sample
    [N, 1, ..., 1, C], and the moments of the result's num_groups channel groups for
    group_norm(result, num_groups, ..., channels_last=True, stats=...). The result is what add returns, bit for bit.
    num_groups None: add(a, b, alpha) and no statistics (for callers whose next op is not always a GroupNorm)."""
    if num_groups is None:
        return add(a, b, alpha=alpha), None
    out, payload = _dispatch("add_group_stats", a, b, num_groups=num_groups, alpha=alpha)
    return out, GroupStats(out, num_groups, payload)


def concat_group_stats(a: Tensor, b: Tensor, num_groups: int) -> tuple[Tensor, GroupStats]:
    """concat([a, b], axis=-1) of channels-last a [N, *spatial, Ca] and b [N, *spatial, Cb] (what concat returns),
    and the moments of the result's num_groups channel groups for group_norm(result, ..., stats=...). On the GPU a
    result under 12 MiB comes without them (the GroupStats' payload is None; group_norm then takes its own, which is
    faster there)."""
    out, payload = _dispatch("concat_group_stats", a, b, num_groups=num_groups)
    return out, GroupStats(out, num_groups, payload)


# ------------------------------------------------------------------------------------- positions and time
def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = True) -> Tensor:
    """Rotary embedding. x: [B, S, H, D]; cos, sin: [S, D/2] float32 (frequency i of position s).
    interleaved=True (FLUX, Qwen-Image): the pairs are (x[2i], x[2i+1]);
    interleaved=False (rotate-half): the pairs are (x[i], x[i + D/2]).
    Each pair (a, b) becomes (a*cos - b*sin, b*cos + a*sin)."""
    return _dispatch("rope", x, cos, sin, interleaved=interleaved)


def qk_norm_rope(qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor, sin: Tensor,
                 eps: float = 1e-6, interleaved: bool = True,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The attention preamble of FLUX-style blocks in one pass over the fused QKV projection output:
    q = rope(rms_norm(qkv[:, :, 0], q_weight, eps), cos, sin, interleaved), k likewise with k_weight, v as is.
    qkv: [B, S, 3, H, D] (contiguous last dim); q_weight, k_weight: [D] or None; cos, sin: [S, D/2] float32.
    Returns (q, k, v), each [B, S, H, D], views of one [B, S, 3, H, D] buffer: `out` when given (qkv itself to
    work in place, or e.g. a token range of a larger buffer), else a new tensor. The normalized values are not
    rounded to the storage dtype before the rotation."""
    q, k, v = _dispatch("qk_norm_rope", qkv, q_weight, k_weight, cos, sin, eps=eps, interleaved=interleaved,
                        out=out)
    return q, k, v


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t: [B] -> [B, dim], float32, as diffusers' get_timestep_embedding."""
    return _dispatch("timestep_embedding", t, dim=dim, flip_sin_to_cos=flip_sin_to_cos,
                     downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)


# ------------------------------------------------------------------------------------------- activations
def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU; approximate "none" (erf) or "tanh"."""
    return _dispatch("gelu", x, approximate=approximate)


def gelu_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """GEGLU: x: [..., 2N] split in halves (h, g) -> h * gelu(g): [..., N] (diffusers' GEGLU order)."""
    return _dispatch("gelu_mul", x, approximate=approximate)


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x) (CLIP)."""
    return _dispatch("quick_gelu", x)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return _dispatch("silu", x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along `axis`."""
    return _dispatch("softmax", x, axis=axis)


# ------------------------------------------------------------------------------------ elementwise, adaLN
def add(a: Tensor, b: Tensor | float, alpha: float = 1.0) -> Tensor:
    """a + alpha * b with numpy broadcasting of b to a's shape (b may be a Python number)."""
    return _dispatch("add", a, b, alpha=alpha)


def mul(a: Tensor, b: Tensor | float) -> Tensor:
    """a * b with numpy broadcasting of b to a's shape (b may be a Python number)."""
    return _dispatch("mul", a, b)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale[:, None]) + shift[:, None]. x: [B, S, D], shift, scale: [B, D]."""
    return _dispatch("modulate", x, shift, scale)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate[:, None] * y. x, y: [B, S, D], gate: [B, D]."""
    return _dispatch("gated_residual", x, gate, y)


# ------------------------------------------------------------------------------------ copies and layout
def contiguous(x: Tensor) -> Tensor:
    """A C-contiguous copy of x (x itself when it already is)."""
    return _dispatch("contiguous", x)


def permute(x: Tensor, dims: Sequence[int]) -> Tensor:
    """A contiguous copy of x with its axes reordered (numpy.transpose)."""
    return _dispatch("permute", x, dims=tuple(dims))


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Concatenate along `axis` into a new contiguous tensor."""
    return _dispatch("concat", list(tensors), axis=axis)


def split(x: Tensor, sizes: Sequence[int], axis: int = -1) -> list[Tensor]:
    """Views of x cut along `axis` into pieces of the given sizes (no copy)."""
    if sum(sizes) != x.shape[axis]:
        raise ShapeError(f"ops.split: sizes {list(sizes)} do not add up to dim {axis} of shape {x.shape}")
    out, start = [], 0
    for n in sizes:
        out.append(x.narrow(axis, start, n))
        start += n
    return out


def cast(x: Tensor, dtype) -> Tensor:
    """x converted to dtype (round to nearest even)."""
    return _dispatch("cast", x, dtype=dtype)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids]. ids: integer [...], table: [V, D] -> [..., D]."""
    return _dispatch("embedding", ids, table)


def upsample_nearest2x(x: Tensor, channels_last: bool = False) -> Tensor:
    """Nearest-neighbour 2x upsampling of [N, C, H, W] -> [N, C, 2H, 2W] (channels_last: [N, H, W, C] ->
    [N, 2H, 2W, C])."""
    return _dispatch("upsample_nearest2x", x, channels_last=channels_last)
