"""The layers of diffusers' AutoencoderKL encoder and decoder on fastdm's op API: convs, ResnetBlock2D, the
mid-block spatial self-attention, nearest-2x Upsample2D, stride-2 Downsample2D and the GroupNorm-SiLU-conv head.

Each layer pops its tensors (diffusers state-dict names) from the weights dict, so a checkpoint is never held twice.
Activations are channels-last, [B, H, W, C] (the layout of the GPU's implicit-GEMM convolutions; conv weights are
converted to [O, kh, kw, C] at load); the shapes the memory estimates pass around are still written (B, C, H, W),
since only element counts matter there. The encoder and decoder are flat `LayerStack`s: each layer's input is freed
as soon as the layer returns, and every layer can say how many bytes of activations it holds at its peak
(`peak_bytes`), which lets the model decide from shapes alone whether a decode fits a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...runtime import ops
from ...runtime.tensor import Tensor, zeros

EPS = 1e-6  # every GroupNorm of the VAE (resnets, attention, conv_norm_out)
# Attention scores are computed in query chunks of at most about this many bytes ([B, rows, S] in the compute
# dtype), so a 2048x2048 image (65536 latent tokens: a 16 GiB score matrix in bf16) never holds more at once.
ATTN_SCORE_BYTES = 256 << 20
# ops.conv2d on the GPU runs an implicit GEMM (no scratch; zero-padded copies of x and the weight when C or O is not
# a multiple of 8) or, for float32, im2col + GEMM with the NCHW copies of x and of the output, a padded weight and at
# most this many bytes of im2col and GEMM rows per chunk. The estimates below count the larger of the two.
CONV_SCRATCH_BYTES = 256 << 20

Shape = tuple[int, int, int, int]  # [B, C, H, W]


def take(w: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the conv, linear or norm `name`, removed from `w`."""
    return w.pop(f"{name}.weight"), w.pop(f"{name}.bias")


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize


def _round8(v: int) -> int:
    return (v + 7) // 8 * 8


class Conv2d:
    """torch.nn.Conv2d (groups 1, symmetric zero padding) on channels-last activations."""

    def __init__(self, w: dict[str, Tensor], name: str, stride: int = 1, padding: int = 0):
        weight, self.bias = take(w, name)  # [O, C, k, k], [O]
        self.weight = ops.conv_weight_channels_last(weight)  # [O, k, k, C]
        self.stride, self.padding = stride, padding

    def __call__(self, x: Tensor) -> Tensor:
        # x: [B, H, W, C] -> [B, Ho, Wo, O]
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, channels_last=True)

    def out_shape(self, shape: Shape) -> Shape:
        o, kh, kw, _ = self.weight.shape
        p, s = self.padding, self.stride
        return (shape[0], o, (shape[2] + 2 * p - kh) // s + 1, (shape[3] + 2 * p - kw) // s + 1)

    def scratch_bytes(self, shape: Shape, itemsize: int) -> int:
        """The GPU conv's scratch for input `shape` (see CONV_SCRATCH_BYTES)."""
        o, kh, kw, c = self.weight.shape
        b, _, ho, wo = self.out_shape(shape)
        x, out = nbytes(shape, itemsize), b * o * ho * wo * itemsize
        if itemsize == 2:  # 16-bit: the implicit GEMM, which needs scratch only to zero-pad C or O to 8
            padded = 0
            if c % 8:
                padded += (b * shape[2] * shape[3] + o * kh * kw) * _round8(c) * itemsize
            if o % 8:
                padded += (_round8(o) * kh * kw * _round8(c) + b * ho * wo * _round8(o)) * itemsize
            return padded
        kp, op = _round8(c * kh * kw), _round8(o)
        per_row = (kp + op) * itemsize
        return x + out + (op * kp + op) * itemsize + min(b * ho * wo * per_row, CONV_SCRATCH_BYTES)

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        return (nbytes(shape, itemsize) + nbytes(self.out_shape(shape), itemsize)
                + self.scratch_bytes(shape, itemsize))


class ResnetBlock2D:
    """GroupNorm-SiLU-conv3x3, GroupNorm-SiLU-conv3x3, plus the input (through a 1x1 conv_shortcut when the
    channel count changes). No time embedding; output_scale_factor 1; dropout is inference-off."""

    def __init__(self, w: dict[str, Tensor], prefix: str, groups: int, in_ch: int, out_ch: int):
        self.groups = groups
        self.input_groups = groups  # norm1 reads the input: LayerStack hands this layer its GroupStats
        self.norm1 = take(w, prefix + "norm1")
        self.conv1 = Conv2d(w, prefix + "conv1", padding=1)
        self.norm2 = take(w, prefix + "norm2")
        self.conv2 = Conv2d(w, prefix + "conv2", padding=1)
        self.shortcut = Conv2d(w, prefix + "conv_shortcut") if in_ch != out_ch else None

    def forward(self, x: Tensor, x_stats: ops.GroupStats | None = None,
                out_groups: int | None = None) -> tuple[Tensor, ops.GroupStats | None]:
        """x: [B, H, W, C_in] -> [B, H, W, C_out]. x_stats: x's GroupStats, if the layer before made them;
        out_groups: the groups of the GroupNorm that reads the output next (its statistics are taken with the
        residual add), or None."""
        h = ops.group_norm(x, self.groups, *self.norm1, eps=EPS, activation="silu", channels_last=True, stats=x_stats)
        h = self.conv1(h)
        h = ops.group_norm(h, self.groups, *self.norm2, eps=EPS, activation="silu", channels_last=True)
        h = self.conv2(h)
        skip = x if self.shortcut is None else self.shortcut(x)
        return ops.add_group_stats(skip, h, out_groups)

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]

    def out_shape(self, shape: Shape) -> Shape:
        return self.conv1.out_shape(shape)

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        out_shape = self.out_shape(shape)
        x, o = nbytes(shape, itemsize), nbytes(out_shape, itemsize)
        live = [2 * x + o + self.conv1.scratch_bytes(shape, itemsize),  # x, norm1, conv1
                x + 2 * o + self.conv2.scratch_bytes(out_shape, itemsize)]  # x, norm2, conv2
        if self.shortcut is None:
            live.append(x + 2 * o)  # x, h, sum
        else:
            live.append(x + 2 * o + self.shortcut.scratch_bytes(shape, itemsize))
            live.append(x + 3 * o)  # x, h, shortcut, sum
        return max(live)


class SpatialSelfAttention:
    """The mid block's Attention: one head whose dim is the channel count (512 at full size), over the H*W
    positions of a group-normed input, with q/k/v/out linears and a residual.

    ops.attention's GPU kernels take head dims 64 and 128 only, so this is matmul -> softmax -> matmul, over chunks
    of query rows so that the [S, S] score matrix never exists at once. The scores are in the compute dtype (the
    softmax itself runs in float32). The softmax scale 1/sqrt(C) is folded into to_q at load."""

    def __init__(self, w: dict[str, Tensor], prefix: str, groups: int, channels: int):
        self.groups = groups
        self.input_groups = groups  # its GroupNorm reads the input: LayerStack hands this layer its GroupStats
        self.norm = take(w, prefix + "group_norm")
        q_w, q_b = take(w, prefix + "to_q")
        scale = channels ** -0.5
        self.to_q = (ops.mul(q_w, scale), ops.mul(q_b, scale))
        self.to_k = take(w, prefix + "to_k")
        self.to_v = take(w, prefix + "to_v")
        self.to_out = take(w, prefix + "to_out.0")

    @staticmethod
    def _rows(b: int, s: int, itemsize: int) -> int:
        return max(1, min(s, ATTN_SCORE_BYTES // max(1, b * s * itemsize)))

    def forward(self, x: Tensor, x_stats: ops.GroupStats | None = None,
                out_groups: int | None = None) -> tuple[Tensor, ops.GroupStats | None]:
        """x: [B, H, W, C] -> the same shape; x_stats and out_groups as ResnetBlock2D.forward's."""
        b, h, wd, c = x.shape
        s = h * wd
        tokens = ops.group_norm(x, self.groups, *self.norm, eps=EPS, channels_last=True, stats=x_stats)
        tokens = tokens.view(b, s, c)  # [B, S, C]
        q = ops.linear(tokens, *self.to_q)  # [B, S, C], pre-scaled
        k_t = ops.permute(ops.linear(tokens, *self.to_k), (0, 2, 1))  # [B, C, S]
        v = ops.linear(tokens, *self.to_v)  # [B, S, C]
        del tokens
        rows = self._rows(b, s, x.itemsize)
        pieces = []
        for r0 in range(0, s, rows):
            n = min(rows, s - r0)
            q_rows = q if n == s else q.narrow(1, r0, n)  # [B, n, C]
            probs = ops.softmax(ops.matmul(q_rows, k_t), axis=-1)  # [B, n, S]
            pieces.append(ops.matmul(probs, v))  # [B, n, C]
            del probs
        del q, k_t, v
        out = pieces[0] if len(pieces) == 1 else ops.concat(pieces, axis=1)  # [B, S, C]
        del pieces
        return ops.add_group_stats(ops.linear(out, *self.to_out).view(b, h, wd, c), x, out_groups)  # [B, H, W, C]

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]

    def out_shape(self, shape: Shape) -> Shape:
        return shape

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        b, _, h, wd = shape
        s = h * wd
        chunk = b * self._rows(b, s, itemsize) * s * itemsize
        # x, q, k^T, v and the output pieces (5 x), the scores and probabilities of one chunk, and a copied query
        # chunk (at most x)
        return 6 * nbytes(shape, itemsize) + 2 * chunk


class Upsample2D:
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, w: dict[str, Tensor], prefix: str):
        self.conv = Conv2d(w, prefix + "conv", padding=1)

    def __call__(self, x: Tensor) -> Tensor:
        # x: [B, H, W, C] -> [B, 2H, 2W, C]
        return self.conv(ops.upsample_nearest2x(x, channels_last=True))

    def out_shape(self, shape: Shape) -> Shape:
        b, c, h, wd = shape
        return self.conv.out_shape((b, c, 2 * h, 2 * wd))

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        b, c, h, wd = shape
        return nbytes(shape, itemsize) + self.conv.peak_bytes((b, c, 2 * h, 2 * wd), itemsize)


def pad_bottom_right(x: Tensor) -> Tensor:
    """x with one row of zeros below and one column of zeros to the right: torch's F.pad(x, (0, 1, 0, 1)).
    ops.conv2d pads symmetrically only, so the zeros are concatenated (two copies of x, in three layers of the
    encoder against dozens of convs)."""
    b, h, wd, c = x.shape  # channels-last
    x = ops.concat([x, zeros((b, h, 1, c), x.dtype, x.device)], axis=2)  # [B, H, W+1, C]
    return ops.concat([x, zeros((b, 1, wd + 1, c), x.dtype, x.device)], axis=1)  # [B, H+1, W+1, C]


class Downsample2D:
    """diffusers' Downsample2D with padding=0: pad (0, 1, 0, 1), then a 3x3 conv of stride 2."""

    def __init__(self, w: dict[str, Tensor], prefix: str):
        self.conv = Conv2d(w, prefix + "conv", stride=2)

    def __call__(self, x: Tensor) -> Tensor:
        # x: [B, H, W, C] -> [B, H // 2, W // 2, C]
        return self.conv(pad_bottom_right(x))

    def out_shape(self, shape: Shape) -> Shape:
        b, c, h, wd = shape
        return self.conv.out_shape((b, c, h + 1, wd + 1))

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        b, c, h, wd = shape
        padded = (b, c, h + 1, wd + 1)
        x = nbytes(shape, itemsize)
        return max(2 * x + 2 * nbytes(padded, itemsize), x + self.conv.peak_bytes(padded, itemsize))


class NormActConv:
    """conv_norm_out (GroupNorm) + SiLU, fused, then conv_out (3x3): the head of the encoder and the decoder."""

    def __init__(self, w: dict[str, Tensor], prefix: str, groups: int):
        self.groups = groups
        self.input_groups = groups  # conv_norm_out reads the input: LayerStack hands this layer its GroupStats
        self.norm = take(w, prefix + "conv_norm_out")
        self.conv = Conv2d(w, prefix + "conv_out", padding=1)

    def forward(self, x: Tensor, x_stats: ops.GroupStats | None = None,
                out_groups: int | None = None) -> tuple[Tensor, None]:
        """x_stats: x's GroupStats, if the layer before made them; out_groups is not used (a conv writes the output)."""
        h = ops.group_norm(x, self.groups, *self.norm, eps=EPS, activation="silu", channels_last=True, stats=x_stats)
        return self.conv(h), None

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]

    def out_shape(self, shape: Shape) -> Shape:
        return self.conv.out_shape(shape)

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        return nbytes(shape, itemsize) + self.conv.peak_bytes(shape, itemsize)


class LayerStack:
    """Layers run one after the other; each one's input is released when it returns. A layer whose input a
    GroupNorm reads first says so with `input_groups`; the layer before it, when it has a `forward(x, x_stats,
    out_groups)` (ResnetBlock2D, SpatialSelfAttention: their outputs are residual adds), takes that GroupNorm's
    statistics while writing its output and hands them over, so the GroupNorm reads its input once."""

    def __init__(self, layers: Sequence):
        self.layers = list(layers)

    def __call__(self, x: Tensor) -> Tensor:
        stats = None
        for layer, after in zip(self.layers, self.layers[1:] + [None], strict=True):
            if hasattr(layer, "forward"):
                x, stats = layer.forward(x, stats, getattr(after, "input_groups", None))
            else:
                x, stats = layer(x), None
        return x

    def out_shape(self, shape: Shape) -> Shape:
        for layer in self.layers:
            shape = layer.out_shape(shape)
        return shape

    def peak_bytes(self, shape: Shape, itemsize: int) -> int:
        """Activation bytes held at the busiest moment of a run on an input of `shape` (weights not counted)."""
        peak = 0
        for layer in self.layers:
            peak = max(peak, layer.peak_bytes(shape, itemsize))
            shape = layer.out_shape(shape)
        return peak
