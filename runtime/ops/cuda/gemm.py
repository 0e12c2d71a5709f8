"""ops.cuda GEMM ops: linear (+ bias, GELU/SiLU, gated residual), batched matmul, and conv2d as im2col + GEMM
(`conv2d_im2col`: the fallback of ops.cuda.conv2d in conv.py for shapes the implicit-GEMM kernel cannot take).

The kernels (kernels/gemm*.cu, kernels/sm90/gemm_sm90.cu, kernels/im2col.cu) accumulate in float32 and return
the input's dtype. bf16/fp16 run on tensor cores (CUTLASS sm90 kernels on Hopper, sm80 kernels elsewhere) when
K and N are multiples of 8; other shapes and float32 run on a plain tiled kernel with exact fp32 math.
Each op takes an optional `out` (a contiguous tensor of the result's shape and dtype) to write into.
"""

from __future__ import annotations

import math

import numpy as np

from ... import dtypes
from ...errors import InvalidArgumentError, ShapeError
from ...tensor import Tensor, empty
from . import gemm_tuning
from ._common import call, check_float, check_same_dtype, contig, empty_like, gpu_device, stream

# Activation codes of fdm_linear (enum GemmAct in kernels/gemm.cuh).
_ACTIVATIONS = {None: 0, "gelu_tanh": 1, "gelu": 2, "silu": 3}
# Upper bound on conv2d's im2col scratch per chunk of output pixels; bigger means fewer, larger GEMMs.
_CONV_WORKSPACE_BYTES = 256 << 20


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr


def _output(op: str, out: Tensor | None, like: Tensor, shape: tuple[int, ...], inputs: tuple) -> Tensor:
    """A new [shape] tensor of like's dtype, or `out` after checking it fits and overlaps no input."""
    if out is None:
        return empty_like(like, shape)
    gpu_device(op, like, out)
    if out.shape != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ShapeError(f"ops.{op}: out must be a contiguous {shape} tensor of {like.dtype.name}, got "
                         f"{out.shape} {out.dtype.name}")
    lo, hi = out.data_ptr, out.data_ptr + out.nbytes
    for t in inputs:
        if t is not None and t.nbytes and out.nbytes and t.data_ptr < hi and lo < t.data_ptr + t.nbytes:
            raise ShapeError(f"ops.{op}: out overlaps an input; pass a separate buffer")
    return out


def _check_weight(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int]:
    """(N, K) of a [N, K] weight that fits x [..., K]; bias, when given, is [N]."""
    if weight.ndim != 2:
        raise ShapeError(f"ops.{op}: weight must be [N, K] (torch Linear layout), got shape {weight.shape}")
    n, k = weight.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ShapeError(f"ops.{op}: x's last dim must equal weight's K={k} (weight {weight.shape}), got x {x.shape}")
    if bias is not None and bias.shape != (n,):
        raise ShapeError(f"ops.{op}: bias must be [{n}], got {bias.shape}")
    return n, k


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           out: Tensor | None = None) -> Tensor:
    """act(x @ weight.T + bias). x: [..., K], weight: [N, K], bias: [N] -> [..., N]."""
    if activation not in _ACTIVATIONS:
        raise InvalidArgumentError(f"ops.linear: activation {activation!r} is not supported; use one of "
                                   f"{list(_ACTIVATIONS)}")
    device = gpu_device("linear", x, weight, bias)
    gemm_tuning.ensure_loaded(device)
    check_float("linear", x)
    check_same_dtype("linear", x, weight, "weight")
    check_same_dtype("linear", x, bias, "bias")
    n, k = _check_weight("linear", x, weight, bias)
    x, weight, bias = contig(x), contig(weight), contig(bias)
    m = math.prod(x.shape[:-1])
    y = _output("linear", out, x, x.shape[:-1] + (n,), (x, weight, bias))
    call("fdm_linear", x.data_ptr, weight.data_ptr, _ptr(bias), y.data_ptr, m, n, k, _ACTIVATIONS[activation],
         x.dtype.code, stream(device))
    return y


def linear_gated_residual(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, residual: Tensor,
                          out: Tensor | None = None) -> Tensor:
    """residual + gate[:, None, :] * (x @ weight.T + bias). x: [B, S, K], gate: [B, N], residual: [B, S, N]."""
    op = "linear_gated_residual"
    device = gpu_device(op, x, weight, bias, gate, residual)
    gemm_tuning.ensure_loaded(device)
    check_float(op, x)
    for t, name in ((weight, "weight"), (bias, "bias"), (gate, "gate"), (residual, "residual")):
        check_same_dtype(op, x, t, name)
    if x.ndim != 3:
        raise ShapeError(f"ops.{op}: x must be [B, S, K], got {x.shape}")
    n, k = _check_weight(op, x, weight, bias)
    bsz, s = x.shape[0], x.shape[1]
    if gate.shape != (bsz, n):
        raise ShapeError(f"ops.{op}: gate must be [B, N] = {(bsz, n)}, got {gate.shape}")
    if residual.shape != (bsz, s, n):
        raise ShapeError(f"ops.{op}: residual must be [B, S, N] = {(bsz, s, n)}, got {residual.shape}")
    x, weight, bias, gate, residual = contig(x), contig(weight), contig(bias), contig(gate), contig(residual)
    y = _output(op, out, x, (bsz, s, n), (x, weight, bias, gate, residual))
    call("fdm_linear_gated_residual", x.data_ptr, weight.data_ptr, _ptr(bias), gate.data_ptr, residual.data_ptr,
         y.data_ptr, bsz, s, n, k, x.dtype.code, stream(device))
    return y


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b. a: [..., M, K], b: [..., K, N] with the same leading dims as a, or [K, N] -> [..., M, N]."""
    device = gpu_device("matmul", a, b)
    check_float("matmul", a, "a")
    check_same_dtype("matmul", a, b, "b")
    if a.ndim < 2:
        raise ShapeError(f"ops.matmul: a must be [..., M, K], got {a.shape}")
    if not (b.ndim == 2 or (b.ndim == a.ndim and b.shape[:-2] == a.shape[:-2])):
        raise ShapeError(f"ops.matmul: b must be [K, N] or have a's leading dims {a.shape[:-2]}, got a {a.shape}, "
                         f"b {b.shape}")
    if b.shape[-2] != a.shape[-1]:
        raise ShapeError(f"ops.matmul: inner dims differ: a {a.shape} @ b {b.shape}")
    a, b = contig(a), contig(b)
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    batch = math.prod(a.shape[:-2])
    y = _output("matmul", out, a, a.shape[:-1] + (n,), (a, b))
    call("fdm_matmul", a.data_ptr, b.data_ptr, y.data_ptr, batch, m, n, k, int(b.ndim == 2), a.dtype.code,
         stream(device))
    return y


def _round8(v: int) -> int:
    return (v + 7) // 8 * 8


def conv2d_im2col(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
                  out: Tensor | None = None) -> Tensor:
    """2-D cross-correlation as torch.nn.functional.conv2d (groups=1, dilation=1, symmetric zero padding) through
    an im2col buffer and the GEMM paths: any shape and float dtype. ops.cuda.conv2d (conv.py) calls it for shapes
    its implicit GEMM rejects. x: [N, C, H, W], weight: [O, C, kh, kw], bias: [O] -> [N, O, Ho, Wo]."""
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise InvalidArgumentError(f"ops.conv2d: stride must be an int >= 1, got {stride!r}")
    if not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or padding < 0:
        raise InvalidArgumentError(f"ops.conv2d: padding must be an int >= 0, got {padding!r}")
    device = gpu_device("conv2d", x, weight, bias)
    check_float("conv2d", x)
    check_same_dtype("conv2d", x, weight, "weight")
    check_same_dtype("conv2d", x, bias, "bias")
    if x.ndim != 4:
        raise ShapeError(f"ops.conv2d: x must be [N, C, H, W], got {x.shape}")
    if weight.ndim != 4:
        raise ShapeError(f"ops.conv2d: weight must be [O, C, kh, kw], got {weight.shape}")
    n, c, h, w = x.shape
    o, cw, kh, kw = weight.shape
    if cw != c:
        raise ShapeError(f"ops.conv2d: weight has {cw} input channels, x has {c} (x {x.shape}, weight "
                         f"{weight.shape})")
    if bias is not None and bias.shape != (o,):
        raise ShapeError(f"ops.conv2d: bias must be [{o}], got {bias.shape}")
    if h + 2 * padding < kh or w + 2 * padding < kw:
        raise ShapeError(f"ops.conv2d: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * padding}x{w + 2 * padding}")
    stride, padding = int(stride), int(padding)
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    x, weight, bias = contig(x), contig(weight), contig(bias)
    y = _output("conv2d", out, x, (n, o, ho, wo), (x, weight, bias))
    rows = n * ho * wo
    if rows == 0 or o == 0:
        return y
    if c == 0:
        raise ShapeError(f"ops.conv2d: x has no input channels ({x.shape})")

    # Scratch layout of kernels/im2col.cu: padded weight + bias (only used when C*kh*kw or O is not a multiple
    # of 8, always reserved here), then im2col rows and GEMM rows for one chunk of output pixels.
    kp, op = _round8(c * kh * kw), _round8(o)
    itemsize = x.dtype.itemsize
    per_row = (kp + op) * itemsize
    chunk = min(rows, max(1, _CONV_WORKSPACE_BYTES // per_row))
    ws_bytes = (op * kp + op) * itemsize + chunk * per_row
    workspace = empty((ws_bytes,), dtypes.uint8, device)
    call("fdm_conv2d", x.data_ptr, weight.data_ptr, _ptr(bias), y.data_ptr, workspace.data_ptr, ws_bytes, n, c, h, w,
         o, kh, kw, stride, stride, padding, padding, x.dtype.code, stream(device))
    return y
