"""ops.cuda norms and RoPE: layer_norm, layer_norm_modulate, rms_norm, group_norm, rope, qk_norm_rope
(kernels/norms.cu, kernels/rope.cu). float32 statistics; outputs in the input's dtype."""

from __future__ import annotations

from ... import dtypes
from ...cuda import Device
from ...errors import InvalidArgumentError, ShapeError, UnsupportedDtypeError
from ...tensor import Tensor, empty
from .. import cpu
from ._common import (
    call,
    check_float,
    check_same_dtype,
    contig,
    empty_like,
    gpu_device,
    per_batch,
    rows_layout,
    stream,
)
from .layout import concat

# Bytes of x in the smallest GroupNorm piece (32 KiB: one tile of 512 threads x 4 packs of 16 bytes). This sizes the
# workspace (statistics of every piece); the kernels run fewer, longer pieces when that keeps their grid to one
# wave of resident blocks.
_GROUP_CHUNK_BYTES = 32768
_MAX_GRID_Y = 65535
# Channels-last GroupNorm (nhwc_chunks): the most statistics blocks per SM over the whole launch (the kernel runs
# one full wave of resident blocks, 3-6 per SM depending on the row width, so this only bounds the workspace), and
# the least x a block reads, so its shared-memory reduction stays a small part of its time.
_NHWC_MAX_BLOCKS_PER_SM = 8
_NHWC_MIN_CHUNK_BYTES = 16384


def _rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """x (copied when its leading dims need more than two strides) and its row layout."""
    layout = rows_layout(x)
    if layout is None:
        x = contig(x)
        layout = rows_layout(x)
    return x, layout


def _check_groups(op: str, c: int, num_groups, where: str = "") -> None:
    """num_groups an int >= 1 that splits the c channels (`where` says which dim they are)."""
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise InvalidArgumentError(f"ops.{op}: num_groups must be an int >= 1, got {num_groups!r}")
    if c % num_groups:
        raise ShapeError(f"ops.{op}: {c} channels{where} do not split into {num_groups} groups")


def _vector(op: str, v: Tensor | None, n: int, x: Tensor, name: str) -> Tensor | None:
    """A per-feature vector (weight, bias) of shape [n] in x's dtype, contiguous."""
    if v is None:
        return None
    check_same_dtype(op, x, v, name)
    if v.shape != (n,):
        raise ShapeError(f"ops.{op}: {name} must have shape ({n},), got {v.shape}")
    return contig(v)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim; weight/bias [D] optional. x may be a strided view (contiguous last dim)."""
    device = gpu_device("layer_norm", x, weight, bias)
    check_float("layer_norm", x)
    if x.ndim < 1:
        raise ShapeError("ops.layer_norm: x must have at least 1 dim")
    d = x.shape[-1]
    weight = _vector("layer_norm", weight, d, x, "weight")
    bias = _vector("layer_norm", bias, d, x, "bias")
    x, (rows, inner, so, si) = _rows(x)
    y = empty_like(x)
    call("fdm_layer_norm", x.data_ptr, weight.data_ptr if weight is not None else None,
         bias.data_ptr if bias is not None else None, y.data_ptr, rows, inner, so, si, inner * d, d, d, float(eps),
         x.dtype.code, stream(device))
    return y


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """layer_norm(x, no affine) * (1 + scale[:, None]) + shift[:, None] in one pass. x: [B, S, D];
    shift, scale: [B, D] (row-strided views such as chunks of one [B, 6D] modulation output are read in place)."""
    device = gpu_device("layer_norm_modulate", x, shift, scale)
    check_float("layer_norm_modulate", x)
    if x.ndim != 3:
        raise ShapeError(f"ops.layer_norm_modulate: x must be [B, S, D], got {x.shape}")
    shift, sb_shift = per_batch("layer_norm_modulate", shift, x, "shift")
    scale, sb_scale = per_batch("layer_norm_modulate", scale, x, "scale")
    if sb_shift != sb_scale:  # the kernel walks both with one stride
        shift, scale = contig(shift), contig(scale)
        sb_shift = sb_scale = x.shape[2] if x.shape[0] > 1 else 0
    b, s, d = x.shape
    # Rows are (batch, token) so the kernel finds the batch of a row as its outer index.
    xs = x.strides
    if d > 1 and xs[2] != 1:
        x = contig(x)
        xs = x.strides
    y = empty_like(x)
    if y.numel == 0:
        return y
    call("fdm_layer_norm_modulate", x.data_ptr, shift.data_ptr, scale.data_ptr, sb_shift, 0, y.data_ptr, b * s, s,
         xs[0] if b > 1 else 0, xs[1] if s > 1 else 0, s * d, d, d, float(eps), x.dtype.code, stream(device))
    return y


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, float32 math. x may be a strided view with a
    contiguous last dim, e.g. the q heads [B, S, H, D] of a fused [B, S, 3, H, D] QKV buffer, read in place.
    `out` (x's shape and dtype, contiguous last dim; may be x itself) is written instead of a new tensor."""
    device = gpu_device("rms_norm", x, weight, out)
    check_float("rms_norm", x)
    if x.ndim < 1:
        raise ShapeError("ops.rms_norm: x must have at least 1 dim")
    d = x.shape[-1]
    weight = _vector("rms_norm", weight, d, x, "weight")
    x, (rows, inner, so, si) = _rows(x)
    yo, yi = inner * d, d  # a contiguous output in x's row split
    if out is None:
        out = empty_like(x)
    else:
        _check_out("rms_norm", out, x)
        if not out.is_contiguous():
            layout = rows_layout(out)
            if layout is None or (rows > 0 and layout[1] != inner):
                raise ShapeError(f"ops.rms_norm: out (strides {out.strides}) must be contiguous or split into rows "
                                 f"like x (strides {x.strides}); pass a contiguous out")
            yo, yi = layout[2], layout[3]
    call("fdm_rms_norm", x.data_ptr, weight.data_ptr if weight is not None else None, out.data_ptr, rows, inner,
         so, si, yo, yi, d, float(eps), x.dtype.code, stream(device))
    return out


def _check_out(op: str, out: Tensor, x: Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ShapeError(f"ops.{op}: out must be {x.shape} {x.dtype.name}, got {out.shape} {out.dtype.name}")


def group_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, num_groups: int,
               eps: float = 1e-5, activation: str | None = None, channels_last: bool = False,
               stats: NhwcGroupStats | None = None) -> Tensor:
    """GroupNorm over x [N, C, *spatial] (C split into num_groups), per-channel affine, then optional "silu".
    channels_last=True: x is [N, *spatial, C] (kernels/group_norm_nhwc.cu); stats: x's group moments from
    add_group_stats (then only the apply pass runs)."""
    device = gpu_device("group_norm", x, weight, bias)
    check_float("group_norm", x)
    if activation not in (None, "silu"):
        raise InvalidArgumentError(f"ops.group_norm: activation must be None or 'silu', got {activation!r}")
    if x.ndim < 2:
        layout = "[N, *spatial, C] (channels_last)" if channels_last else "[N, C, *spatial]"
        raise ShapeError(f"ops.group_norm: x must be {layout}, got {x.shape}")
    n, c = x.shape[0], x.shape[-1 if channels_last else 1]
    _check_groups("group_norm", c, num_groups, " (the last dim of x [N, *spatial, C])" if channels_last else "")
    if channels_last:
        return _group_norm_nhwc(x, weight, bias, num_groups, eps, activation, device, stats)
    if stats is not None:
        raise ShapeError("ops.group_norm: stats are for channels-last tensors; pass channels_last=True")
    if n * num_groups > _MAX_GRID_Y:
        raise ShapeError(f"ops.group_norm: batch {n} x {num_groups} groups exceeds {_MAX_GRID_Y}; "
                         "split the batch into smaller pieces")
    weight = _vector("group_norm", weight, c, x, "weight")
    bias = _vector("group_norm", bias, c, x, "bias")
    x = contig(x)
    hw = x.numel // max(n * c, 1)
    y = empty_like(x)
    if x.numel == 0:
        return y
    group_len = (c // num_groups) * hw
    chunk = _GROUP_CHUNK_BYTES // x.itemsize
    chunks = min(max(-(-group_len // chunk), 1), _MAX_GRID_Y)
    ws = empty((n * num_groups * chunks * 2,), dtypes.float32, device)
    call("fdm_group_norm", x.data_ptr, weight.data_ptr if weight is not None else None,
         bias.data_ptr if bias is not None else None, y.data_ptr, ws.data_ptr, chunks, n, c, hw, num_groups,
         float(eps), int(activation == "silu"), x.dtype.code, stream(device))
    return y


def nhwc_chunks(n: int, s: int, row_bytes: int, sm_count: int, blocks_per_sm: int = _NHWC_MAX_BLOCKS_PER_SM) -> int:
    """The most row chunks per sample (one statistics block each) fdm_group_norm_nhwc may use, which sizes its
    workspace: blocks_per_sm blocks per SM over the batch, no chunk under _NHWC_MIN_CHUNK_BYTES of x
    (tiny tensors get few blocks), never more chunks than rows or than the grid allows; with rpc = ceil(s / chunks)
    rows each, ceil(s / rpc) of them (none empty). The kernel runs min(this, one wave of resident blocks);
    fdm_add_group_stats_nhwc runs exactly this many."""
    want = -(-(blocks_per_sm * sm_count) // max(n, 1))
    min_rows = max(1, -(-_NHWC_MIN_CHUNK_BYTES // max(row_bytes, 1)))
    chunks = max(1, min(want, -(-s // min_rows), _MAX_GRID_Y))
    rpc = -(-s // chunks)
    return -(-s // rpc)


def nhwc_workspace_elems(n: int, c: int, num_groups: int, chunks: int) -> int:
    """float32 elements of fdm_group_norm_nhwc's workspace: per-chunk group statistics [N, G, chunks, 2], then
    the per-channel scale, shift and reference [N, C] each (the formula kernels/group_norm_nhwc.cu checks)."""
    return n * num_groups * chunks * 2 + 3 * n * c


class NhwcGroupStats:
    """ops.cuda's payload of ops.GroupStats: the workspace fdm_add_group_stats_nhwc left the per-chunk group moments
    in (fdm_group_norm_nhwc's layout), the chunk count it ran with, and the [N, S, C] sizes it ran over."""

    def __init__(self, ws: Tensor, chunks: int, sizes: tuple[int, int, int]):
        self.ws, self.chunks, self.sizes = ws, chunks, sizes


def _check_nhwc_batch(op: str, n: int) -> None:
    if n > _MAX_GRID_Y:
        raise ShapeError(f"ops.{op}: batch {n} exceeds {_MAX_GRID_Y} for x [N, *spatial, C]; split the batch into "
                         "smaller pieces")


def _group_norm_nhwc(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float,
                     activation: str | None, device: Device, stats: NhwcGroupStats | None) -> Tensor:
    """group_norm of channels-last x [N, *spatial, C] (x, num_groups checked by group_norm); with `stats` (x's,
    from add_group_stats) the apply pass only."""
    n, c = x.shape[0], x.shape[-1]
    _check_nhwc_batch("group_norm", n)
    weight = _vector("group_norm", weight, c, x, "weight")
    bias = _vector("group_norm", bias, c, x, "bias")
    x = contig(x)  # x: [N, S, C] with S the product of the spatial dims
    y = empty_like(x)
    if x.numel == 0:
        return y
    s = x.numel // (n * c)
    w_ptr = weight.data_ptr if weight is not None else None
    b_ptr = bias.data_ptr if bias is not None else None
    if stats is not None:
        if stats.sizes != (n, s, c):
            raise ShapeError(f"ops.group_norm: stats are of a [N, S, C] = {stats.sizes} tensor, x is {(n, s, c)}")
        call("fdm_group_norm_nhwc_apply", x.data_ptr, w_ptr, b_ptr, y.data_ptr, stats.ws.data_ptr, stats.ws.numel,
             stats.chunks, n, s, c, num_groups, float(eps), int(activation == "silu"), x.dtype.code, stream(device))
        return y
    chunks = nhwc_chunks(n, s, c * x.itemsize, device.multiprocessor_count)
    ws_elems = nhwc_workspace_elems(n, c, num_groups, chunks)
    ws = empty((ws_elems,), dtypes.float32, device)
    call("fdm_group_norm_nhwc", x.data_ptr, w_ptr, b_ptr, y.data_ptr, ws.data_ptr, ws_elems, chunks, n, s, c,
         num_groups, float(eps), int(activation == "silu"), x.dtype.code, stream(device))
    return y


# Statistics blocks per SM of fdm_add_group_stats_nhwc over the batch: one wave at the 2 blocks of 256 threads an SM
# its kernel is built for (__launch_bounds__ in kernels/group_norm_nhwc.cu).
_ADD_STATS_BLOCKS_PER_SM = 2
_CONCAT_STATS_BLOCKS_PER_SM = 3  # fdm_concat_group_stats_nhwc: one load a pack, 3 blocks an SM as GroupNorm's own
# Under this many bytes of concatenation the statistics are not taken: concat + GroupNorm pairs of the SDXL UNet's
# up blocks, H100, us, without / with them: [2,32,32,1280+1280] 24.1 / 32.1 and [2,32,32,1280+640] 20.8 / 22.9
# (wide rows, few rows a chunk: the statistics kernel's per-block merge dominates), [2,64,64,640+320] (15.7 MB) 32.6 /
# 31.3, [2,64,64,1280+640] 53.9 / 53.1, [2,128,128,640+320] 123.1 / 102.6 (the GroupNorm's three-kernel path).
_CONCAT_STATS_MIN_BYTES = 12 << 20


def _producer_workspace(device: Device, n: int, s: int, c: int, num_groups: int, itemsize: int,
                        blocks_per_sm: int) -> tuple[Tensor, int]:
    """A statistics producer's workspace for out [n, s, c] and the exact chunk count it runs (nhwc_chunks at
    blocks_per_sm), both carried to the apply pass in NhwcGroupStats."""
    chunks = nhwc_chunks(n, s, c * itemsize, device.multiprocessor_count, blocks_per_sm)
    return empty((nhwc_workspace_elems(n, c, num_groups, chunks),), dtypes.float32, device), chunks


def add_group_stats(a: Tensor, b: Tensor, *, num_groups: int, alpha: float = 1.0) -> tuple[Tensor, NhwcGroupStats]:
    """add(a, b, alpha) of channels-last a [N, *spatial, C] (b: a's shape or [N, 1, ..., 1, C]) and the per-chunk
    moments of the result's groups (kernels/group_norm_nhwc.cu), for group_norm(..., stats=)."""
    device = gpu_device("add_group_stats", a, b)
    check_float("add_group_stats", a, "a")
    check_same_dtype("add_group_stats", a, b, "b")
    if a.ndim < 2:
        raise ShapeError(f"ops.add_group_stats: a must be channels-last [N, *spatial, C], got {a.shape}")
    n, c = a.shape[0], a.shape[-1]
    _check_groups("add_group_stats", c, num_groups)
    per_sample = cpu.per_sample_shape(a.shape)
    if b.shape not in (a.shape, per_sample):
        raise ShapeError(f"ops.add_group_stats: b must have a's shape {a.shape} or one row a sample {per_sample}, "
                         f"got {b.shape}; use ops.add for other broadcasts")
    _check_nhwc_batch("add_group_stats", n)
    a, b = contig(a), contig(b)
    out = empty_like(a)
    s = a.numel // max(n * c, 1)
    ws, chunks = _producer_workspace(device, n, s, c, num_groups, a.itemsize, _ADD_STATS_BLOCKS_PER_SM)
    if a.numel:
        call("fdm_add_group_stats_nhwc", a.data_ptr, b.data_ptr, int(b.shape != a.shape), float(alpha), out.data_ptr,
             ws.data_ptr, ws.numel, chunks, n, s, c, num_groups, a.dtype.code, stream(device))
    return out, NhwcGroupStats(ws, chunks, (n, s, c))


def concat_group_stats(a: Tensor, b: Tensor, *, num_groups: int) -> tuple[Tensor, NhwcGroupStats | None]:
    """concat([a, b], axis=-1) of channels-last a [N, *spatial, Ca] and b [N, *spatial, Cb] and the per-chunk moments
    of the result's groups (kernels/group_norm_nhwc.cu), for group_norm(..., stats=); None instead of the moments
    under _CONCAT_STATS_MIN_BYTES of result (the GroupNorm then takes its own)."""
    device = gpu_device("concat_group_stats", a, b)
    check_float("concat_group_stats", a, "a")
    check_same_dtype("concat_group_stats", a, b, "b")
    if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-1] != b.shape[:-1]:
        raise ShapeError(f"ops.concat_group_stats: a and b must be channels-last [N, *spatial, C] with the same N and "
                         f"spatial sizes, got {a.shape} and {b.shape}")
    n, ca, cb = a.shape[0], a.shape[-1], b.shape[-1]
    c = ca + cb
    _check_groups("concat_group_stats", c, num_groups)
    _check_nhwc_batch("concat_group_stats", n)
    if (a.numel + b.numel) * a.itemsize < _CONCAT_STATS_MIN_BYTES:
        return concat([a, b], axis=a.ndim - 1), None
    a, b = contig(a), contig(b)
    out = empty(a.shape[:-1] + (c,), a.dtype, device)
    s = out.numel // max(n * c, 1)
    ws, chunks = _producer_workspace(device, n, s, c, num_groups, a.itemsize, _CONCAT_STATS_BLOCKS_PER_SM)
    if out.numel:
        call("fdm_concat_group_stats_nhwc", a.data_ptr, b.data_ptr, ca, cb, out.data_ptr, ws.data_ptr, ws.numel, chunks,
             n, s, num_groups, a.dtype.code, stream(device))
    return out, NhwcGroupStats(ws, chunks, (n, s, c))


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = True, out: Tensor | None = None) -> Tensor:
    """Rotary embedding of x [B, S, H, D] with cos, sin float32 [S, D/2]; pairs (x[2i], x[2i+1]) when interleaved,
    else (x[i], x[i + D/2]). x may be a strided view (contiguous last dim), e.g. q or k of a fused QKV buffer.
    `out` (x's shape and dtype, contiguous last dim; may be x itself for in place) is written instead of a new
    tensor."""
    device = gpu_device("rope", x, cos, sin, out)
    check_float("rope", x)
    if x.ndim != 4:
        raise ShapeError(f"ops.rope: x must be [B, S, H, D], got {x.shape}")
    b, s, h, d = x.shape
    if d % 2:
        raise ShapeError(f"ops.rope: head dim D must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != dtypes.float32:
            raise UnsupportedDtypeError(f"ops.rope: {name} must be float32 (the angles need its precision), got "
                             f"{t.dtype.name}; build it in float32")
        if t.shape != (s, d // 2):
            raise ShapeError(f"ops.rope: {name} must be [S, D/2] = {(s, d // 2)} for x {x.shape}, got {t.shape}")
    cos, sin = contig(cos), contig(sin)
    if d > 1 and x.strides[3] != 1:
        x = contig(x)
    if out is None:
        out = empty_like(x)
    else:
        _check_out("rope", out, x)
        if d > 1 and out.strides[3] != 1:
            raise ShapeError(f"ops.rope: out needs a contiguous last dim, got strides {out.strides}")

    def st(t: Tensor) -> list[int]:  # a size-1 dim's stride is never used; 0 keeps the alignment checks simple
        return [0 if n == 1 else v for n, v in zip(t.shape[:3], t.strides[:3], strict=True)]

    call("fdm_rope", x.data_ptr, out.data_ptr, cos.data_ptr, sin.data_ptr, b, s, h, d, *st(x), *st(out),
         int(bool(interleaved)), x.dtype.code, stream(device))
    return out


def _qkv_strides(t: Tensor) -> list[int]:
    """Element strides of [B, S, 3, H, D] over B, S, the q/k/v dim and H; 0 for size-1 dims (never stepped, and 0
    keeps the kernel's alignment checks simple)."""
    return [0 if n == 1 else v for n, v in zip(t.shape[:4], t.strides[:4], strict=True)]


def qk_norm_rope(qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor, sin: Tensor,
                 eps: float = 1e-6, interleaved: bool = True,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm over D of q and k (weights q_weight, k_weight [D], or None) then RoPE (cos, sin float32 [S, D/2]),
    v copied, in one kernel. qkv: [B, S, 3, H, D] with a contiguous last dim (e.g. the fused QKV projection output
    viewed as such). Returns q, k, v: [B, S, H, D] views of `out`, a new contiguous [B, S, 3, H, D] tensor unless
    given: out may be qkv itself (in place; v is then not touched) or a strided view with a contiguous last dim, e.g.
    a token range of a larger buffer (so two streams can be written side by side without a concat)."""
    device = gpu_device("qk_norm_rope", qkv, q_weight, k_weight, cos, sin, out)
    check_float("qk_norm_rope", qkv, "qkv")
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ShapeError(f"ops.qk_norm_rope: qkv must be [B, S, 3, H, D], got {qkv.shape}")
    b, s, _, h, d = qkv.shape
    if d % 2:
        raise ShapeError(f"ops.qk_norm_rope: head dim D must be even, got {d}")
    q_weight = _vector("qk_norm_rope", q_weight, d, qkv, "q_weight")
    k_weight = _vector("qk_norm_rope", k_weight, d, qkv, "k_weight")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != dtypes.float32:
            raise UnsupportedDtypeError(f"ops.qk_norm_rope: {name} must be float32 (the angles need its precision), "
                                        f"got {t.dtype.name}; build it in float32")
        if t.shape != (s, d // 2):
            raise ShapeError(f"ops.qk_norm_rope: {name} must be [S, D/2] = {(s, d // 2)} for qkv {qkv.shape}, got "
                             f"{t.shape}")
    cos, sin = contig(cos), contig(sin)
    if d > 1 and qkv.strides[4] != 1:
        qkv = contig(qkv)
    if out is None:
        out = empty_like(qkv)
    else:
        _check_out("qk_norm_rope", out, qkv)
        if d > 1 and out.strides[4] != 1:
            raise ShapeError(f"ops.qk_norm_rope: out needs a contiguous last dim, got strides {out.strides}")
    xs, ys = _qkv_strides(qkv), _qkv_strides(out)
    in_place = out.data_ptr == qkv.data_ptr and xs == ys
    if qkv.numel:
        call("fdm_qk_norm_rope", qkv.data_ptr, q_weight.data_ptr if q_weight is not None else None,
             k_weight.data_ptr if k_weight is not None else None, cos.data_ptr, sin.data_ptr, out.data_ptr, b, s, h,
             d, *xs, *ys, float(eps), int(not in_place), int(bool(interleaved)), qkv.dtype.code, stream(device))
    return out[:, :, 0], out[:, :, 1], out[:, :, 2]
