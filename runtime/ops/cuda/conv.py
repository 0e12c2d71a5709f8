"""ops.cuda conv2d: a CUTLASS implicit GEMM on channels-last tensors (kernels/conv_implicit.cu). C or O not a
multiple of 8 (an RGB conv_in, a 4-channel latent) is zero-padded up to 8 around the same kernel; im2col + GEMM
(gemm.conv2d_im2col, kernels/im2col.cu) takes what it cannot: float32, filters over 32x32, one image of 2 GiB or
more.

`conv2d` keeps diffusers' layouts (x NCHW, weight OIHW): x is permuted to NHWC and the result back to NCHW on
every call (one strided-copy kernel each way); the weight is converted to KRSC (= OHWI, [O, kh, kw, C]) once and
cached per weight Tensor. `conv2d(channels_last=True)` takes and returns channels-last activations with an OHWI
weight (the model converts it at load), so a model that keeps its activations channels-last pays no permutes and
no cached copy. `conv2d_nhwc` is the channels-last entry with a choice of weight layout (tests, benchmarks).
"""

from __future__ import annotations

import weakref

import numpy as np

from ... import dtypes
from ...errors import InvalidArgumentError, ShapeError
from ...tensor import Tensor, zeros
from ._common import call, check_float, check_same_dtype, contig, empty_like, gpu_device, stream
from .gemm import conv2d_im2col
from .layout import _copy, contiguous, permute

_FAST_DTYPES = (dtypes.bfloat16, dtypes.float16)
_MAX_TENSOR_BYTES = 1 << 31  # the kernel indexes each tensor of a launch in int32 bytes; batches are split
_WEIGHT_LAYOUTS = ("oihw", "ohwi")

# id(weight) -> (weakref to the weight, its data_ptr when converted, the [O, kh, kw, C] copy).
_OHWI_CACHE: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def to_ohwi(weight: Tensor) -> Tensor:
    """A contiguous [O, kh, kw, C] copy (CUTLASS's KRSC) of a [O, C, kh, kw] conv weight; not cached."""
    gpu_device("conv2d", weight)
    if weight.ndim != 4:
        raise ShapeError(f"ops.conv2d: weight must be [O, C, kh, kw], got {weight.shape}")
    return permute(weight, (0, 2, 3, 1))


def cached_ohwi(weight: Tensor) -> Tensor:
    """to_ohwi(weight), converted on the first call for this weight Tensor and kept until the Tensor is freed. A
    weight written in place after its first use (e.g. a fused LoRA) needs clear_weight_cache()."""
    key = id(weight)
    hit = _OHWI_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight.data_ptr:
        return hit[2]
    ohwi = to_ohwi(weight)

    def forget(ref: weakref.ref, key: int = key) -> None:
        entry = _OHWI_CACHE.get(key)
        if entry is not None and entry[0] is ref:  # not a newer weight that reuses the id
            del _OHWI_CACHE[key]

    _OHWI_CACHE[key] = (weakref.ref(weight, forget), weight.data_ptr, ohwi)
    return ohwi


def clear_weight_cache() -> None:
    """Drop every cached [O, kh, kw, C] weight copy (they are rebuilt on next use)."""
    _OHWI_CACHE.clear()


def _check_args(stride, padding) -> tuple[int, int]:
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise InvalidArgumentError(f"ops.conv2d: stride must be an int >= 1, got {stride!r}")
    if not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or padding < 0:
        raise InvalidArgumentError(f"ops.conv2d: padding must be an int >= 0, got {padding!r}")
    return int(stride), int(padding)


def _check_operands(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """All on one GPU, x floating point, weight and bias in x's dtype."""
    gpu_device("conv2d", x, weight, bias)
    check_float("conv2d", x)
    check_same_dtype("conv2d", x, weight, "weight")
    check_same_dtype("conv2d", x, bias, "bias")


def _out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    if h + 2 * padding < kh or w + 2 * padding < kw:
        raise ShapeError(f"ops.conv2d: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * padding}x{w + 2 * padding}")
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _implicit_ok(dtype: dtypes.DType, n: int, h: int, w: int, c: int, o: int, kh: int, kw: int, ho: int,
                 wo: int) -> bool:
    """Whether fdm_conv2d_nhwc takes the problem once C and O are padded to multiples of 8 (its limits, checked
    again in kernels/conv_implicit.cu)."""
    isz = dtype.itemsize
    c, o = _round8(c), _round8(o)
    return (dtype in _FAST_DTYPES and c > 0 and o > 0 and n > 0 and kh <= 32 and kw <= 32
            and h * w * c * isz < _MAX_TENSOR_BYTES and ho * wo * o * isz < _MAX_TENSOR_BYTES
            and o * kh * kw * c * isz < _MAX_TENSOR_BYTES)


def conv2d_scratch_bytes(x_shape: tuple[int, int, int, int], weight_shape: tuple[int, int, int, int], dtype,
                         stride: int = 1, padding: int = 0) -> int:
    """GPU bytes that conv2d (NCHW) allocates for one call besides its output, for memory planning: the NHWC copies
    of x and of the result on the implicit-GEMM path, im2col's padded weight and row chunk otherwise. The cached
    [O, kh, kw, C] weight (the weight's size, kept while the weight lives) is not counted."""
    n, c, h, w = x_shape
    o, _, kh, kw = weight_shape
    dt = dtypes.dtype(dtype)
    isz = dt.itemsize
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    if _implicit_ok(dt, n, h, w, c, o, kh, kw, ho, wo):
        scratch = (n * h * w * c + n * ho * wo * o) * isz  # the NHWC copies
        c8, o8 = _round8(c), _round8(o)
        if c8 != c:  # zero-padded x and weight
            scratch += (n * h * w * c8 + o * kh * kw * c8) * isz
        if o8 != o:  # padded weight rows, bias and output
            scratch += (o8 * kh * kw * c8 + o8 + n * ho * wo * o8) * isz
        return scratch
    from . import gemm  # its workspace budget is read at call time (tests lower it)

    kp, op = gemm._round8(c * kh * kw), gemm._round8(o)
    per_row = (kp + op) * isz
    rows = n * ho * wo
    chunk = min(rows, max(1, gemm._CONV_WORKSPACE_BYTES // per_row))
    return (op * kp + op) * isz + chunk * per_row


def _aligned(t: Tensor | None) -> Tensor | None:
    """t when contiguous and 16-byte aligned (the kernel's vector loads), else a fresh contiguous copy."""
    if t is None or (t.is_contiguous() and t.data_ptr % 16 == 0):
        return t
    y = empty_like(t)
    _copy(t, y)
    return y


def _pad_last(t: Tensor, size: int) -> Tensor:
    """t zero-padded along its last dim to `size` (a new contiguous tensor)."""
    out = zeros(t.shape[:-1] + (size,), t.dtype, t.device)
    _copy(t, out.narrow(t.ndim - 1, 0, t.shape[-1]))
    return out


def _pad_first(t: Tensor, size: int) -> Tensor:
    """t zero-padded along its first dim to `size` (a new contiguous tensor)."""
    out = zeros((size,) + t.shape[1:], t.dtype, t.device)
    _copy(t, out.narrow(0, 0, t.shape[0]))
    return out


def _run_nhwc(x: Tensor, w_ohwi: Tensor, bias: Tensor | None, stride: int, padding: int, ho: int,
              wo: int) -> Tensor:
    """fdm_conv2d_nhwc: x [N, H, W, C], w_ohwi [O, kh, kw, C] -> [N, Ho, Wo, O]. C or O that are not multiples of
    8 are zero-padded to one (extra input channels with zero weights add nothing; extra output channels are cut)."""
    c, o = x.shape[3], w_ohwi.shape[0]
    if c % 8:
        x, w_ohwi = _pad_last(x, _round8(c)), _pad_last(w_ohwi, _round8(c))
    if o % 8:
        w_ohwi = _pad_first(w_ohwi, _round8(o))
        bias = None if bias is None else _pad_first(bias, _round8(o))
        return contiguous(_run_nhwc(x, w_ohwi, bias, stride, padding, ho, wo).narrow(3, 0, o))
    n, h, w, c = x.shape
    o, kh, kw, _ = w_ohwi.shape
    x, w_ohwi, bias = _aligned(x), _aligned(w_ohwi), _aligned(bias)
    y = empty_like(x, (n, ho, wo, o))
    call("fdm_conv2d_nhwc", x.data_ptr, w_ohwi.data_ptr, None if bias is None else bias.data_ptr, y.data_ptr,
         n, h, w, c, o, kh, kw, stride, stride, padding, padding, x.dtype.code, stream(x.device))
    return y


def _check_out(out: Tensor, like: Tensor, shape: tuple[int, ...]) -> None:
    gpu_device("conv2d", like, out)
    if out.shape != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ShapeError(f"ops.conv2d: out must be a contiguous {shape} tensor of {like.dtype.name}, got "
                         f"{out.shape} {out.dtype.name}")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
           out: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """2-D cross-correlation as torch.nn.functional.conv2d (groups=1, dilation=1, symmetric zero padding).
    x: [N, C, H, W], weight: [O, C, kh, kw], bias: [O] -> [N, O, Ho, Wo] (written into `out` when given).
    channels_last=True: x [N, H, W, C], weight [O, kh, kw, C] -> [N, Ho, Wo, O] (no `out`)."""
    if channels_last:
        if out is not None:
            raise InvalidArgumentError("ops.conv2d: out is not supported with channels_last=True")
        return conv2d_nhwc(x, weight, bias, stride=stride, padding=padding, weight_layout="ohwi")
    stride, padding = _check_args(stride, padding)
    _check_operands(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4:
        raise ShapeError(f"ops.conv2d: x must be [N, C, H, W] and weight [O, C, kh, kw], got {x.shape} and "
                         f"{weight.shape}")
    n, c, h, w = x.shape
    o, cw, kh, kw = weight.shape
    if cw != c:
        raise ShapeError(f"ops.conv2d: weight has {cw} input channels, x has {c} (x {x.shape}, weight "
                         f"{weight.shape})")
    if bias is not None and bias.shape != (o,):
        raise ShapeError(f"ops.conv2d: bias must be [{o}], got {bias.shape}")
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    if not _implicit_ok(x.dtype, n, h, w, c, o, kh, kw, ho, wo):
        return conv2d_im2col(x, weight, bias, stride=stride, padding=padding, out=out)
    if out is not None:
        _check_out(out, x, (n, o, ho, wo))
    x_nhwc = permute(x, (0, 2, 3, 1))  # [N, H, W, C]
    y = _run_nhwc(x_nhwc, cached_ohwi(weight), contig(bias), stride, padding, ho, wo)  # [N, Ho, Wo, O]
    del x_nhwc
    if out is None:
        return permute(y, (0, 3, 1, 2))
    _copy(y.permute(0, 3, 1, 2), out)
    return out


def conv2d_nhwc(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
                weight_layout: str = "oihw") -> Tensor:
    """conv2d on channels-last activations: x [N, H, W, C] -> [N, Ho, Wo, O]. weight is [O, C, kh, kw]
    (weight_layout "oihw", converted once and cached like conv2d's) or already [O, kh, kw, C] ("ohwi")."""
    stride, padding = _check_args(stride, padding)
    if weight_layout not in _WEIGHT_LAYOUTS:
        raise InvalidArgumentError(f"ops.conv2d_nhwc: weight_layout must be one of {_WEIGHT_LAYOUTS}, got "
                                   f"{weight_layout!r}")
    _check_operands(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4:
        raise ShapeError(f"ops.conv2d_nhwc: x must be [N, H, W, C] and weight 4-d, got {x.shape} and "
                         f"{weight.shape}")
    n, h, w, c = x.shape
    if weight_layout == "oihw":
        o, cw, kh, kw = weight.shape
    else:
        o, kh, kw, cw = weight.shape
    if cw != c:
        raise ShapeError(f"ops.conv2d_nhwc: weight has {cw} input channels, x has {c} (x {x.shape} NHWC, weight "
                         f"{weight.shape} {weight_layout.upper()})")
    if bias is not None and bias.shape != (o,):
        raise ShapeError(f"ops.conv2d_nhwc: bias must be [{o}], got {bias.shape}")
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    if c == 0:
        raise ShapeError(f"ops.conv2d_nhwc: x has no input channels ({x.shape})")
    if n * ho * wo == 0 or o == 0:
        return empty_like(x, (n, ho, wo, o))
    if not _implicit_ok(x.dtype, n, h, w, c, o, kh, kw, ho, wo):
        # float32, filters over 32x32, images of 2 GiB or more: through NCHW and im2col.
        w_oihw = weight if weight_layout == "oihw" else permute(weight, (0, 3, 1, 2))
        y = conv2d_im2col(permute(x, (0, 3, 1, 2)), w_oihw, bias, stride=stride, padding=padding)
        return permute(y, (0, 2, 3, 1))
    w_ohwi = cached_ohwi(weight) if weight_layout == "oihw" else weight
    return _run_nhwc(x, w_ohwi, bias, stride, padding, ho, wo)
