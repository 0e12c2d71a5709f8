"""The SDXL UNet: diffusers' UNet2DConditionModel as SDXL (base and refiner) and SD 2.x configure it, on fastdm's
op API.

Shape: noisy latents [B, 4, h, w] go through conv_in, then down blocks (resnets, optionally a Transformer2DModel
after each, a stride-2 conv between levels), a mid block (resnet, transformer, resnet) and up blocks that
concatenate the down path's outputs (skips) on the channels and upsample 2x between levels; GroupNorm-SiLU-conv_out
predicts the noise. Every resnet adds a per-channel projection of the conditioning vector emb = time_embedding(
sinusoids of t) + add_embedding([pooled text, sinusoids of the micro-conditioning numbers]) ("text_time", SDXL).
The transformers attend over the image tokens (self) and over the text encoder states (cross).

diffusers' `attention_head_dim` is, for UNet2DConditionModel, the NUMBER of heads per level (a historical naming
slip diffusers keeps for compatibility, see its constructor): SDXL's [5, 10, 20] over 320/640/1280 channels gives
64-wide heads everywhere. Up blocks read the per-level lists reversed.

Weights are looked up by diffusers' state-dict names. At load time each self-attention's q|k|v are stacked into one
GEMM, and the to_k|to_v of every cross-attention in the UNet are stacked into one weight, so the text states are
projected for all blocks by one GEMM per forward (unet2d_blocks.CrossAttentionKV).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime import ops
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError, ModelLayoutError, ShapeError
from ...runtime.graphs import CapturedCall, graphs_enabled
from ...runtime.tensor import Tensor
from ..loading import check_model_weights, component_folder, load_weights, read_config
from .unet2d_blocks import (
    FF_MULT,
    AttnPlan,
    BlockPlan,
    Conv2d,
    CrossAttentionKV,
    DownBlock,
    MidBlock,
    Ones,
    UpBlock,
    take,
)

WHAT = "UNet (UNet2DConditionModel)"
DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_TYPE = "UNetMidBlock2DCrossAttn"

# Options of diffusers' UNet2DConditionModel that change the computation in ways fastdm does not implement; a
# config must leave them at these (diffusers') defaults. SDXL, SDXL refiner and SD 2.x do.
_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "num_attention_heads": None, "reverse_transformer_layers_per_block": None, "act_fn": "silu",
    "downsample_padding": 1, "mid_block_type": MID_TYPE, "use_linear_projection": True,
}


def _per_level(value: Any, n: int, name: str) -> tuple[int, ...]:
    """A per-level setting: an int for every level, or a list of n ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return tuple(int(v) for v in value)
    raise ModelLayoutError(f"UNet config: {name} must be an int or a list of {n} ints (one per level), got {value!r}")


# ------------------------------------------------------------------------------------------------- config
@dataclass
class UNet2DConditionConfig:
    """The fields of a UNet2DConditionModel config.json that fastdm reads (defaults are diffusers' defaults); the
    options it does not implement are checked to be at their defaults (see _FIXED)."""

    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Sequence[int] = 1280
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8  # the number of heads per level (see the module docstring)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    upcast_attention: bool = False  # attention always accumulates in float32 here, so this changes nothing
    # checked against _FIXED:
    use_linear_projection: bool = False
    mid_block_type: str | None = MID_TYPE
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    only_cross_attention: Any = False
    dual_cross_attention: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    num_attention_heads: Any = None
    reverse_transformer_layers_per_block: Any = None

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r} (fastdm needs {_FIXED[f.name]!r})" for f in fields(self)
               if f.name in _FIXED and getattr(self, f.name) != _FIXED[f.name]]
        if bad:
            raise ModelLayoutError("UNet config: fastdm implements the UNet2DConditionModel of SDXL and SD 2.x; this "
                                   "config sets options it does not implement: " + "; ".join(bad))
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ModelLayoutError(f"UNet config: {n} block_out_channels but {len(self.down_block_types)} down and "
                                   f"{len(self.up_block_types)} up block types; give one of each per level")
        unknown = [t for t in self.down_block_types if t not in DOWN_TYPES] + [
            t for t in self.up_block_types if t not in UP_TYPES]
        if unknown:
            raise ModelLayoutError(f"UNet config: block types {unknown} are not implemented; fastdm has "
                                   f"{list(DOWN_TYPES)} and {list(UP_TYPES)}")
        self.layers_per_block = _per_level(self.layers_per_block, n, "layers_per_block")
        self.transformer_layers_per_block = _per_level(self.transformer_layers_per_block, n,
                                                       "transformer_layers_per_block")
        self.attention_head_dim = _per_level(self.attention_head_dim, n, "attention_head_dim")
        cross = _per_level(self.cross_attention_dim, n, "cross_attention_dim")
        if len(set(cross)) != 1:
            raise ModelLayoutError(f"UNet config: cross_attention_dim {list(cross)} differs between levels; fastdm "
                                   "needs one encoder width for the whole UNet")
        self.cross_attention_dim = cross[0]
        if self.norm_num_groups is None:
            raise ModelLayoutError("UNet config: norm_num_groups is null (no GroupNorms); fastdm needs GroupNorm "
                                   "UNets such as SDXL's (norm_num_groups 32)")
        for plan in self.down_plans() + [self.mid_plan()] + self.up_plans():
            a = plan.attn
            if a is not None and (a.heads < 1 or a.channels % a.heads):
                raise ModelLayoutError(f"UNet config: {plan.prefix}attentions have {a.channels} channels and "
                                       f"attention_head_dim {a.heads} (diffusers reads it as the number of heads); "
                                       "it must divide the channels")
        if self.addition_embed_type not in (None, "text_time"):
            raise ModelLayoutError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not "
                                   "implemented; fastdm has None (SD 2.x) and 'text_time' (SDXL)")
        if self.addition_embed_type == "text_time" and not (
                self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ModelLayoutError("UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                   "projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _attn(self, level: int, layers: int) -> AttnPlan:
        heads = self.attention_head_dim[level]
        return AttnPlan(self.block_out_channels[level], heads, layers, self.cross_attention_dim)

    def down_plans(self) -> list[BlockPlan]:
        ch, n = self.block_out_channels, len(self.block_out_channels)
        plans, prev = [], ch[0]
        for i, kind in enumerate(self.down_block_types):
            out = ch[i]
            resnets = tuple((prev if j == 0 else out, out) for j in range(self.layers_per_block[i]))
            attn = self._attn(i, self.transformer_layers_per_block[i]) if kind == "CrossAttnDownBlock2D" else None
            plans.append(BlockPlan(f"down_blocks.{i}.", resnets, attn, resample=i < n - 1))
            prev = out
        return plans

    def mid_plan(self) -> BlockPlan:
        c = self.block_out_channels[-1]
        return BlockPlan("mid_block.", ((c, c), (c, c)), self._attn(-1, self.transformer_layers_per_block[-1]),
                         resample=False)

    def up_plans(self) -> list[BlockPlan]:
        ch, n = self.block_out_channels, len(self.block_out_channels)
        plans, prev = [], ch[-1]
        for i, kind in enumerate(self.up_block_types):
            level = n - 1 - i
            out, skip_in = ch[level], ch[max(level - 1, 0)]
            layers = self.layers_per_block[level] + 1
            # resnet j reads the previous output + the skip: the last one's skip comes from the level below
            resnets = tuple(((prev if j == 0 else out) + (skip_in if j == layers - 1 else out), out)
                            for j in range(layers))
            attn = self._attn(level, self.transformer_layers_per_block[level]) if kind == "CrossAttnUpBlock2D" \
                else None
            plans.append(BlockPlan(f"up_blocks.{i}.", resnets, attn, resample=i < n - 1))
            prev = out
        return plans


# ------------------------------------------------------------------------------------------ weight list
def expected_weights(cfg: UNet2DConditionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers UNet2DConditionModel state dict with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def conv(name: str, n_out: int, n_in: int, k: int = 3) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in, k, k)
        shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(p: str, cin: int, cout: int) -> None:
        norm(p + "norm1", cin)
        conv(p + "conv1", cout, cin)
        lin(p + "time_emb_proj", cout, t_dim)
        norm(p + "norm2", cout)
        conv(p + "conv2", cout, cout)
        if cin != cout:
            conv(p + "conv_shortcut", cout, cin, k=1)

    def transformer(p: str, a: AttnPlan) -> None:
        c = a.channels
        norm(p + "norm", c)
        lin(p + "proj_in", c, c)
        for i in range(a.layers):
            b = f"{p}transformer_blocks.{i}."
            for n in ("norm1", "norm2", "norm3"):
                norm(b + n, c)
            for n in ("to_q", "to_k", "to_v"):
                lin(b + f"attn1.{n}", c, c, bias=False)
            lin(b + "attn1.to_out.0", c, c)
            lin(b + "attn2.to_q", c, c, bias=False)
            lin(b + "attn2.to_k", c, a.cross_dim, bias=False)
            lin(b + "attn2.to_v", c, a.cross_dim, bias=False)
            lin(b + "attn2.to_out.0", c, c)
            lin(b + "ff.net.0.proj", 2 * FF_MULT * c, c)
            lin(b + "ff.net.2", c, FF_MULT * c)
        lin(p + "proj_out", c, c)

    def block(plan: BlockPlan, resample: str, first_attn: int = 0) -> None:
        for j, (cin, cout) in enumerate(plan.resnets):
            resnet(f"{plan.prefix}resnets.{j}.", cin, cout)
            if plan.attn is not None and j >= first_attn:
                transformer(f"{plan.prefix}attentions.{j - first_attn}.", plan.attn)
        if plan.resample:
            conv(f"{plan.prefix}{resample}.0.conv", plan.out_channels, plan.out_channels)

    c0, t_dim = cfg.block_out_channels[0], cfg.time_embed_dim
    conv("conv_in", c0, cfg.in_channels, cfg.conv_in_kernel)
    lin("time_embedding.linear_1", t_dim, c0)
    lin("time_embedding.linear_2", t_dim, t_dim)
    if cfg.addition_embed_type == "text_time":
        lin("add_embedding.linear_1", t_dim, cfg.projection_class_embeddings_input_dim)
        lin("add_embedding.linear_2", t_dim, t_dim)
    for plan in cfg.down_plans():
        block(plan, "downsamplers")
    block(cfg.mid_plan(), "", first_attn=1)
    for plan in cfg.up_plans():
        block(plan, "upsamplers")
    norm("conv_norm_out", c0)
    conv("conv_out", cfg.out_channels, c0, cfg.conv_out_kernel)
    return shapes


# ----------------------------------------------------------------------------------------------- model
class UNet2DCondition:
    """The SDXL / SD 2.x UNet. Build with `from_pretrained(folder)` or from a weights dict (diffusers names)."""

    def __init__(self, config: UNet2DConditionConfig, weights: dict[str, Tensor], source: str = "the weights dict"):
        """`weights` maps diffusers state-dict names to Tensors (all on one device, in the compute dtype). The dict
        is consumed: tensors are removed from it as they are fused into the model's layout, so a checkpoint is
        never held twice. Pass `dict(weights)` to keep yours."""
        check_model_weights(weights, expected_weights(config), WHAT, source)
        cfg = self.config = config
        w = weights
        self.device = w["conv_in.weight"].device
        self.dtype: DType = w["conv_in.weight"].dtype
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        ones = Ones(self.device, self.dtype)
        self.text_kv = CrossAttentionKV()

        self.conv_in = Conv2d(w, "conv_in")
        self.time_embedding = (take(w, "time_embedding.linear_1"), take(w, "time_embedding.linear_2"))
        self.add_embedding = ((take(w, "add_embedding.linear_1"), take(w, "add_embedding.linear_2"))
                              if cfg.addition_embed_type == "text_time" else None)
        self.down_blocks = [DownBlock(w, p, groups, eps, self.text_kv, ones) for p in cfg.down_plans()]
        self.mid_block = MidBlock(w, cfg.mid_plan(), groups, eps, self.text_kv, ones)
        self.up_blocks = [UpBlock(w, p, groups, eps, self.text_kv, ones) for p in cfg.up_plans()]
        self.conv_norm_out = take(w, "conv_norm_out")
        self.conv_out = Conv2d(w, "conv_out")
        self.text_kv.build()
        # The denoising body (everything after the conditioning vector) is a fixed sequence of ~1500 kernels per
        # input size: on the GPU it is replayed from a CUDA graph, which removes the per-op host time.
        self._body = (CapturedCall(self._denoise, "UNet2DCondition") if self.device.type == "cuda" and graphs_enabled()
                      else self._denoise)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = "cpu", dtype: Any = None) -> UNet2DCondition:
        """Load a diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model*.safetensors), or a
        pipeline root holding unet/. `dtype` None keeps the stored dtype."""
        folder = component_folder(folder, "unet")
        config = read_config(UNet2DConditionConfig, folder)
        weights = load_weights(folder, expected_weights(config), WHAT, device=device, dtype=dtype)
        return cls(config, weights, source=str(folder))

    # ------------------------------------------------------------------------------------------ inputs
    def _tensor(self, x: Any, name: str, shape: Sequence[int | None]) -> Tensor:
        """An input (Tensor or array) on the model's device in its dtype; None entries of `shape` are free."""
        if not isinstance(x, Tensor):
            x = np.asarray(x, dtype=np.float32)
        fits = len(x.shape) == len(shape) and all(w is None or g == w for g, w in zip(x.shape, shape, strict=True))
        if not fits:
            spec = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ShapeError(f"UNet2DCondition: {name} must have shape {spec}, got {list(x.shape)}")
        if not isinstance(x, Tensor):
            x = Tensor.from_numpy(np.ascontiguousarray(x), device=self.device)
        elif x.device != self.device:
            x = x.to(self.device)
        return ops.cast(x, self.dtype) if x.dtype != self.dtype else x

    @staticmethod
    def _host(x: Any, name: str) -> np.ndarray:
        """A small conditioning input (timestep, time_ids) as float32 on the host: the sinusoids are made there."""
        arr = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype.kind == "V"):  # "V": ml_dtypes' bfloat16
            raise InvalidArgumentError(f"UNet2DCondition: {name} must be numbers, got dtype {arr.dtype}")
        return np.asarray(arr, dtype=np.float32)

    def _sinusoids(self, values: np.ndarray, dim: int) -> Tensor:
        # values: [N] float32 -> [N, dim] in the compute dtype on the device (diffusers' Timesteps, then .to(dtype))
        emb = ops.timestep_embedding(Tensor.from_numpy(np.ascontiguousarray(values)), dim,
                                     flip_sin_to_cos=self.config.flip_sin_to_cos,
                                     downscale_freq_shift=self.config.freq_shift)
        return ops.cast(emb.to(self.device), self.dtype)

    def _conditioning(self, timestep: Any, text_embeds: Any, time_ids: Any, b: int) -> Tensor:
        """emb = time_embedding(sinusoids(t)) + add_embedding([text_embeds, sinusoids(time_ids)]): [B, T]."""
        cfg = self.config
        t = self._host(timestep, "timestep")
        if t.ndim == 0 or t.shape == (1,):
            t = np.full(b, t.reshape(()), dtype=np.float32)  # one timestep for the whole batch
        if t.shape != (b,):
            raise ShapeError(f"UNet2DCondition: timestep must be a number or [B] = [{b}] values, got shape "
                             f"{list(t.shape)}")
        lin1, lin2 = self.time_embedding
        emb = ops.linear(ops.linear(self._sinusoids(t, cfg.block_out_channels[0]), *lin1, activation="silu"), *lin2)
        if self.add_embedding is None:
            if text_embeds is not None or time_ids is not None:
                raise InvalidArgumentError("UNet2DCondition: this UNet has no addition embedding (SD 2.x layout); "
                                           "pass text_embeds=None and time_ids=None")
            return emb
        if text_embeds is None or time_ids is None:
            raise InvalidArgumentError("UNet2DCondition: this UNet is conditioned on the pooled text embedding and "
                                       "the micro-conditioning (SDXL 'text_time'); pass text_embeds [B, pooled_dim] "
                                       "and time_ids [B, 6] (original size, crop top-left, target size)")
        ids = self._host(time_ids, "time_ids")
        d_time, d_in = cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim
        pooled = self._tensor(text_embeds, "text_embeds", (b, None))
        if ids.ndim != 2 or ids.shape[0] != b or pooled.shape[1] + ids.shape[1] * d_time != d_in:
            raise ShapeError(f"UNet2DCondition: text_embeds {list(pooled.shape)} and time_ids {list(ids.shape)} do "
                             f"not fit add_embedding: need [B, P] and [B, N] with P + N * {d_time} = {d_in} (SDXL "
                             "base: 1280 + 6 * 256)")
        time_emb = self._sinusoids(ids.reshape(-1), d_time).view(b, ids.shape[1] * d_time)  # [B, N * d_time]
        add = ops.concat([pooled, time_emb], axis=1)  # [B, P + N * d_time]: text first, as diffusers
        lin1, lin2 = self.add_embedding
        return ops.add(emb, ops.linear(ops.linear(add, *lin1, activation="silu"), *lin2))

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, text_embeds: Any = None,
                time_ids: Any = None) -> Tensor:
        """Noise prediction for `sample`.

        sample [B, in_ch, h, w] latents (any h, w: odd sizes are handled as diffusers does); timestep a number or
        [B]; encoder_hidden_states [B, S_txt, cross_dim] (SDXL: both text encoders' penultimate states, 2048);
        SDXL only: text_embeds [B, 1280] pooled text embedding and time_ids [B, 6] = (original h, w, crop top,
        left, target h, w). Tensors or numpy arrays; returns [B, out_ch, h, w] on the model's device."""
        cfg = self.config
        x = self._tensor(sample, "sample", (None, cfg.in_channels, None, None))
        b = x.shape[0]
        ctx = self._tensor(encoder_hidden_states, "encoder_hidden_states", (b, None, cfg.cross_attention_dim))
        silu_temb = ops.silu(self._conditioning(timestep, text_embeds, time_ids, b))  # [B, T]: what resnets read
        return self._body(ops.contiguous(x), silu_temb, ops.contiguous(ctx))

    def _denoise(self, x: Tensor, silu_temb: Tensor, ctx: Tensor) -> Tensor:
        # x: [B, in_ch, h, w], silu_temb: [B, T], ctx: [B, S_txt, cross_dim] -> [B, out_ch, h, w]
        cfg = self.config
        kvs = self.text_kv(ctx)  # every cross-attention's k, v: [B, S_txt, 2, H, D] each
        x = self.conv_in(ops.permute(x, (0, 2, 3, 1)))  # channels-last from here on: [B, h, w, C0]  # [B, C0, h, w]
        skips = [x]
        for down in self.down_blocks:
            x, outs = down(x, silu_temb, kvs)
            skips.extend(outs)
        x = self.mid_block(x, silu_temb, kvs)
        stats = None  # of the last up block's output, for conv_norm_out
        for j, up in enumerate(self.up_blocks):
            n = len(up.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if up.upsampler is not None else None  # the next level's size
            last = j + 1 == len(self.up_blocks)
            x, stats = up(x, mine, silu_temb, kvs, size, cfg.norm_num_groups if last else None)
        x = ops.group_norm(x, cfg.norm_num_groups, *self.conv_norm_out, eps=cfg.norm_eps, activation="silu",
                           channels_last=True, stats=stats)
        return ops.permute(self.conv_out(x), (0, 3, 1, 2))  # [B, out_ch, h, w]

    __call__ = forward
