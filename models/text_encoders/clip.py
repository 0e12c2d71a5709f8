"""CLIP text encoders: OpenAI CLIP-L (FLUX.1, SDXL, SD3) and OpenCLIP-bigG with its text projection (SDXL, SD3),
computing what transformers' CLIPTextModel and CLIPTextModelWithProjection compute, on fastdm's op API.

Shape: token ids [B, S] (S <= max_position_embeddings, 77) become token + position embeddings [B, S, D]; then
`num_hidden_layers` pre-LN transformer layers (causal self-attention, then an MLP with quick_gelu for CLIP-L or gelu
for bigG), each adding into the residual stream; a final LayerNorm gives last_hidden_state. The pooled output is the
final state at the end-of-text token; the projection model maps it through text_projection (no bias) to text_embeds.
Pipelines also read hidden_states[-2], the penultimate layer's output before the final LayerNorm.

Weights are looked up by transformers' names. Published checkpoints (saved by transformers 4) name them
"text_model.<...>"; transformers 5 saves a CLIPTextModel without that prefix; both load. Older checkpoints also carry
the integer buffer "text_model.embeddings.position_ids", which is ignored. At load time q/k/v are concatenated so one
GEMM produces them.

Attention: the op API's fused attention takes only a key padding mask, and CLIP's is causal, so attention here is
written out (`attention_with_bias`: matmul, additive bias, softmax, matmul). At 77 tokens that costs little; a causal
flag on ops.attention would replace it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ...runtime import ops, safetensors
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError, ModelLayoutError, ShapeError, UnsupportedDtypeError
from ...runtime.tensor import Tensor
from ..loading import check_model_weights, check_weights, component_folder, read_config

WHAT = "CLIP text encoder (CLIPTextModel)"
WHAT_PROJECTION = "CLIP text encoder with projection (CLIPTextModelWithProjection)"
PREFIX = "text_model."
# Non-parameter buffers some checkpoints carry; the model recomputes them.
IGNORED = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})
# transformers' ACT2FN names -> how the MLP computes them
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}
# transformers keeps this eos_token_id of configs written before its PR #24773 (the published CLIP-L and bigG
# configs among them) and then pools at the largest token id instead of at the first end-of-text token.
LEGACY_EOS_TOKEN_ID = 2


# ------------------------------------------------------------------------------------------------- config
@dataclass
class CLIPTextConfig:
    """The fields of a CLIPTextConfig config.json that the text model uses (defaults are transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLayoutError(f"CLIP text config: hidden_act {self.hidden_act!r} is not supported; fastdm runs "
                                   f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelLayoutError(f"CLIP text config: hidden_size {self.hidden_size} is not a multiple of "
                                   f"num_attention_heads {self.num_attention_heads}")
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            raise ModelLayoutError(f"CLIP text config: eos_token_id must be one integer (the id that ends a prompt), "
                                   f"got {self.eos_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def expected_weights(cfg: CLIPTextConfig, with_projection: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers CLIPTextModel(WithProjection) state dict, by its published name, with its
    shape."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    p = PREFIX
    shapes: dict[str, tuple[int, ...]] = {
        p + "embeddings.token_embedding.weight": (cfg.vocab_size, d),
        p + "embeddings.position_embedding.weight": (cfg.max_position_embeddings, d),
        p + "final_layer_norm.weight": (d,),
        p + "final_layer_norm.bias": (d,),
    }
    for i in range(cfg.num_hidden_layers):
        layer = f"{p}encoder.layers.{i}."
        for name, n_out, n_in in (("self_attn.q_proj", d, d), ("self_attn.k_proj", d, d), ("self_attn.v_proj", d, d),
                                  ("self_attn.out_proj", d, d), ("mlp.fc1", f, d), ("mlp.fc2", d, f)):
            shapes[f"{layer}{name}.weight"] = (n_out, n_in)
            shapes[f"{layer}{name}.bias"] = (n_out,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
    if with_projection:
        shapes["text_projection.weight"] = (cfg.projection_dim, d)
    return shapes


def published_names(names: Iterable[str]) -> dict[str, str]:
    """Stored name -> published name ("text_model." prefix) of every tensor the model reads; ignored buffers are
    left out. A checkpoint without any prefixed name is taken as transformers 5's CLIPTextModel layout."""
    names = [n for n in names if n not in IGNORED]
    prefixed = any(n.startswith(PREFIX) for n in names)
    return {n: n if prefixed or n.startswith("text_projection.") else PREFIX + n for n in names}


# ----------------------------------------------------------------------------------------------- helpers
def mask_value(dtype: DType) -> float:
    """The additive bias that removes a key: the most negative finite value of `dtype`, as transformers uses (a
    query with every key removed then averages them all instead of giving NaN)."""
    return float(ml_dtypes.finfo(dtype.np).min)


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v per head, written out with matmul/add/softmax for the attention variants the
    fused ops.attention does not take (causal, additive position bias). q: [B, Sq, H, D], k, v: [B, Sk, H, D]
    (strided views are fine); bias: broadcastable to [B, H, Sq, Sk], in the activations' dtype. Returns
    [B, Sq, H, D], contiguous."""
    qh = ops.permute(q, (0, 2, 1, 3))  # [B, H, Sq, D]
    kt = ops.permute(k, (0, 2, 3, 1))  # [B, H, D, Sk]
    vh = ops.permute(v, (0, 2, 1, 3))  # [B, H, Sk, D]
    scores = ops.matmul(qh, kt)  # [B, H, Sq, Sk]
    if scale != 1.0:
        scores = ops.mul(scores, scale)
    probs = ops.softmax(ops.add(scores, bias), axis=-1)
    return ops.permute(ops.matmul(probs, vh), (0, 2, 1, 3))  # [B, Sq, H, D]


def eos_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Where transformers reads the pooled output of each prompt: the first `eos_token_id` (0 when there is none),
    or, for the legacy eos_token_id 2, the position of the largest id (the first one on ties). [B, S] -> [B]."""
    ids = np.asarray(input_ids).astype(np.int32)  # transformers compares int32 ids
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return np.argmax(ids, axis=-1)
    return np.argmax(ids == eos_token_id, axis=-1)


def token_ids(input_ids: Any, vocab_size: int, max_length: int | None, who: str) -> np.ndarray:
    """Prompt token ids as a host int64 [B, S] array, checked against the vocabulary and the longest sequence (None:
    any length)."""
    ids = input_ids.numpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise UnsupportedDtypeError(f"{who}: input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or min(ids.shape) < 1:
        raise ShapeError(f"{who}: input_ids must be [B, S] token ids with B, S >= 1, got shape {list(ids.shape)}")
    if max_length is not None and ids.shape[1] > max_length:
        raise ShapeError(f"{who}: input_ids has {ids.shape[1]} tokens per prompt; this model reads at most "
                         f"{max_length}: tokenize with max_length={max_length} and truncation")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InvalidArgumentError(f"{who}: token ids must lie in [0, {vocab_size}), got ids in [{ids.min()}, "
                                   f"{ids.max()}]; was the prompt tokenized with this model's tokenizer?")
    return ids.astype(np.int64)


def key_mask(attention_mask: Any, shape: tuple[int, int], who: str) -> np.ndarray | None:
    """A host bool [B, S] mask (True = a real token) from a 0/1 or bool attention_mask; None stays None."""
    if attention_mask is None:
        return None
    mask = attention_mask.numpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask)
    if mask.shape != shape:
        raise ShapeError(f"{who}: attention_mask must be [B, S] = {list(shape)} like input_ids, got {list(mask.shape)}")
    return mask != 0


def _take(w: dict[str, Tensor], prefix: str, name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a Linear, removed from `w` so the checkpoint's copy is freed once fused."""
    return w.pop(f"{prefix}{name}.weight"), w.pop(f"{prefix}{name}.bias")


# ------------------------------------------------------------------------------------------------ blocks
class CLIPEncoderLayer:
    """Pre-LN transformer layer: x + out_proj(causal self-attention(LN1 x)), then x + fc2(act(fc1(LN2 x)))."""

    def __init__(self, w: dict[str, Tensor], prefix: str, cfg: CLIPTextConfig):
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.eps = cfg.layer_norm_eps
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.norm1 = _take(w, prefix, "layer_norm1")
        qkv = [_take(w, prefix + "self_attn.", n) for n in ("q_proj", "k_proj", "v_proj")]
        self.qkv = (ops.concat([p[0] for p in qkv], axis=0), ops.concat([p[1] for p in qkv], axis=0))  # [3D, D]
        self.out = _take(w, prefix + "self_attn.", "out_proj")
        self.norm2 = _take(w, prefix, "layer_norm2")
        self.fc1 = _take(w, prefix + "mlp.", "fc1")
        self.fc2 = _take(w, prefix + "mlp.", "fc2")

    def __call__(self, x: Tensor, bias: Tensor) -> Tensor:
        # x: [B, S, D]; bias: [S, S] causal, or [B, 1, S, S] causal + key padding
        b, s, d = x.shape
        qkv = ops.linear(ops.layer_norm(x, *self.norm1, eps=self.eps), *self.qkv).view(b, s, 3, self.heads,
                                                                                        self.head_dim)
        attn = attention_with_bias(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, self.head_dim ** -0.5)
        x = ops.add(x, ops.linear(attn.view(b, s, d), *self.out))
        h = ops.layer_norm(x, *self.norm2, eps=self.eps)
        if self.act == "quick_gelu":
            h = ops.quick_gelu(ops.linear(h, *self.fc1))
        else:
            h = ops.linear(h, *self.fc1, activation=self.act)  # [B, S, F]
        return ops.add(x, ops.linear(h, *self.fc2))


# ----------------------------------------------------------------------------------------------- models
@dataclass
class CLIPTextOutput:
    """What a CLIP text encoder returns (transformers' field names)."""

    last_hidden_state: Tensor  # [B, S, D], after the final LayerNorm
    pooler_output: Tensor  # [B, D]: last_hidden_state at each prompt's end-of-text token
    hidden_states: list[Tensor] | None = None  # with output_hidden_states: the embeddings, then every layer's output
    # (num_hidden_layers + 1 entries, no final LayerNorm); hidden_states[-2] is the penultimate layer's
    text_embeds: Tensor | None = None  # [B, projection_dim] (CLIPTextModelWithProjection only)


class CLIPTextModel:
    """The CLIP text transformer (CLIP-L in FLUX.1 / SDXL / SD3). Build with `from_pretrained(folder)` or from a
    weights dict (transformers names)."""

    WITH_PROJECTION = False
    WHAT = WHAT

    def __init__(self, config: CLIPTextConfig, weights: dict[str, Tensor], source: str = "the weights dict"):
        """`weights` maps transformers state-dict names to Tensors (all on one device, in the compute dtype). The
        dict is consumed: tensors are removed from it as they are fused, so a checkpoint is never held twice. Pass
        `dict(weights)` to keep yours."""
        names = published_names(weights)
        w = {published: weights.pop(stored) for stored, published in names.items()}
        check_model_weights(w, expected_weights(config, self.WITH_PROJECTION), self.WHAT, source)
        cfg = self.config = config
        self.token_embedding = w.pop(PREFIX + "embeddings.token_embedding.weight")  # [V, D]
        self.position_embedding = w.pop(PREFIX + "embeddings.position_embedding.weight")  # [P, D]
        self.device = self.token_embedding.device
        self.dtype: DType = self.token_embedding.dtype
        self.layers = [CLIPEncoderLayer(w, f"{PREFIX}encoder.layers.{i}.", cfg) for i in range(cfg.num_hidden_layers)]
        self.final_norm = _take(w, PREFIX, "final_layer_norm")
        self.text_projection = w.pop("text_projection.weight") if self.WITH_PROJECTION else None  # [P, D]
        self._causal: dict[int, Tensor] = {}

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = "cpu", dtype: Any = None,
                        subfolder: str = "text_encoder") -> CLIPTextModel:
        """Load a transformers CLIP text model folder (config.json + model*.safetensors), or a pipeline root holding
        it in `subfolder` (SDXL's bigG is in text_encoder_2). `dtype` None keeps the stored dtype."""
        folder = component_folder(folder, subfolder)
        config = read_config(CLIPTextConfig, folder)
        ckpt = safetensors.open_checkpoint(folder)
        try:
            names = published_names(ckpt.keys())
            check_weights({published: ckpt.shape(stored) for stored, published in names.items()},
                          expected_weights(config, cls.WITH_PROJECTION), cls.WHAT, str(folder))
            weights = safetensors.load(ckpt, device=device, dtype=dtype, names=list(names))
        finally:
            ckpt.close()  # loaded CPU tensors keep their own mappings
        return cls(config, weights, source=str(folder))

    def _attention_bias(self, s: int, mask: np.ndarray | None) -> Tensor:
        """Additive attention bias: 0 where query i may read key j (j <= i, and key j a real token), else the
        dtype's most negative value. [S, S] without a mask (cached per length), [B, 1, S, S] with one."""
        if mask is None and s in self._causal:
            return self._causal[s]
        allowed = np.tril(np.ones((s, s), dtype=bool))  # [S, S]
        if mask is not None:
            allowed = allowed[None, None] & mask[:, None, None, :]  # [B, 1, S, S]
        bias = np.where(allowed, 0.0, mask_value(self.dtype)).astype(self.dtype.np)
        tensor = Tensor.from_numpy(bias, device=self.device)
        if mask is None:
            self._causal[s] = tensor
        return tensor

    def forward(self, input_ids: Any, attention_mask: Any = None, output_hidden_states: bool = False) -> CLIPTextOutput:
        """Encode token ids [B, S] (numpy or Tensor). attention_mask [B, S] (1 = token, 0 = padding) is optional:
        the FLUX / SDXL / SD3 pipelines pass none, and the causal mask alone then applies. Returns a CLIPTextOutput
        whose tensors are on the model's device."""
        cfg = self.config
        ids = token_ids(input_ids, cfg.vocab_size, cfg.max_position_embeddings, type(self).__name__)
        b, s = ids.shape
        bias = self._attention_bias(s, key_mask(attention_mask, (b, s), type(self).__name__))
        x = ops.add(ops.embedding(Tensor.from_numpy(ids, device=self.device), self.token_embedding),
                    self.position_embedding.narrow(0, 0, s))  # [B, S, D]
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, bias)
            if hidden is not None:
                hidden.append(x)
        last = ops.layer_norm(x, *self.final_norm, eps=cfg.layer_norm_eps)  # [B, S, D]
        rows = np.arange(b, dtype=np.int64) * s + eos_positions(ids, cfg.eos_token_id)  # flat [B*S] row of each EOS
        pooled = ops.embedding(Tensor.from_numpy(rows, device=self.device), last.view(b * s, cfg.hidden_size))
        text_embeds = None if self.text_projection is None else ops.linear(pooled, self.text_projection)
        return CLIPTextOutput(last, pooled, hidden, text_embeds)

    __call__ = forward


class CLIPTextModelWithProjection(CLIPTextModel):
    """The CLIP text transformer with its text projection (OpenCLIP-bigG in SDXL / SD3, CLIP-L in SD3): the output
    also holds text_embeds = pooler_output @ text_projection.T."""

    WITH_PROJECTION = True
    WHAT = WHAT_PROJECTION

