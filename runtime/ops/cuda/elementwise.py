"""ops.cuda elementwise ops: activations, GEGLU, softmax, add/mul with broadcasting, adaLN modulation and gated
residuals (kernels/elementwise.cu, kernels/norms.cu for softmax). float32 math; outputs in the input's dtype."""

from __future__ import annotations

import numpy as np

from ...errors import InvalidArgumentError, ShapeError, UnsupportedDtypeError
from ...tensor import Tensor
from ._common import (
    MAX_DIMS,
    call,
    check_float,
    check_same_dtype,
    collapse,
    contig,
    empty_like,
    gpu_device,
    int64_array,
    per_batch,
    rows_layout,
    stream,
)

# Activation codes of fdm_activation (enum Act in kernels/elementwise.cu).
_ACT_GELU, _ACT_GELU_TANH, _ACT_SILU, _ACT_QUICK_GELU = 0, 1, 2, 3
_BIN_ADD, _BIN_MUL = 0, 1
_APPROXIMATE = {"none": _ACT_GELU, "tanh": _ACT_GELU_TANH}


def _approximate(op: str, approximate: str) -> int:
    if approximate not in _APPROXIMATE:
        raise InvalidArgumentError(f"ops.{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _APPROXIMATE[approximate]


def _activation(op: str, x: Tensor, act: int) -> Tensor:
    device = gpu_device(op, x)
    check_float(op, x)
    x = contig(x)
    y = empty_like(x)
    call("fdm_activation", x.data_ptr, y.data_ptr, x.numel, act, x.dtype.code, stream(device))
    return y


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU; approximate "none" (erf) or "tanh"."""
    return _activation("gelu", x, _approximate("gelu", approximate))


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x) (CLIP)."""
    return _activation("quick_gelu", x, _ACT_QUICK_GELU)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return _activation("silu", x, _ACT_SILU)


def gelu_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """GEGLU: x [..., 2N] split in halves (h, g) -> h * gelu(g): [..., N]."""
    act = _approximate("gelu_mul", approximate)
    device = gpu_device("gelu_mul", x)
    check_float("gelu_mul", x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ShapeError(f"ops.gelu_mul: last dim must be even (2N), got shape {x.shape}")
    x = contig(x)
    n = x.shape[-1] // 2
    y = empty_like(x, x.shape[:-1] + (n,))
    call("fdm_gelu_mul", x.data_ptr, y.data_ptr, x.numel // max(2 * n, 1), n, int(act == _ACT_GELU_TANH),
         x.dtype.code, stream(device))
    return y


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along `axis` (float32 math; a row of all -inf gives NaN, as torch). Axes other than the last go
    through a permuted copy."""
    device = gpu_device("softmax", x)
    check_float("softmax", x)
    if not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"ops.softmax: axis {axis!r} is out of range for a tensor with {x.ndim} dims")
    axis = int(axis) % x.ndim
    if axis != x.ndim - 1:
        from .layout import permute

        order = [d for d in range(x.ndim) if d != axis] + [axis]
        inverse = [order.index(d) for d in range(x.ndim)]
        return permute(softmax(permute(x, order)), inverse)
    layout = rows_layout(x)
    if layout is None:
        x = contig(x)
        layout = rows_layout(x)
    rows, inner, so, si = layout
    d = x.shape[-1]
    y = empty_like(x)
    call("fdm_softmax", x.data_ptr, y.data_ptr, rows, inner, so, si, inner * d, d, d, x.dtype.code, stream(device))
    return y


def _binary(op: str, code: int, a: Tensor, b: Tensor | float, alpha: float) -> Tensor:
    device = gpu_device(op, a, b if isinstance(b, Tensor) else None)
    check_float(op, a, "a")
    a = contig(a)
    y = empty_like(a)
    if a.numel == 0:
        return y
    if isinstance(b, Tensor):
        check_same_dtype(op, a, b, "b")
        try:
            ok = np.broadcast_shapes(a.shape, b.shape) == a.shape
        except ValueError:
            ok = False
        if not ok:
            raise ShapeError(f"ops.{op}: b of shape {b.shape} does not broadcast to a's shape {a.shape}")
        b = contig(b)
        lead = a.ndim - b.ndim
        # b's element strides over a's shape: 0 on new leading dims and on broadcast (size-1) dims.
        bstrides = [0] * lead + [0 if nb == 1 else s for nb, s in zip(b.shape, b.strides, strict=True)]
        shape, (_, bst) = collapse(a.shape, a.strides, bstrides)
        b_ptr, scalar = b.data_ptr, 0.0
    else:
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, float, np.integer, np.floating)):
            raise UnsupportedDtypeError(f"ops.{op}: b must be a GPU Tensor or a real number, got {b!r}")
        shape, bst = [a.numel], [0]
        b_ptr, scalar = None, float(b)
    if len(shape) > MAX_DIMS:
        raise ShapeError(f"ops.{op}: broadcasting {b.shape} over {a.shape} needs {len(shape)} strided dims; the "
                         f"kernel takes {MAX_DIMS}. Make b contiguous in a's shape first.")
    call("fdm_binary", a.data_ptr, b_ptr, scalar, y.data_ptr, code, float(alpha), len(shape), int64_array(shape),
         int64_array(bst), a.dtype.code, stream(device))
    return y


def add(a: Tensor, b: Tensor | float, alpha: float = 1.0) -> Tensor:
    """a + alpha * b with numpy broadcasting of b to a's shape (b may be a Python number). b: a's dtype."""
    return _binary("add", _BIN_ADD, a, b, alpha)


def mul(a: Tensor, b: Tensor | float) -> Tensor:
    """a * b with numpy broadcasting of b to a's shape (b may be a Python number). b: a's dtype."""
    return _binary("mul", _BIN_MUL, a, b, 1.0)


def _check_bsd(op: str, x: Tensor) -> None:
    check_float(op, x)
    if x.ndim != 3:
        raise ShapeError(f"ops.{op}: x must be [B, S, D], got {x.shape}")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale[:, None]) + shift[:, None]. x: [B, S, D], shift, scale: [B, D]."""
    device = gpu_device("modulate", x, shift, scale)
    _check_bsd("modulate", x)
    shift, sb_shift = per_batch("modulate", shift, x, "shift")
    scale, sb_scale = per_batch("modulate", scale, x, "scale")
    x = contig(x)
    y = empty_like(x)
    b, s, d = x.shape
    call("fdm_modulate", x.data_ptr, shift.data_ptr, sb_shift, 0, scale.data_ptr, sb_scale, 0, y.data_ptr, b, s, d,
         x.dtype.code, stream(device))
    return y


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate[:, None] * y. x, y: [B, S, D], gate: [B, D]."""
    device = gpu_device("gated_residual", x, gate, y)
    _check_bsd("gated_residual", x)
    check_same_dtype("gated_residual", x, y, "y")
    if y.shape != x.shape:
        raise ShapeError(f"ops.gated_residual: y must have x's shape {x.shape}, got {y.shape}")
    gate, sb_gate = per_batch("gated_residual", gate, x, "gate")
    x, y = contig(x), contig(y)
    out = empty_like(x)
    b, s, d = x.shape
    call("fdm_gated_residual", x.data_ptr, gate.data_ptr, sb_gate, 0, y.data_ptr, out.data_ptr, b, s, d,
         x.dtype.code, stream(device))
    return out
