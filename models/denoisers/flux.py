"""FLUX.1 transformer (Black Forest Labs), the rectified-flow MMDiT of FLUX.1-dev / -schnell, computing what
diffusers' FluxTransformer2DModel computes, on fastdm's op API.

Shape: text tokens [B, S_txt, joint_dim] and packed image latents [B, S_img, in_ch] are embedded to width
D = heads * head_dim; the conditioning vector temb = time + guidance + pooled-text embeddings drives every adaLN.
`num_layers` double-stream blocks keep separate weights for the two streams but attend jointly over [txt, img];
`num_single_layers` single-stream blocks then run on the concatenated sequence with parallel attention + MLP;
a final adaLN and projection give the velocity for the image tokens. Positions enter only through 3-axis RoPE on
q and k.

Weights are looked up by diffusers' state-dict names. At load time the projections that read the same input are
concatenated (q|k|v, and the two adaLN linears of a double block) so one GEMM produces them, and the single
block's output projection is split by input columns so its attention and MLP halves need no concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime import ops
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError, ModelLayoutError, ShapeError
from ...runtime.tensor import Tensor, empty
from ..loading import check_model_weights, component_folder, load_weights, read_config

ROPE_THETA = 10000.0
TIME_PROJ_DIM = 256  # width of the sinusoidal timestep / guidance features
MLP_RATIO = 4
EPS = 1e-6  # every LayerNorm and the q/k RMSNorms
WHAT = "FLUX transformer (FluxTransformer2DModel)"


# ------------------------------------------------------------------------------------------------- config
@dataclass
class FluxTransformerConfig:
    """The fields of a FluxTransformer2DModel config.json (defaults are diffusers' defaults)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ModelLayoutError(
                f"FLUX config: axes_dims_rope {list(self.axes_dims_rope)} must be even sizes summing to "
                f"attention_head_dim={self.attention_head_dim}; the config.json does not describe a FLUX transformer")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)


def expected_weights(cfg: FluxTransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers FluxTransformer2DModel state dict with its shape."""
    d, hd = cfg.inner_dim, cfg.attention_head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name: str, n_out: int, n_in: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    embedders = ["timestep_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else [])
    for e in embedders:
        lin(f"time_text_embed.{e}.linear_1", d, TIME_PROJ_DIM)
        lin(f"time_text_embed.{e}.linear_2", d, d)
    lin("time_text_embed.text_embedder.linear_1", d, cfg.pooled_projection_dim)
    lin("time_text_embed.text_embedder.linear_2", d, d)
    lin("context_embedder", d, cfg.joint_attention_dim)
    lin("x_embedder", d, cfg.in_channels)
    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}."
        lin(p + "norm1.linear", 6 * d, d)
        lin(p + "norm1_context.linear", 6 * d, d)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            lin(p + "attn." + proj, d, d)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[p + f"attn.{norm}.weight"] = (hd,)
        for ff in ("ff", "ff_context"):
            lin(p + f"{ff}.net.0.proj", MLP_RATIO * d, d)
            lin(p + f"{ff}.net.2", d, MLP_RATIO * d)
    for i in range(cfg.num_single_layers):
        p = f"single_transformer_blocks.{i}."
        lin(p + "norm.linear", 3 * d, d)
        for proj in ("to_q", "to_k", "to_v"):
            lin(p + "attn." + proj, d, d)
        shapes[p + "attn.norm_q.weight"] = (hd,)
        shapes[p + "attn.norm_k.weight"] = (hd,)
        lin(p + "proj_mlp", MLP_RATIO * d, d)
        lin(p + "proj_out", d, d + MLP_RATIO * d)
    lin("norm_out.linear", 2 * d, d)
    lin("proj_out", cfg.out_dim, d)
    return shapes


# -------------------------------------------------------------------------------------- positions, time
def rope_tables(ids: np.ndarray, axes_dims: Sequence[int], theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """FluxPosEmbed: cos and sin [S, head_dim/2] float32 of the angles pos[s, axis] * theta^(-2j/dim_axis), the
    axes' frequencies side by side. ids: [S, n_axes]. Host float64 maths (as diffusers), rounded once."""
    pos = np.asarray(ids, dtype=np.float32).astype(np.float64)  # diffusers reads ids as float32 first
    angles = np.concatenate(
        [np.outer(pos[:, i], 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
         for i, dim in enumerate(axes_dims)], axis=1)  # [S, head_dim/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _take(w: dict[str, Tensor], prefix: str, name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a Linear, removed from `w` so the checkpoint's copy is freed once fused."""
    return w.pop(f"{prefix}{name}.weight"), w.pop(f"{prefix}{name}.bias")


def _take_fused(w: dict[str, Tensor], prefix: str, names: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Linears reading the same input, stacked along the output dim: one GEMM gives all their outputs."""
    pairs = [_take(w, prefix, n) for n in names]
    return ops.concat([p[0] for p in pairs], axis=0), ops.concat([p[1] for p in pairs], axis=0)


def _modulation(silu_temb: Tensor, linear: tuple[Tensor, Tensor], n: int) -> Tensor:
    """adaLN parameters: linear(silu(temb)) cut into n vectors. Returns [n, B, D] so that m[i] is a contiguous
    [B, D] (at B = 1 no copy is made)."""
    emb = ops.linear(silu_temb, *linear)  # [B, n*D]
    b = emb.shape[0]
    return emb.view(b, n, emb.shape[1] // n).permute(1, 0, 2).contiguous()


class TimestepEmbedder:
    """Timesteps(256, flip_sin_to_cos, shift 0) of 1000 t, then TimestepEmbedding: linear -> silu -> linear."""

    def __init__(self, w: dict[str, Tensor], prefix: str):
        self.linear_1 = _take(w, prefix, "linear_1")
        self.linear_2 = _take(w, prefix, "linear_2")

    def __call__(self, t: Tensor) -> Tensor:
        # t: [B] float32 on the host. The sinusoids (a few hundred numbers) are made there and uploaded, so no
        # device sync is needed to read the timestep; diffusers scales t by 1000 in float32 first, as here.
        feats = ops.timestep_embedding(ops.mul(t, 1000.0), TIME_PROJ_DIM, flip_sin_to_cos=True,
                                       downscale_freq_shift=0.0)  # [B, 256] float32
        weight = self.linear_1[0]
        feats = ops.cast(feats.to(weight.device), weight.dtype)
        return ops.linear(ops.linear(feats, *self.linear_1, activation="silu"), *self.linear_2)  # [B, D]


# ------------------------------------------------------------------------------------------------ blocks
class DoubleStreamBlock:
    """FluxTransformerBlock (MMDiT): per-stream adaLN-Zero, joint attention over [txt, img], per-stream gated
    attention output and gelu-tanh MLP."""

    def __init__(self, w: dict[str, Tensor], prefix: str, cfg: FluxTransformerConfig):
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.ada = _take_fused(w, prefix, ["norm1.linear", "norm1_context.linear"])  # [12D, D]: img 6, txt 6
        self.img_qkv = _take_fused(w, prefix, ["attn.to_q", "attn.to_k", "attn.to_v"])  # [3D, D]
        self.txt_qkv = _take_fused(w, prefix, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])
        self.img_norm_q, self.img_norm_k = w.pop(prefix + "attn.norm_q.weight"), w.pop(prefix + "attn.norm_k.weight")
        self.txt_norm_q = w.pop(prefix + "attn.norm_added_q.weight")
        self.txt_norm_k = w.pop(prefix + "attn.norm_added_k.weight")
        self.img_out = _take(w, prefix, "attn.to_out.0")
        self.txt_out = _take(w, prefix, "attn.to_add_out")
        self.img_ff = (_take(w, prefix, "ff.net.0.proj"), _take(w, prefix, "ff.net.2"))
        self.txt_ff = (_take(w, prefix, "ff_context.net.0.proj"), _take(w, prefix, "ff_context.net.2"))

    def _qkv(self, x: Tensor, qkv: tuple[Tensor, Tensor]) -> Tensor:
        b, s, _ = x.shape
        return ops.linear(x, *qkv).view(b, s, 3, self.heads, self.head_dim)  # [B, S, 3, H, hd]

    @staticmethod
    def _mlp(x: Tensor, ff, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        h = ops.linear(ops.layer_norm_modulate(x, shift, scale, eps=EPS), *ff[0], activation="gelu_tanh")
        return ops.linear_gated_residual(h, *ff[1], gate, x)

    def __call__(self, img: Tensor, txt: Tensor, silu_temb: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        # img: [B, S_img, D], txt: [B, S_txt, D]; cos, sin: [S_txt + S_img, hd/2]
        b, s_txt, d = txt.shape
        s_img = img.shape[1]
        m = _modulation(silu_temb, self.ada, 12)  # [12, B, D]
        # m[0:6]: image shift/scale/gate (attention), shift/scale/gate (MLP); m[6:12]: the same for text

        img_qkv = self._qkv(ops.layer_norm_modulate(img, m[0], m[1], eps=EPS), self.img_qkv)
        txt_qkv = self._qkv(ops.layer_norm_modulate(txt, m[6], m[7], eps=EPS), self.txt_qkv)
        # Joint [txt, img] q, k, v: each stream's q/k RMSNorm + RoPE writes its token range of one buffer.
        joint = empty((b, s_txt + s_img) + img_qkv.shape[2:], img_qkv.dtype, img_qkv.device)  # [B, S, 3, H, hd]
        ops.qk_norm_rope(txt_qkv, self.txt_norm_q, self.txt_norm_k, cos.narrow(0, 0, s_txt),
                         sin.narrow(0, 0, s_txt), eps=EPS, out=joint.narrow(1, 0, s_txt))
        ops.qk_norm_rope(img_qkv, self.img_norm_q, self.img_norm_k, cos.narrow(0, s_txt, s_img),
                         sin.narrow(0, s_txt, s_img), eps=EPS, out=joint.narrow(1, s_txt, s_img))
        q, k, v = joint[:, :, 0], joint[:, :, 1], joint[:, :, 2]  # [B, S, H, hd] views
        del img_qkv, txt_qkv
        attn = ops.attention(q, k, v).view(b, s_txt + s_img, d)  # [B, S, D]

        img = ops.linear_gated_residual(attn.narrow(1, s_txt, s_img).contiguous(), *self.img_out, m[2], img)
        img = self._mlp(img, self.img_ff, m[3], m[4], m[5])
        txt = ops.linear_gated_residual(attn.narrow(1, 0, s_txt).contiguous(), *self.txt_out, m[8], txt)
        txt = self._mlp(txt, self.txt_ff, m[9], m[10], m[11])
        return img, txt


class SingleStreamBlock:
    """FluxSingleTransformerBlock: one adaLN-Zero, then attention and a gelu-tanh MLP in parallel on the same
    normalised input, their outputs projected together (proj_out over [attn, mlp]) into a gated residual."""

    def __init__(self, w: dict[str, Tensor], prefix: str, cfg: FluxTransformerConfig):
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        d = cfg.inner_dim
        self.ada = _take(w, prefix, "norm.linear")  # [3D, D]
        self.qkv = _take_fused(w, prefix, ["attn.to_q", "attn.to_k", "attn.to_v"])  # [3D, D]
        self.norm_q, self.norm_k = w.pop(prefix + "attn.norm_q.weight"), w.pop(prefix + "attn.norm_k.weight")
        self.mlp = _take(w, prefix, "proj_mlp")  # [4D, D]
        out_w, self.out_b = _take(w, prefix, "proj_out")  # [D, D + 4D]
        # proj_out(cat[a, m]) = a @ W[:, :D]^T + m @ W[:, D:]^T + b: two GEMMs into the residual, no concat copy
        self.out_attn_w = out_w.narrow(1, 0, d).contiguous()
        self.out_mlp_w = out_w.narrow(1, d, MLP_RATIO * d).contiguous()

    def __call__(self, x: Tensor, silu_temb: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x: [B, S, D] with S = S_txt + S_img; cos, sin: [S, hd/2]
        b, s, d = x.shape
        m = _modulation(silu_temb, self.ada, 3)  # [3, B, D]: shift, scale, gate
        gate = m[2]
        h = ops.layer_norm_modulate(x, m[0], m[1], eps=EPS)
        mlp = ops.linear(h, *self.mlp, activation="gelu_tanh")  # [B, S, 4D]
        qkv = ops.linear(h, *self.qkv).view(b, s, 3, self.heads, self.head_dim)
        q, k, v = ops.qk_norm_rope(qkv, self.norm_q, self.norm_k, cos, sin, eps=EPS, out=qkv)  # in place
        attn = ops.attention(q, k, v).view(b, s, d)  # [B, S, D]
        x = ops.linear_gated_residual(attn, self.out_attn_w, None, gate, x)
        return ops.linear_gated_residual(mlp, self.out_mlp_w, self.out_b, gate, x)


# ----------------------------------------------------------------------------------------------- model
class FluxTransformer:
    """The FLUX.1 transformer. Build with `from_pretrained(folder)` or from a weights dict (diffusers names)."""

    def __init__(self, config: FluxTransformerConfig, weights: dict[str, Tensor], source: str = "the weights dict"):
        """`weights` maps diffusers state-dict names to Tensors (all on one device, in the compute dtype). The dict
        is consumed: tensors are removed from it as they are fused into the model's layout, so a checkpoint is
        never held twice. Pass `dict(weights)` to keep yours."""
        check_model_weights(weights, expected_weights(config), WHAT, source)
        cfg = self.config = config
        w = weights
        self.device = w["x_embedder.weight"].device
        self.dtype: DType = w["x_embedder.weight"].dtype
        self.time_embedder = TimestepEmbedder(w, "time_text_embed.timestep_embedder.")
        self.guidance_embedder = (TimestepEmbedder(w, "time_text_embed.guidance_embedder.")
                                  if cfg.guidance_embeds else None)
        self.text_embedder = (_take(w, "time_text_embed.text_embedder.", "linear_1"),
                              _take(w, "time_text_embed.text_embedder.", "linear_2"))
        self.context_embedder = _take(w, "", "context_embedder")
        self.x_embedder = _take(w, "", "x_embedder")
        self.double_blocks = [DoubleStreamBlock(w, f"transformer_blocks.{i}.", cfg) for i in range(cfg.num_layers)]
        self.single_blocks = [SingleStreamBlock(w, f"single_transformer_blocks.{i}.", cfg)
                              for i in range(cfg.num_single_layers)]
        self.norm_out = _take(w, "", "norm_out.linear")  # [2D, D]: scale then shift
        self.proj_out = _take(w, "", "proj_out")
        self._rope_cache: tuple[bytes, Tensor, Tensor] | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = "cpu", dtype: Any = None) -> FluxTransformer:
        """Load a diffusers FluxTransformer2DModel folder (config.json + diffusion_pytorch_model*.safetensors), or
        a pipeline root holding transformer/, or a single .safetensors file (original BFL, ComfyUI or diffusers key
        names; the config is read off the tensor shapes). `dtype` None keeps the stored dtype (bf16 for the published
        ones)."""
        if Path(folder).is_file():
            from ..convert.flux_single_file import load_flux_single_file  # imported here: it imports this module

            return load_flux_single_file(folder, device=device, dtype=dtype)
        folder = component_folder(folder, "transformer")
        config = read_config(FluxTransformerConfig, folder)
        weights = load_weights(folder, expected_weights(config), WHAT, device=device, dtype=dtype)
        return cls(config, weights, source=str(folder))

    # ------------------------------------------------------------------------------------------ inputs
    def _tensor(self, x: Any, name: str, shape: Sequence[int | None], dtype: DType) -> Tensor:
        """An input (Tensor or array) on the model's device in `dtype`; None entries of `shape` are free."""
        if not isinstance(x, Tensor):
            x = np.asarray(x, dtype=np.float32)
        fits = len(x.shape) == len(shape) and all(w is None or g == w for g, w in zip(x.shape, shape, strict=True))
        if not fits:
            spec = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ShapeError(f"FluxTransformer: {name} must have shape {spec}, got {list(x.shape)}")
        if not isinstance(x, Tensor):
            x = Tensor.from_numpy(np.ascontiguousarray(x), device=self.device)
        elif x.device != self.device:
            x = x.to(self.device)
        return ops.cast(x, dtype) if x.dtype != dtype else x

    @staticmethod
    def _host_vector(x: Any, name: str, b: int) -> Tensor:
        """A per-sample scalar input (timestep, guidance) as a float32 [B] CPU Tensor; a number is broadcast."""
        arr = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
        arr = np.full(b, arr, dtype=np.float32) if arr.ndim == 0 else np.ascontiguousarray(arr, dtype=np.float32)
        if arr.shape != (b,):
            raise ShapeError(f"FluxTransformer: {name} must be a number or [B] = [{b}] values, got shape "
                             f"{list(arr.shape)}")
        return Tensor.from_numpy(arr)

    def _ids(self, ids: Any, name: str) -> np.ndarray:
        arr = ids.numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        n_axes = len(self.config.axes_dims_rope)
        if arr.ndim != 2 or arr.shape[1] != n_axes:
            raise ShapeError(f"FluxTransformer: {name} must be [S, {n_axes}] position ids (one row per token, no "
                             f"batch dim), got shape {list(arr.shape)}")
        return arr

    def _rope(self, txt_ids: np.ndarray, img_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        """cos, sin [S_txt + S_img, hd/2] on the device; kept while the ids stay the same (every sampling step)."""
        ids = np.concatenate([txt_ids, img_ids], axis=0).astype(np.float32)
        key = ids.tobytes() + bytes(str(ids.shape), "ascii")
        if self._rope_cache is None or self._rope_cache[0] != key:
            cos, sin = rope_tables(ids, self.config.axes_dims_rope)
            self._rope_cache = (key, Tensor.from_numpy(cos, device=self.device),
                                Tensor.from_numpy(sin, device=self.device))
        return self._rope_cache[1], self._rope_cache[2]

    def _conditioning(self, timestep: Any, guidance: Any, pooled: Tensor) -> Tensor:
        """temb = timestep_embedder(1000 t) + guidance_embedder(1000 g) + text_embedder(pooled): [B, D]."""
        b = pooled.shape[0]
        temb = self.time_embedder(self._host_vector(timestep, "timestep", b))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise InvalidArgumentError("FluxTransformer: this checkpoint is guidance-distilled (guidance_embeds="
                                           "true, FLUX.1-dev): pass guidance=[B] guidance scales, e.g. 3.5")
            temb = ops.add(temb, self.guidance_embedder(self._host_vector(guidance, "guidance", b)))
        elif guidance is not None:
            raise InvalidArgumentError("FluxTransformer: this checkpoint has no guidance embedder (guidance_embeds="
                                       "false, e.g. FLUX.1-schnell): pass guidance=None (use true CFG to guide it)")
        text = ops.linear(ops.linear(pooled, *self.text_embedder[0], activation="silu"), *self.text_embedder[1])
        return ops.add(temb, text)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: Any, encoder_hidden_states: Any, pooled_projections: Any, timestep: Any,
                img_ids: Any, txt_ids: Any, guidance: Any = None) -> Tensor:
        """Velocity prediction for the packed image latents.

        hidden_states [B, S_img, in_ch], encoder_hidden_states [B, S_txt, joint_dim], pooled_projections
        [B, pooled_dim]; timestep [B] in [0, 1] (sigma: the model multiplies by 1000, as diffusers does);
        img_ids [S_img, 3], txt_ids [S_txt, 3] position ids; guidance [B] scale (guidance-distilled models only).
        Tensors or numpy arrays; returns [B, S_img, patch^2 * out_ch] on the model's device."""
        cfg, dt = self.config, self.dtype
        x = self._tensor(hidden_states, "hidden_states", (None, None, cfg.in_channels), dt)
        b, s_img = x.shape[0], x.shape[1]
        ctx = self._tensor(encoder_hidden_states, "encoder_hidden_states", (b, None, cfg.joint_attention_dim), dt)
        s_txt = ctx.shape[1]
        pooled = self._tensor(pooled_projections, "pooled_projections", (b, cfg.pooled_projection_dim), dt)
        img_ids, txt_ids = self._ids(img_ids, "img_ids"), self._ids(txt_ids, "txt_ids")
        if img_ids.shape[0] != s_img or txt_ids.shape[0] != s_txt:
            raise ShapeError(f"FluxTransformer: img_ids / txt_ids have {img_ids.shape[0]} / {txt_ids.shape[0]} rows "
                             f"for {s_img} image and {s_txt} text tokens; give one id row per token")

        silu_temb = ops.silu(self._conditioning(timestep, guidance, pooled))  # [B, D]: every adaLN reads silu(temb)
        cos, sin = self._rope(txt_ids, img_ids)  # [S_txt + S_img, hd/2]
        img = ops.linear(x, *self.x_embedder)  # [B, S_img, D]
        txt = ops.linear(ctx, *self.context_embedder)  # [B, S_txt, D]

        for block in self.double_blocks:
            img, txt = block(img, txt, silu_temb, cos, sin)
        h = ops.concat([txt, img], axis=1)  # [B, S_txt + S_img, D]
        for block in self.single_blocks:
            h = block(h, silu_temb, cos, sin)

        img = h.narrow(1, s_txt, s_img).contiguous()  # [B, S_img, D]
        m = _modulation(silu_temb, self.norm_out, 2)  # AdaLayerNormContinuous: m[0] is the scale, m[1] the shift
        img = ops.layer_norm_modulate(img, m[1], m[0], eps=EPS)
        return ops.linear(img, *self.proj_out)  # [B, S_img, patch^2 * out_ch]

    __call__ = forward
