"""The layers of diffusers' UNet2DConditionModel on fastdm's op API: ResnetBlock2D with its time-embedding input,
Downsample2D / Upsample2D, Transformer2DModel with linear projections and BasicTransformerBlocks (self-attention,
cross-attention, GEGLU feed-forward), and the down / mid / up blocks that chain them.

Activations are channels-last, [B, H, W, C], between layers (diffusers keeps NCHW): that is the layout the GPU's
implicit-GEMM convolutions read, and a transformer's tokens [B, H*W, C] are then the same memory, so nothing is
ever permuted inside the UNet. Conv weights are converted to [O, kh, kw, C] at load. Each layer pops its tensors
(diffusers state-dict names) from the weights dict, so a checkpoint is never held twice. The block plans (which
resnet has which channels, which block has attention, how many transformer layers) come from unet2d's config so the
model and its expected weight list agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...runtime import ops
from ...runtime.dtypes import DType
from ...runtime.tensor import Tensor

TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (fixed in diffusers, not norm_eps)
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's three LayerNorms (diffusers' default, the UNet never sets it)
FF_MULT = 4  # FeedForward inner width = 4 * dim; GEGLU's projection gives 2 * inner (value half, gate half)


# ------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class AttnPlan:
    """One Transformer2DModel: `channels` wide, `heads` heads of channels // heads, `layers` BasicTransformerBlocks,
    cross-attention over `cross_dim`-wide encoder states."""

    channels: int
    heads: int
    layers: int
    cross_dim: int

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


@dataclass(frozen=True)
class BlockPlan:
    """A down, mid or up block: resnets as (in, out) channels, each followed by a transformer when `attn` is set
    (the mid block's resnet 0 has none), then an optional 2x resampler (Downsample2D / Upsample2D) on `out`."""

    prefix: str
    resnets: tuple[tuple[int, int], ...]
    attn: AttnPlan | None
    resample: bool

    @property
    def out_channels(self) -> int:
        return self.resnets[-1][1]


def take(w: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the conv, linear or norm `name`, removed from `w`."""
    return w.pop(f"{name}.weight"), w.pop(f"{name}.bias")


class Ones:
    """[B, N] ones in the model's dtype on its device, made once per shape. As the gate of
    ops.linear_gated_residual (residual + gate * linear(x)) they turn "linear, then add the residual" into one GEMM
    with the add in its epilogue (and one rounding instead of two)."""

    def __init__(self, device, dtype: DType):
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, b: int, n: int) -> Tensor:
        if (b, n) not in self._cache:
            self._cache[(b, n)] = Tensor.from_numpy(np.ones((b, n), dtype=self.dtype.np), device=self.device)
        return self._cache[(b, n)]


def residual_linear(x: Tensor, linear: tuple[Tensor, Tensor | None], residual: Tensor, ones: Ones) -> Tensor:
    """residual + x @ W^T + b, the add fused into the GEMM. x: [B, S, K], residual: [B, S, N]. The gate is the
    same (ones) for every sample, so the batch is folded into the rows: one GEMM of B * S rows, not B of S."""
    b, s, n = residual.shape
    rows = (1, b * s)
    out = ops.linear_gated_residual(ops.contiguous(x).view(*rows, x.shape[2]), linear[0], linear[1], ones(1, n),
                                    ops.contiguous(residual).view(*rows, n))
    return out.view(b, s, n)


# ---------------------------------------------------------------------------------------------- resnets
class Conv2d:
    """torch.nn.Conv2d (groups 1, symmetric zero padding) on channels-last activations."""

    def __init__(self, w: dict[str, Tensor], name: str, stride: int = 1, padding: int | None = None):
        weight, self.bias = take(w, name)  # [O, C, k, k], [O]
        self.weight = ops.conv_weight_channels_last(weight)  # [O, k, k, C]; the torch-layout copy is dropped
        self.stride = stride
        self.padding = (weight.shape[-1] - 1) // 2 if padding is None else padding  # "same" for odd k

    def __call__(self, x: Tensor) -> Tensor:
        # x: [B, H, W, C] -> [B, Ho, Wo, O]
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, channels_last=True)


class ResnetBlock2D:
    """GroupNorm-SiLU-conv3x3, plus the per-channel time-embedding projection, GroupNorm-SiLU-conv3x3, plus the
    input (through a 1x1 conv_shortcut when the channel count changes). time_embedding_norm "default",
    output_scale_factor 1, dropout off at inference."""

    def __init__(self, w: dict[str, Tensor], prefix: str, in_ch: int, out_ch: int, groups: int, eps: float):
        self.groups, self.eps = groups, eps
        self.norm1 = take(w, prefix + "norm1")
        self.conv1 = Conv2d(w, prefix + "conv1")
        self.time_emb_proj = take(w, prefix + "time_emb_proj")  # [out, T]
        self.norm2 = take(w, prefix + "norm2")
        self.conv2 = Conv2d(w, prefix + "conv2")
        self.shortcut = Conv2d(w, prefix + "conv_shortcut") if in_ch != out_ch else None

    def forward(self, x: Tensor, silu_temb: Tensor, x_stats: ops.GroupStats | None = None,
                out_groups: int | None = None) -> tuple[Tensor, ops.GroupStats | None]:
        """x: [B, H, W, C_in], silu_temb: [B, T] -> [B, H, W, C_out]. x_stats: x's GroupStats, if the layer that
        wrote x made them; out_groups: the groups of the GroupNorm that reads the output next (its statistics
        are taken with the residual add), or None. norm2's statistics always come with the time-embedding add."""
        h = ops.group_norm(x, self.groups, *self.norm1, eps=self.eps, activation="silu", channels_last=True,
                           stats=x_stats)
        h = self.conv1(h)
        t = ops.linear(silu_temb, *self.time_emb_proj)  # [B, C_out]
        h, h_stats = ops.add_group_stats(h, t.view(t.shape[0], 1, 1, t.shape[1]), self.groups)
        h = ops.group_norm(h, self.groups, *self.norm2, eps=self.eps, activation="silu", channels_last=True,
                           stats=h_stats)
        h = self.conv2(h)
        return ops.add_group_stats(x if self.shortcut is None else self.shortcut(x), h, out_groups)

    def __call__(self, x: Tensor, silu_temb: Tensor) -> Tensor:
        return self.forward(x, silu_temb)[0]


class Downsample2D:
    """conv3x3 with stride 2, padding 1: ceil(H/2) x ceil(W/2)."""

    def __init__(self, w: dict[str, Tensor], prefix: str):
        self.conv = Conv2d(w, prefix + "conv", stride=2, padding=1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D:
    """Nearest-neighbour upsampling to `size` (2x by default), then conv3x3.

    diffusers asks for the skip's size when a latent side is not a multiple of 2^levels: 2n - 1 rows from n.
    Nearest interpolation to 2n - 1 reads source row floor(j * n / (2n - 1)), which equals floor(j / 2) for every
    j < 2n - 1, so it is the 2x result with its last row (column) cut off."""

    def __init__(self, w: dict[str, Tensor], prefix: str):
        self.conv = Conv2d(w, prefix + "conv")

    def __call__(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        # x: [B, h, w, C] -> [B, H, W, C] with H, W = size or (2h, 2w)
        up = ops.upsample_nearest2x(x, channels_last=True)
        if size is not None and tuple(size) != tuple(up.shape[1:3]):
            up = ops.contiguous(up.narrow(1, 0, size[0]).narrow(2, 0, size[1]))
        return self.conv(up)


# ---------------------------------------------------------------------------------------------- attention
class CrossAttentionKV:
    """to_k and to_v of every cross-attention in the UNet, stacked into one weight: the encoder states are
    projected for all transformer blocks by one GEMM per forward (SDXL has 70 such blocks; each GEMM alone has only
    B * 77 rows and would leave most of the GPU idle)."""

    def __init__(self) -> None:
        self._parts: list[Tensor] = []
        self._slots: list[tuple[int, int, int]] = []  # (column offset, heads, head dim)
        self._width = 0
        self.weight: Tensor | None = None  # [sum of 2 * C, cross_dim]

    def add(self, w: dict[str, Tensor], prefix: str, heads: int, head_dim: int) -> int:
        """Take `prefix`to_k / to_v (no bias in diffusers' UNet attention); returns the block's slot."""
        self._parts += [w.pop(prefix + "to_k.weight"), w.pop(prefix + "to_v.weight")]
        self._slots.append((self._width, heads, head_dim))
        self._width += 2 * heads * head_dim
        return len(self._slots) - 1

    def build(self) -> None:
        """Concatenate the collected weights (called once every block has been built)."""
        if self._parts:
            self.weight = ops.concat(self._parts, axis=0)
        self._parts = []

    def __call__(self, ctx: Tensor) -> list[Tensor]:
        # ctx: [B, S_txt, cross_dim] -> per slot [B, S_txt, 2, H, D] views (k = [:, :, 0], v = [:, :, 1])
        if self.weight is None:
            return []
        b, s, _ = ctx.shape
        kv = ops.linear(ctx, self.weight)  # [B, S_txt, sum of 2 * C]
        return [kv.narrow(2, off, 2 * h * d).view(b, s, 2, h, d) for off, h, d in self._slots]


class BasicTransformerBlock:
    """LayerNorm -> self-attention -> residual, LayerNorm -> cross-attention over the encoder states -> residual,
    LayerNorm -> GEGLU feed-forward -> residual. q/k/v carry no bias, the output projections do."""

    def __init__(self, w: dict[str, Tensor], prefix: str, plan: AttnPlan, kv: CrossAttentionKV, ones: Ones):
        self.heads, self.head_dim, self.ones = plan.heads, plan.head_dim, ones
        self.norm1 = take(w, prefix + "norm1")
        # q | k | v stacked: one GEMM for the self-attention inputs
        self.qkv = ops.concat([w.pop(prefix + f"attn1.{n}.weight") for n in ("to_q", "to_k", "to_v")], axis=0)
        self.out1 = take(w, prefix + "attn1.to_out.0")
        self.norm2 = take(w, prefix + "norm2")
        self.q2 = w.pop(prefix + "attn2.to_q.weight")
        self.kv_slot = kv.add(w, prefix + "attn2.", plan.heads, plan.head_dim)
        self.out2 = take(w, prefix + "attn2.to_out.0")
        self.norm3 = take(w, prefix + "norm3")
        self.ff_in = take(w, prefix + "ff.net.0.proj")  # [2 * 4C, C]: value half, gate half
        self.ff_out = take(w, prefix + "ff.net.2")  # [C, 4C]

    def __call__(self, x: Tensor, kv: Tensor) -> Tensor:
        # x: [B, S, C] tokens; kv: [B, S_txt, 2, H, D] this block's projected encoder states
        b, s, c = x.shape
        h = ops.layer_norm(x, *self.norm1, eps=LAYER_NORM_EPS)
        qkv = ops.linear(h, self.qkv).view(b, s, 3, self.heads, self.head_dim)  # [B, S, 3, H, D]
        a = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).view(b, s, c)
        x = residual_linear(a, self.out1, x, self.ones)

        h = ops.layer_norm(x, *self.norm2, eps=LAYER_NORM_EPS)
        q = ops.linear(h, self.q2).view(b, s, self.heads, self.head_dim)  # [B, S, H, D]
        a = ops.attention(q, kv[:, :, 0], kv[:, :, 1]).view(b, s, c)
        x = residual_linear(a, self.out2, x, self.ones)

        h = ops.layer_norm(x, *self.norm3, eps=LAYER_NORM_EPS)
        h = ops.gelu_mul(ops.linear(h, *self.ff_in))  # [B, S, 4C]: value * gelu(gate), erf GELU
        return residual_linear(h, self.ff_out, x, self.ones)


class Transformer2D:
    """Transformer2DModel with use_linear_projection: GroupNorm, tokens [B, H*W, C] (the channels-last activation
    itself), proj_in, the transformer blocks, proj_out with the input added in its epilogue."""

    def __init__(self, w: dict[str, Tensor], prefix: str, plan: AttnPlan, groups: int, kv: CrossAttentionKV,
                 ones: Ones):
        self.groups, self.ones = groups, ones
        self.norm = take(w, prefix + "norm")
        self.proj_in = take(w, prefix + "proj_in")  # [C, C]
        self.blocks = [BasicTransformerBlock(w, f"{prefix}transformer_blocks.{i}.", plan, kv, ones)
                       for i in range(plan.layers)]
        self.proj_out = take(w, prefix + "proj_out")

    def __call__(self, x: Tensor, kvs: Sequence[Tensor], x_stats: ops.GroupStats | None = None) -> Tensor:
        # x: [B, H, W, C]; kvs: every block's projected encoder states (CrossAttentionKV's output); x_stats: x's
        # GroupStats from the resnet that wrote it
        b, hh, ww, c = x.shape
        h = ops.group_norm(x, self.groups, *self.norm, eps=TRANSFORMER_GROUP_NORM_EPS, channels_last=True,
                           stats=x_stats)
        h = ops.linear(h.view(b, hh * ww, c), *self.proj_in)  # [B, HW, C]
        for block in self.blocks:
            h = block(h, kvs[block.kv_slot])
        return residual_linear(h, self.proj_out, x.view(b, hh * ww, c), self.ones).view(b, hh, ww, c)


# ------------------------------------------------------------------------------------------------ blocks
class _Block:
    """Resnets (each followed by its transformer when the block has attention) over a BlockPlan."""

    def __init__(self, w: dict[str, Tensor], plan: BlockPlan, groups: int, eps: float, kv: CrossAttentionKV,
                 ones: Ones, first_attn: int = 0):
        p = plan.prefix
        self.groups = groups
        self.resnets = [ResnetBlock2D(w, f"{p}resnets.{i}.", cin, cout, groups, eps)
                        for i, (cin, cout) in enumerate(plan.resnets)]
        n_attn = len(plan.resnets) - first_attn if plan.attn is not None else 0
        # attentions[j] follows resnets[j + first_attn] (the mid block's first resnet has none)
        self.attentions = [Transformer2D(w, f"{p}attentions.{j}.", plan.attn, groups, kv, ones)
                           for j in range(n_attn)]
        self.first_attn = first_attn

    def _layer(self, i: int, x: Tensor, silu_temb: Tensor, kvs: Sequence[Tensor],
               x_stats: ops.GroupStats | None = None,
               out_groups: int | None = None) -> tuple[Tensor, ops.GroupStats | None]:
        """Resnet i, then its transformer if it has one (whose GroupNorm gets the resnet's statistics). x_stats:
        x's GroupStats for the resnet; out_groups: take the layer's output statistics for a GroupNorm of that
        many groups (a transformer's output comes from a GEMM epilogue, so it has none)."""
        j = i - self.first_attn
        if 0 <= j < len(self.attentions):
            attn = self.attentions[j]
            x, stats = self.resnets[i].forward(x, silu_temb, x_stats, attn.groups)
            return attn(x, kvs, stats), None
        return self.resnets[i].forward(x, silu_temb, x_stats, out_groups)


class DownBlock(_Block):
    """DownBlock2D / CrossAttnDownBlock2D: returns the output and the skip of every layer (and the downsample)."""

    def __init__(self, w: dict[str, Tensor], plan: BlockPlan, groups: int, eps: float, kv: CrossAttentionKV,
                 ones: Ones):
        super().__init__(w, plan, groups, eps, kv, ones)
        self.downsampler = Downsample2D(w, plan.prefix + "downsamplers.0.") if plan.resample else None

    def __call__(self, x: Tensor, silu_temb: Tensor, kvs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        skips = []
        stats = None  # of x, from the layer before in this block (the next resnet's norm1 reads them)
        for i in range(len(self.resnets)):
            x, stats = self._layer(i, x, silu_temb, kvs, stats, self.groups if i + 1 < len(self.resnets) else None)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, w: dict[str, Tensor], plan: BlockPlan, groups: int, eps: float, kv: CrossAttentionKV,
                 ones: Ones):
        super().__init__(w, plan, groups, eps, kv, ones, first_attn=1)

    def __call__(self, x: Tensor, silu_temb: Tensor, kvs: Sequence[Tensor]) -> Tensor:
        x, stats = self.resnets[0].forward(x, silu_temb, out_groups=self.groups if self.attentions else None)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, kvs, stats), silu_temb)
            stats = None  # a transformer's output comes from a GEMM epilogue: no statistics
        return x


class UpBlock(_Block):
    """UpBlock2D / CrossAttnUpBlock2D: each layer first concatenates the next skip (last in, first out) on the
    channels; then the optional upsampler to the size of the skip the next block starts with."""

    def __init__(self, w: dict[str, Tensor], plan: BlockPlan, groups: int, eps: float, kv: CrossAttentionKV,
                 ones: Ones):
        super().__init__(w, plan, groups, eps, kv, ones)
        self.upsampler = Upsample2D(w, plan.prefix + "upsamplers.0.") if plan.resample else None

    def __call__(self, x: Tensor, skips: list[Tensor], silu_temb: Tensor, kvs: Sequence[Tensor],
                 size: Sequence[int] | None, out_groups: int | None = None) -> tuple[Tensor, ops.GroupStats | None]:
        """skips: this block's len(resnets) skip tensors, in the order the down path made them. out_groups: the
        groups of the GroupNorm that reads the block's output (the UNet's conv_norm_out after the last block); its
        statistics come back when the last layer is a resnet (no transformer or upsampler after it), else None."""
        n, stats = len(self.resnets), None
        for i in range(n):
            # [B, H, W, C + C_skip], with the statistics of the resnet's norm1, which reads it
            x, stats = ops.concat_group_stats(x, skips[-1 - i], self.groups)
            last = i + 1 == n and self.upsampler is None
            x, stats = self._layer(i, x, silu_temb, kvs, stats, out_groups if last else None)
        if self.upsampler is not None:
            x = self.upsampler(x, size)
        return x, stats
