"""AutoencoderKL, the 2-D VAE of FLUX.1, SDXL and SD3, computing what diffusers' AutoencoderKL computes, on
fastdm's op API.

Encoder: conv_in, down blocks (resnets, then a stride-2 conv except in the last block), mid block (resnet,
single-head self-attention, resnet), GroupNorm-SiLU-conv_out -> moments [B, 2 * latent, H/f, W/f] (f = 2^(blocks-1),
8 at full size), optionally through the 1x1 quant_conv. Decoder: the mirror image (post_quant_conv, conv_in, mid
block, up blocks of layers_per_block + 1 resnets with nearest-2x upsampling, GroupNorm-SiLU-conv_out).

`decode(latents)` runs the VAE alone: pipelines first map the denoiser's latents back with `unscale`. Large
latents can be decoded in overlapping tiles blended like diffusers' tiled_decode (tiling.py), chosen
automatically when a memory budget would be exceeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime import ops
from ...runtime.dtypes import DType
from ...runtime.errors import ModelLayoutError, ShapeError
from ...runtime.tensor import Tensor
from ..loading import check_model_weights, component_folder, load_weights, read_config
from .blocks import Conv2d, Downsample2D, LayerStack, NormActConv, ResnetBlock2D, SpatialSelfAttention, Upsample2D
from .tiling import choose_tile, decode_tiled

WHAT = "VAE (AutoencoderKL)"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this
OP_WORKSPACE_BYTES = 1 << 20  # allowance for small per-op scratch (GroupNorm statistics) in memory estimates


# ------------------------------------------------------------------------------------------------- config
@dataclass
class AutoencoderKLConfig:
    """The fields of an AutoencoderKL config.json (defaults are diffusers' defaults). down/up_block_types None
    means the standard block for every entry of block_out_channels."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] | None = None
    up_block_types: Sequence[str] | None = None
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | Sequence[int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True  # diffusers pipelines decode in float32 when the VAE is fp16; kept for pipelines
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        problems = []
        for field, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, field)
            if types is not None and (len(types) != n or any(t != kind for t in types)):
                problems.append(f"{field} {list(types)} (fastdm runs {n} x {kind}, one per block_out_channels)")
        if self.act_fn != "silu":
            problems.append(f"act_fn {self.act_fn!r} (only 'silu' is used by the published VAEs)")
        groups = self.norm_num_groups
        if n == 0 or groups < 1 or any(c % groups for c in self.block_out_channels):
            problems.append(f"block_out_channels {list(self.block_out_channels)} (each must split into "
                            f"norm_num_groups={self.norm_num_groups} groups)")
        for field in ("latents_mean", "latents_std"):
            v = getattr(self, field)
            if v is not None and len(v) != self.latent_channels:
                problems.append(f"{field} has {len(v)} values for latent_channels={self.latent_channels}")
        if problems:
            raise ModelLayoutError("AutoencoderKL config: unsupported " + "; ".join(problems) + ". The config.json "
                                   "does not describe a VAE fastdm can run.")

    @property
    def spatial_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for the published VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_latent_size(self) -> int:
        """Latent tile edge of diffusers' enable_tiling(): sample_size / spatial_factor."""
        size = self.sample_size[0] if isinstance(self.sample_size, (list, tuple)) else self.sample_size
        return int(size / self.spatial_factor)


def _resnet_shapes(shapes: dict, prefix: str, cin: int, cout: int) -> None:
    shapes[prefix + "norm1.weight"] = shapes[prefix + "norm1.bias"] = (cin,)
    shapes[prefix + "conv1.weight"], shapes[prefix + "conv1.bias"] = (cout, cin, 3, 3), (cout,)
    shapes[prefix + "norm2.weight"] = shapes[prefix + "norm2.bias"] = (cout,)
    shapes[prefix + "conv2.weight"], shapes[prefix + "conv2.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        shapes[prefix + "conv_shortcut.weight"], shapes[prefix + "conv_shortcut.bias"] = (cout, cin, 1, 1), (cout,)


def _mid_shapes(shapes: dict, prefix: str, c: int, attention: bool) -> None:
    for i in range(2):
        _resnet_shapes(shapes, f"{prefix}resnets.{i}.", c, c)
    if attention:
        a = prefix + "attentions.0."
        shapes[a + "group_norm.weight"] = shapes[a + "group_norm.bias"] = (c,)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{a}{proj}.weight"], shapes[f"{a}{proj}.bias"] = (c, c), (c,)


def expected_weights(cfg: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers AutoencoderKL state dict with its shape."""
    ch, lat = cfg.block_out_channels, cfg.latent_channels
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = (o, i, k, k), (o,)

    conv("encoder.conv_in", ch[0], cfg.in_channels, 3)
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(cfg.layers_per_block):
            _resnet_shapes(shapes, f"encoder.down_blocks.{i}.resnets.{j}.", prev if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
        prev = c
    _mid_shapes(shapes, "encoder.mid_block.", ch[-1], cfg.mid_block_add_attention)
    shapes["encoder.conv_norm_out.weight"] = shapes["encoder.conv_norm_out.bias"] = (ch[-1],)
    conv("encoder.conv_out", 2 * lat, ch[-1], 3)

    conv("decoder.conv_in", ch[-1], lat, 3)
    _mid_shapes(shapes, "decoder.mid_block.", ch[-1], cfg.mid_block_add_attention)
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        for j in range(cfg.layers_per_block + 1):
            _resnet_shapes(shapes, f"decoder.up_blocks.{i}.resnets.{j}.", prev if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        prev = c
    shapes["decoder.conv_norm_out.weight"] = shapes["decoder.conv_norm_out.bias"] = (ch[0],)
    conv("decoder.conv_out", cfg.out_channels, ch[0], 3)

    if cfg.use_quant_conv:
        conv("quant_conv", 2 * lat, 2 * lat, 1)
    if cfg.use_post_quant_conv:
        conv("post_quant_conv", lat, lat, 1)
    return shapes


# ---------------------------------------------------------------------------------------- encoder, decoder
def _mid_block(w: dict[str, Tensor], prefix: str, cfg: AutoencoderKLConfig) -> list:
    g, c = cfg.norm_num_groups, cfg.block_out_channels[-1]
    layers: list = [ResnetBlock2D(w, prefix + "resnets.0.", g, c, c)]
    if cfg.mid_block_add_attention:
        layers.append(SpatialSelfAttention(w, prefix + "attentions.0.", g, c))
    layers.append(ResnetBlock2D(w, prefix + "resnets.1.", g, c, c))
    return layers


def build_encoder(w: dict[str, Tensor], cfg: AutoencoderKLConfig) -> LayerStack:
    """images [B, in, H, W] -> moments [B, 2 * latent, H/f, W/f] (quant_conv not included)."""
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    layers: list = [Conv2d(w, "encoder.conv_in", padding=1)]
    prev = ch[0]
    for i, c in enumerate(ch):
        p = f"encoder.down_blocks.{i}."
        for j in range(cfg.layers_per_block):
            layers.append(ResnetBlock2D(w, f"{p}resnets.{j}.", g, prev if j == 0 else c, c))
        if i < len(ch) - 1:
            layers.append(Downsample2D(w, p + "downsamplers.0."))
        prev = c
    layers += _mid_block(w, "encoder.mid_block.", cfg)
    layers.append(NormActConv(w, "encoder.", g))
    return LayerStack(layers)


def build_decoder(w: dict[str, Tensor], cfg: AutoencoderKLConfig) -> LayerStack:
    """latents [B, latent, h, w] (after post_quant_conv) -> images [B, out, f h, f w]."""
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    layers: list = [Conv2d(w, "decoder.conv_in", padding=1)]
    layers += _mid_block(w, "decoder.mid_block.", cfg)
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        p = f"decoder.up_blocks.{i}."
        for j in range(cfg.layers_per_block + 1):
            layers.append(ResnetBlock2D(w, f"{p}resnets.{j}.", g, prev if j == 0 else c, c))
        if i < len(ch) - 1:
            layers.append(Upsample2D(w, p + "upsamplers.0."))
        prev = c
    layers.append(NormActConv(w, "decoder.", g))
    return LayerStack(layers)


# ----------------------------------------------------------------------------------------------- model
class AutoencoderKL:
    """The KL VAE. Build with `from_pretrained(folder)` or from a weights dict (diffusers names)."""

    def __init__(self, config: AutoencoderKLConfig, weights: dict[str, Tensor], source: str = "the weights dict"):
        """`weights` maps diffusers state-dict names to Tensors (all on one device, in the compute dtype). The dict
        is consumed (tensors are removed as the layers take them); pass `dict(weights)` to keep yours."""
        check_model_weights(weights, expected_weights(config), WHAT, source)
        self.config = cfg = config
        w = weights
        self.device = w["decoder.conv_in.weight"].device
        self.dtype: DType = w["decoder.conv_in.weight"].dtype
        self.encoder = build_encoder(w, cfg)
        self.quant_conv = Conv2d(w, "quant_conv") if cfg.use_quant_conv else None
        self.decoder = build_decoder(w, cfg)
        self.post_quant_conv = Conv2d(w, "post_quant_conv") if cfg.use_post_quant_conv else None

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = "cpu", dtype: Any = None) -> AutoencoderKL:
        """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model*.safetensors), or a
        pipeline root holding vae/. `dtype` None keeps the stored dtype (float32 for the published VAEs)."""
        folder = component_folder(folder, "vae")
        config = read_config(AutoencoderKLConfig, folder)
        weights = load_weights(folder, expected_weights(config), WHAT, device=device, dtype=dtype)
        return cls(config, weights, source=str(folder))

    # ------------------------------------------------------------------------------------------ inputs
    def _tensor(self, x: Any, name: str, channels: int) -> Tensor:
        """A [B, channels, H, W] input (Tensor or array) on the model's device in the model's dtype."""
        if not isinstance(x, Tensor):
            x = np.asarray(x, dtype=np.float32)
        if len(x.shape) != 4 or x.shape[1] != channels or 0 in x.shape:
            raise ShapeError(f"AutoencoderKL: {name} must have shape [B, {channels}, H, W], got {list(x.shape)}")
        if not isinstance(x, Tensor):
            x = Tensor.from_numpy(np.ascontiguousarray(x), device=self.device)
        elif x.device != self.device:
            x = x.to(self.device)
        return ops.cast(x, self.dtype) if x.dtype != self.dtype else x

    def _per_channel(self, values: Sequence[float], like: Tensor) -> Tensor:
        arr = np.asarray(values, dtype=np.float64).astype(np.float32).reshape(1, -1, 1, 1)
        return Tensor.from_numpy(arr.astype(like.dtype.np), device=like.device)

    # ------------------------------------------------------------------------------------------ latents
    def unscale(self, latents: Any) -> Tensor:
        """The denoiser's latents back to the VAE's latent space, as the diffusers pipelines do before decoding:
        latents / scaling_factor + shift_factor (FLUX, SD3; SDXL has no shift), or
        latents * latents_std / scaling_factor + latents_mean where the config has per-channel statistics."""
        cfg = self.config
        z = self._tensor(latents, "latents", cfg.latent_channels)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            std = np.asarray(cfg.latents_std, dtype=np.float64) / cfg.scaling_factor
            return ops.add(ops.mul(z, self._per_channel(std, z)), self._per_channel(cfg.latents_mean, z))
        z = ops.mul(z, 1.0 / cfg.scaling_factor)
        return ops.add(z, cfg.shift_factor) if cfg.shift_factor is not None else z

    def scale(self, latents: Any) -> Tensor:
        """The inverse of `unscale`: VAE latents (e.g. from `encode`) into the denoiser's latent space,
        (latents - shift_factor) * scaling_factor, or (latents - latents_mean) * scaling_factor / latents_std."""
        cfg = self.config
        z = self._tensor(latents, "latents", cfg.latent_channels)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            z = ops.add(z, self._per_channel(cfg.latents_mean, z), alpha=-1.0)
            return ops.mul(z, self._per_channel(cfg.scaling_factor / np.asarray(cfg.latents_std, np.float64), z))
        if cfg.shift_factor is not None:
            z = ops.add(z, -cfg.shift_factor)
        return ops.mul(z, cfg.scaling_factor)

    # ------------------------------------------------------------------------------------------ decode
    def _decode_one(self, z: Tensor) -> Tensor:
        # z: [B, C, h, w] -> [B, out, H, W]; channels-last inside (blocks.py)
        z = ops.permute(z, (0, 2, 3, 1))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return ops.permute(self.decoder(z), (0, 3, 1, 2))

    def decode_peak_bytes(self, latent_shape: Sequence[int]) -> int:
        """Estimated activation bytes at the busiest moment of an untiled decode of `latent_shape` [B, C, h, w] in
        the model's dtype, from the shapes alone (weights not counted)."""
        b, c, h, w = (int(n) for n in latent_shape)
        s = self.dtype.itemsize
        # the input, its channels-last copy and the post_quant_conv output
        extra = 3 * b * c * h * w * s + OP_WORKSPACE_BYTES
        if self.post_quant_conv is not None:
            extra += self.post_quant_conv.scratch_bytes((b, c, h, w), s)
        out = self.decoder.out_shape((b, c, h, w))
        # the decoder's busiest moment, or its channels-last output with the NCHW copy of it
        return extra + max(self.decoder.peak_bytes((b, c, h, w), s), 2 * math.prod(out) * s)

    def decode(self, latents: Any, tile: bool | int | None = None, memory_budget: int | None = None) -> Tensor:
        """VAE latents [B, latent_channels, h, w] (already `unscale`d) -> images [B, out_channels, f h, f w] in
        [-1, 1] (roughly), on the model's device in its dtype.

        tile: False never tiles; True tiles like diffusers' enable_tiling() (latent tiles of sample_size / f,
        overlapping by a quarter, blended linearly); an int sets the latent tile edge; None (default) tiles only
        when the untiled decode would need more than `memory_budget` bytes of activations (on a GPU the budget
        defaults to the free memory of the card plus fastdm's cached blocks; on the CPU, no budget)."""
        z = self._tensor(latents, "latents", self.config.latent_channels)
        size = choose_tile(self, z.shape, tile, memory_budget)
        if size is None:
            return self._decode_one(z)
        return decode_tiled(self._decode_one, z, size, self.config.spatial_factor)

    __call__ = decode

    # ------------------------------------------------------------------------------------------ encode
    def moments(self, images: Any) -> Tensor:
        """images [B, in_channels, H, W] in [-1, 1] -> the posterior's [mean, logvar] [B, 2 * latent, H/f, W/f]."""
        x = self._tensor(images, "images", self.config.in_channels)
        m = self.encoder(ops.permute(x, (0, 2, 3, 1)))  # channels-last inside (blocks.py)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return ops.permute(m, (0, 3, 1, 2))

    def encode(self, images: Any, noise: Any = None) -> Tensor:
        """images [B, in_channels, H, W] in [-1, 1] -> VAE latents [B, latent_channels, H // f, W // f] (apply
        `scale` before handing them to a denoiser): the posterior mean, or with `noise` (standard normal, the
        latents' shape) the sample mean + exp(logvar / 2) * noise, as diffusers' latent_dist.sample().

        exp has no op, so the std (latent-sized, small) is computed on the host from the downloaded logvar."""
        m = self.moments(images)
        lat = self.config.latent_channels
        mean = m.narrow(1, 0, lat).contiguous()
        if noise is None:
            return mean
        eps = self._tensor(noise, "noise", lat)
        if eps.shape != mean.shape:
            raise ShapeError(f"AutoencoderKL.encode: noise must have the latents' shape {list(mean.shape)}, got "
                             f"{list(eps.shape)}")
        logvar = np.clip(np.asarray(m.narrow(1, lat, lat).numpy(), dtype=np.float32), *LOGVAR_RANGE)
        std = np.exp(np.float32(0.5) * logvar).astype(self.dtype.np)
        return ops.add(mean, ops.mul(Tensor.from_numpy(np.ascontiguousarray(std), device=self.device), eps))

