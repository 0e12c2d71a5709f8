"""Pixels in and out of the VAE, as diffusers' VaeImageProcessor does it: decoded images in [-1, 1] to 8-bit PIL
images (postprocess, output_type="pil"), and PIL images to [-1, 1] arrays for encoding (preprocess, no resize)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ...runtime import dtypes
from ...runtime.errors import ShapeError
from ...runtime.tensor import Tensor

_f32 = np.float32


def denormalize(x: np.ndarray) -> np.ndarray:
    """(x * 0.5 + 0.5).clamp(0, 1) with torch's rounding: each op rounds to x's dtype, so a bf16 image from a bf16
    pipeline gives the same bytes as diffusers; returns float32 (torch's `.float()`)."""
    if x.dtype in (dtypes.bfloat16.np, dtypes.float16.np):
        half = (x.astype(_f32) * _f32(0.5)).astype(x.dtype)
        y = (half.astype(_f32) + _f32(0.5)).astype(x.dtype)
        return np.clip(y.astype(_f32), _f32(0), _f32(1))
    if x.dtype == np.float64:
        return np.clip(x * 0.5 + 0.5, 0.0, 1.0).astype(_f32)
    x = x.astype(_f32, copy=False)
    return np.clip(x * _f32(0.5) + _f32(0.5), _f32(0), _f32(1))


def to_pil(images: Tensor | np.ndarray) -> list[Image.Image]:
    """VAE output images [B, C, H, W] (or [C, H, W]) in [-1, 1], on any device, to 8-bit PIL images exactly as
    diffusers' VaeImageProcessor.postprocess(output_type="pil"): clamp((x / 2 + 0.5), 0, 1) in the image's dtype,
    then round(x * 255) in float32 (half to even, as numpy). 1 channel gives mode "L"; 3 or more give RGB (extra
    channels are dropped, as diffusers does)."""
    arr = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] == 0 or arr.shape[1] == 2:
        raise ShapeError(f"to_pil: images must be [B, C, H, W] (or [C, H, W]) with C = 1 or C >= 3, got shape "
                         f"{list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype not in (dtypes.bfloat16.np, dtypes.float16.np):
        raise ShapeError(f"to_pil: images must be floating-point values in [-1, 1], got {arr.dtype}")
    pixels = np.ascontiguousarray(denormalize(arr).transpose(0, 2, 3, 1))  # [B, H, W, C]
    pixels = (pixels * _f32(255)).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[:, :, 0], mode="L") for p in pixels]
    return [Image.fromarray(np.ascontiguousarray(p[:, :, :3])) for p in pixels]


def to_numpy(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] float32 in [0, 1] (diffusers' output_type="np")."""
    return np.ascontiguousarray(denormalize(images.numpy()).transpose(0, 2, 3, 1))


def from_pil(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
    """PIL images of one size to a float32 [B, C, H, W] array in [-1, 1] for `AutoencoderKL.encode`, as diffusers'
    VaeImageProcessor.preprocess without resizing: pixel / 255, then 2x - 1. Mode "L" gives C = 1, "RGB" C = 3;
    other modes are converted to RGB first."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for im in images:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        a = np.array(im).astype(_f32) / _f32(255)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    if not arrays:
        raise ShapeError("from_pil: no images given")
    if len({a.shape for a in arrays}) > 1:
        raise ShapeError(f"from_pil: the images differ in size or mode ({sorted({a.shape for a in arrays})}); "
                         "resize them to one size first")
    x = np.stack(arrays).transpose(0, 3, 1, 2)  # [B, C, H, W]
    return np.ascontiguousarray(_f32(2) * x - _f32(1))
