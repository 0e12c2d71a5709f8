"""Tiled VAE decoding, as diffusers' AutoencoderKL.tiled_decode: the latent is cut into overlapping square tiles
(stride = 3/4 of the tile), each tile is decoded alone, and each decoded tile's first quarter of rows and columns
is blended linearly with the neighbour above and to the left before the tiles are stitched. The result is the
same as diffusers' enable_tiling() decode; it differs from an untiled decode (GroupNorm statistics and the
mid-block attention see one tile), but has no seams.

`choose_tile` decides when to tile: on request, or when the untiled decode's activations would exceed a memory
budget, estimated from the shapes by the layers themselves (blocks.LayerStack.peak_bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...runtime import ops
from ...runtime.errors import InvalidArgumentError, OutOfMemoryError
from ...runtime.memory import format_bytes, memory_stats
from ...runtime.tensor import Tensor

OVERLAP = 0.25  # diffusers' tile_overlap_factor
MIN_TILE = 8  # smallest latent tile edge automatic tiling tries (64 pixels at f = 8)


def check_tile_arg(tile: Any) -> None:
    """Refuse tile values other than None, a bool or an int >= 2 (a latent edge of 1 leaves no overlap)."""
    if tile is None or isinstance(tile, (bool, np.bool_)):
        return
    if not isinstance(tile, (int, np.integer)) or tile < 2:
        raise InvalidArgumentError(f"AutoencoderKL.decode: tile must be None, True, False or a latent tile edge "
                                   f">= 2, got {tile!r}")


def available_bytes(device: Any) -> int | None:
    """Bytes a decode may use on `device`: the card's free memory plus blocks fastdm's pool caches; None on the
    CPU (no automatic tiling there)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    free, _ = device.mem_get_info()
    stats = memory_stats(device)
    return free + max(0, stats.reserved - stats.current)


def _starts(n: int, stride: int) -> list[int]:
    return list(range(0, n, stride))


def tiled_peak_bytes(model: Any, latent_shape: Sequence[int], tile: int) -> int:
    """Estimated activation bytes of `decode_tiled` with latent tiles of edge `tile`: one tile's decode plus the
    decoded tiles kept for blending and the stitched result."""
    b, c, h, w = (int(n) for n in latent_shape)
    f, s = model.config.spatial_factor, model.dtype.itemsize
    stride = int(tile * (1 - OVERLAP))
    n_tiles = len(_starts(h, stride)) * len(_starts(w, stride))
    tile_out = b * model.config.out_channels * (tile * f) ** 2 * s
    image = b * model.config.out_channels * h * w * f * f * s
    return model.decode_peak_bytes((b, c, min(tile, h), min(tile, w))) + n_tiles * tile_out + 2 * image


def choose_tile(model: Any, latent_shape: Sequence[int], tile: bool | int | None,
                memory_budget: int | None) -> int | None:
    """The latent tile edge to decode `latent_shape` with, or None to decode it whole (see AutoencoderKL.decode)."""
    check_tile_arg(tile)
    h, w = int(latent_shape[2]), int(latent_shape[3])
    if tile is not None:
        if not tile:
            return None
        size = model.config.tile_latent_size if tile is True else int(tile)
        if size < 2:
            raise InvalidArgumentError(f"AutoencoderKL.decode: the config's sample_size gives latent tiles of edge "
                                       f"{size}, too small to overlap; pass tile=<latent tile edge> instead")
        return size if h > size or w > size else None
    budget = memory_budget if memory_budget is not None else available_bytes(model.device)
    if budget is None:
        return None
    whole = model.decode_peak_bytes(latent_shape)
    if whole <= budget:
        return None
    size = max(model.config.tile_latent_size, MIN_TILE)
    tried = []
    while size >= MIN_TILE:
        if h > size or w > size:
            need = tiled_peak_bytes(model, latent_shape, size)
            if need <= budget:
                return size
            tried.append(f"{size} ({format_bytes(need)})")
        size //= 2
    raise OutOfMemoryError(
        f"AutoencoderKL.decode: a latent of shape {list(latent_shape)} needs about {format_bytes(whole)} of "
        f"activations untiled, and tiles of edge {', '.join(tried) or MIN_TILE} still exceed the budget of "
        f"{format_bytes(budget)}. Free GPU memory (offload or delete other models first), decode a smaller "
        f"batch, or pass a larger memory_budget.")


def _ramp(extent: int, like: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Blend weights (1 - y/extent, y/extent) for y < extent, shaped to broadcast along `axis` of an NCHW tile.
    float32 first, as torch multiplies by the Python float in float32."""
    y = np.arange(extent, dtype=np.float64) / extent
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weights = [np.asarray(v, dtype=np.float32).reshape(shape).astype(like.dtype.np) for v in (1.0 - y, y)]
    return (Tensor.from_numpy(weights[0], device=like.device), Tensor.from_numpy(weights[1], device=like.device))


def _blend(a: Tensor, b: Tensor, extent: int, axis: int) -> Tensor:
    """b with its first `extent` rows (axis 2) or columns (axis 3) replaced by a's last ones * (1 - y/extent) +
    b's * y/extent: diffusers' blend_v / blend_h, returning a new tile instead of writing into b."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    keep_a, take_b = _ramp(extent, b, axis)
    mixed = ops.add(ops.mul(a.narrow(axis, a.shape[axis] - extent, extent), keep_a),
                    ops.mul(b.narrow(axis, 0, extent), take_b))
    if b.shape[axis] == extent:
        return mixed
    return ops.concat([mixed, b.narrow(axis, extent, b.shape[axis] - extent)], axis=axis)


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, spatial_factor: int) -> Tensor:
    """diffusers' tiled_decode of z [B, C, h, w] with latent tiles of edge `tile`: decode(tile) for each tile,
    blend, stitch -> [B, out, f h, f w]."""
    b, c, h, w = z.shape
    tile_px = tile * spatial_factor
    stride = int(tile * (1 - OVERLAP))
    extent = int(tile_px * OVERLAP)
    keep = tile_px - extent
    rows = [[decode(z.narrow(2, i, min(tile, h - i)).narrow(3, j, min(tile, w - j))) for j in _starts(w, stride)]
            for i in _starts(h, stride)]
    stitched = []
    for i, row in enumerate(rows):
        pieces = []
        for j in range(len(row)):
            t = row[j]
            if i > 0:
                t = _blend(rows[i - 1][j], t, extent, axis=2)
            if j > 0:
                t = _blend(row[j - 1], t, extent, axis=3)
            row[j] = t  # diffusers blends in place: the tiles below and to the right read the blended tile
            pieces.append(t.narrow(2, 0, min(keep, t.shape[2])).narrow(3, 0, min(keep, t.shape[3])))
        stitched.append(pieces[0] if len(pieces) == 1 else ops.concat(pieces, axis=3))
    return stitched[0].contiguous() if len(stitched) == 1 else ops.concat(stitched, axis=2)
