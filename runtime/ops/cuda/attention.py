"""ops.attention on the GPU: the fused FlashAttention-style kernel of kernels/attention.cu (bf16/fp16, D 64/128)."""

from __future__ import annotations

from .... import kernels
from ... import cuda, dtypes
from ...errors import ShapeError, UnsupportedDtypeError
from ...tensor import Tensor, empty

_DTYPES = (dtypes.bfloat16, dtypes.float16)
_HEAD_DIMS = (64, 128)


def _check_gpu(t: Tensor, name: str, device=None) -> None:
    """t is a GPU Tensor (on `device`, where given)."""
    if not isinstance(t, Tensor) or not t.is_cuda:
        raise ShapeError(f"ops.attention: {name} must be a GPU Tensor; move it with .to('cuda')")
    if device is not None and t.device is not device:
        raise ShapeError(f"ops.attention: {name} is on {t.device} but q is on {device}; move it with .to({device})")


def _strides(t: Tensor, name: str) -> tuple[int, int, int]:
    """Element strides of dims (B, S, H) of a [B, S, H, D] tensor, checked for the kernel's 16-byte loads."""
    st = [0 if n == 1 else s for n, s in zip(t.shape, t.strides, strict=True)]  # a size-1 dim's stride is never used
    if st[3] != 1:
        raise ShapeError(f"ops.attention: {name} needs a contiguous last (head) dim, got strides {t.strides}; "
                         "pass .contiguous()")
    if any(s % 8 for s in st[:3]) or t.data_ptr % 16:
        raise ShapeError(f"ops.attention: {name} rows must start on 16-byte boundaries (strides {t.strides} in "
                         "elements must be multiples of 8); pass .contiguous()")
    return st[0], st[1], st[2]


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              scale: float | None = None, out: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v per head, non-causal. q: [B, Sq, H, D], k, v: [B, Sk, H, D] of one dtype
    (bf16 or fp16; strided views with a contiguous last dim, e.g. slices of a fused [B, S, 3, H, D] QKV, are
    read in place); key_padding_mask: [B, Sk] bool, True = may be attended; scale defaults to D**-0.5.
    Returns [B, Sq, H, D] contiguous in q's dtype; a query whose keys are all masked gives zeros.
    `out`, when given, is a contiguous [B, Sq, H, D] tensor of q's dtype written instead of a new one."""
    _check_gpu(q, "q")
    device = q.device
    _check_gpu(k, "k", device)
    _check_gpu(v, "v", device)
    if q.dtype not in _DTYPES:
        raise UnsupportedDtypeError(f"ops.attention on the GPU takes bfloat16 or float16, got q of {q.dtype.name}; "
                                    "cast with ops.cast(q, 'bfloat16')")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise UnsupportedDtypeError(f"ops.attention: q, k and v must share one dtype, got {q.dtype.name}, "
                                    f"{k.dtype.name}, {v.dtype.name}; cast them with ops.cast")
    if q.ndim != 4:
        raise ShapeError(f"ops.attention: q must be [B, Sq, H, D], got {q.shape}")
    bsz, sq, nh, d = q.shape
    if k.ndim != 4 or k.shape[0] != bsz or k.shape[2:] != (nh, d):
        raise ShapeError(f"ops.attention: k must be [B, Sk, H, D] with B, H, D of q {q.shape}, got {k.shape}")
    if v.shape != k.shape:
        raise ShapeError(f"ops.attention: v must have k's shape {k.shape}, got {v.shape}")
    if d not in _HEAD_DIMS:
        raise ShapeError(f"ops.attention on the GPU supports head dims {_HEAD_DIMS}, got D={d}")
    sk = k.shape[1]

    mask_ptr, mask_sb = None, 0
    if key_padding_mask is not None:
        m = key_padding_mask
        _check_gpu(m, "key_padding_mask", device)
        if m.dtype != dtypes.bool_:
            raise UnsupportedDtypeError(f"ops.attention: key_padding_mask must be bool (True = attend), got "
                                        f"{m.dtype.name}; convert it to bool first")
        if m.shape != (bsz, sk):
            raise ShapeError(f"ops.attention: key_padding_mask must be [B, Sk] = {(bsz, sk)}, got {m.shape}")
        if sk > 1 and m.strides[1] != 1:
            raise ShapeError(f"ops.attention: key_padding_mask needs contiguous keys, got strides {m.strides}; "
                             "pass .contiguous()")
        mask_ptr, mask_sb = m.data_ptr, (0 if bsz == 1 else m.strides[0])

    shape = (bsz, sq, nh, d)
    if out is None:
        out = empty(shape, q.dtype, device)
    else:
        _check_gpu(out, "out", device)
        if out.shape != shape or out.dtype != q.dtype or not out.is_contiguous() or out.data_ptr % 16:
            raise ShapeError(f"ops.attention: out must be a contiguous, 16-byte aligned {shape} tensor of "
                             f"{q.dtype.name}, got {out.shape} {out.dtype.name}")
    if out.numel == 0:
        return out

    qs = _strides(q, "q")
    ks = _strides(k, "k") if sk > 0 else (0, 0, 0)
    vs = _strides(v, "v") if sk > 0 else (0, 0, 0)
    scale = d ** -0.5 if scale is None else float(scale)
    device.set_current()
    kernels.call("fdm_attention", q.data_ptr, k.data_ptr if sk > 0 else None, v.data_ptr if sk > 0 else None,
                 mask_ptr, out.data_ptr, bsz, sq, sk, nh, d, *qs, *ks, *vs, mask_sb, scale, q.dtype.code,
                 cuda.current_stream(device).handle)
    return out
