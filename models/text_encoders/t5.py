"""T5 v1.1 encoder (FLUX.1, SD3) and UMT5 encoder (Wan), computing what transformers' T5EncoderModel and
UMT5EncoderModel compute, on fastdm's op API.

Shape: token ids [B, S] are embedded ("shared") to [B, S, d_model]; then `num_layers` blocks, each
x + o(attention(RMSNorm x)) and x + wo(act(wi_0 x) * wi_1 x) on RMSNorm x (gated-gelu with the tanh GELU in T5 v1.1
and UMT5), and a final RMSNorm. T5's RMSNorm (T5LayerNorm) has no mean subtraction and no bias and is computed in
float32. Attention has no 1/sqrt(d) scaling; positions enter as an additive bias [H, S, S] looked up from a learned
table [num_buckets, H] at the bucket of each relative position (key - query): exact buckets near the diagonal,
logarithmic ones up to max_distance. T5 reads the table of layer 0 in every layer; UMT5 (config model_type "umt5")
has one table per layer. The bucket ids are integers, computed once per sequence length on the host.

Weights are looked up by transformers' names. The embedding is "shared.weight" (also accepted under its tied name
"encoder.embed_tokens.weight"); decoder and lm_head tensors of a full encoder-decoder checkpoint are ignored. At load
time q/k/v are concatenated, and so are wi_1 and wi_0, so one GEMM produces each group.

T5 activations outgrow float16's range: the model runs in bfloat16 or float32 and refuses float16.
Attention with a bias is written out (matmul, add, softmax, matmul) because the op API's fused attention takes only
a key padding mask; a bias input on ops.attention would replace it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime import dtypes, ops, safetensors
from ...runtime.dtypes import DType
from ...runtime.errors import ModelLayoutError, UnsupportedDtypeError
from ...runtime.tensor import Tensor
from ..loading import check_model_weights, check_weights, component_folder, read_config
from .clip import attention_with_bias, key_mask, mask_value, token_ids

EMBEDDING = "shared.weight"
TIED_EMBEDDING = "encoder.embed_tokens.weight"
IGNORED_PREFIXES = ("decoder.", "lm_head.")
# transformers' ACT2FN names -> ops activation
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
               "silu": "silu", "swish": "silu"}


# ------------------------------------------------------------------------------------------------- config
@dataclass
class T5Config:
    """The fields of a T5Config / UMT5Config config.json that the encoder uses (defaults are transformers' T5
    defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    model_type: str = "t5"
    architectures: list[str] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ("t5", "umt5"):
            raise ModelLayoutError(f"T5 config: model_type {self.model_type!r} is not a T5 encoder ('t5' or 'umt5')")
        _ = self.activation  # raises for a feed_forward_proj fastdm cannot run

    @property
    def is_gated(self) -> bool:
        """act(wi_0 x) * wi_1 x (T5 v1.1, UMT5) rather than act(wi x) (original T5)."""
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """The FFN activation as an ops name, from feed_forward_proj "ACT" or "gated-ACT" as transformers reads it."""
        parts = self.feed_forward_proj.split("-")
        if (len(parts) == 2 and parts[0] != "gated") or len(parts) > 2:
            raise ModelLayoutError(f"T5 config: feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or "
                                   "'gated-ACT'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]  # T5 v1.1's name for tanh GELU
        if act not in ACTIVATIONS:
            raise ModelLayoutError(f"T5 config: feed_forward_proj {self.feed_forward_proj!r} is not supported (the "
                                   "original T5's relu FFN among them); fastdm runs T5 v1.1 / UMT5 ('gated-gelu') and "
                                   f"the activations {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def bias_per_layer(self) -> bool:
        """UMT5 learns a relative position table in every layer; T5 only in layer 0, shared by all."""
        return self.model_type == "umt5" or any(a.startswith("UMT5") for a in self.architectures or ())


def _bias_name(i: int) -> str:
    return f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"


def expected_weights(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers T5EncoderModel / UMT5EncoderModel state dict with its shape."""
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (cfg.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(cfg.num_layers):
        attn, ff = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for name in "qkv":
            shapes[f"{attn}SelfAttention.{name}.weight"] = (inner, d)
        shapes[attn + "SelfAttention.o.weight"] = (d, inner)
        if i == 0 or cfg.bias_per_layer:
            shapes[_bias_name(i)] = (cfg.relative_attention_num_buckets, cfg.num_heads)
        shapes[attn + "layer_norm.weight"] = (d,)
        for name in (("wi_0", "wi_1") if cfg.is_gated else ("wi",)):
            shapes[f"{ff}DenseReluDense.{name}.weight"] = (f, d)
        shapes[ff + "DenseReluDense.wo.weight"] = (d, f)
        shapes[ff + "layer_norm.weight"] = (d,)
    return shapes


def encoder_names(names: Iterable[str]) -> dict[str, str]:
    """Stored name -> transformers name of every tensor the encoder reads: the tied embedding name becomes
    "shared.weight" when that is absent (and is skipped when both are stored); decoder / lm_head tensors are left
    out."""
    names = [n for n in names if not n.startswith(IGNORED_PREFIXES)]
    has_shared = EMBEDDING in names
    return {n: EMBEDDING if n == TIED_EMBEDDING else n for n in names if not (n == TIED_EMBEDDING and has_shared)}


def _check_dtype(dt: DType, where: str) -> None:
    if dt == dtypes.float16:
        raise UnsupportedDtypeError(f"{where}: T5 encoders overflow float16 (their activations exceed 65504); load "
                                    "with dtype='bfloat16' (or 'float32')")


# ---------------------------------------------------------------------------------------- position bias
def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> np.ndarray:
    """T5's bucket (int64) of each relative position (key - query), as transformers'
    T5Attention._relative_position_bucket computes it: half the buckets per direction (bidirectional); within those,
    one bucket per distance below half of them, then logarithmic bins up to max_distance, the last bin holding every
    longer distance. The logarithm step repeats torch's float32 arithmetic, truncation included."""
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    f32 = np.float32
    # log(rel / max_exact) / log(max_distance / max_exact) * (num_buckets - max_exact) in float32 steps, as torch;
    # the float32 log is the correctly rounded one (evaluated in float64). Distances below max_exact are clamped
    # here only to keep log finite: they take their exact bucket below.
    ratio = np.maximum(rel, max_exact).astype(f32) / f32(max_exact)
    log = np.log(ratio.astype(np.float64)).astype(f32)
    scaled = log / f32(math.log(max_distance / max_exact)) * f32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


@lru_cache(maxsize=8)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                              bidirectional: bool = True) -> np.ndarray:
    """The bucket of every (query, key) pair: [q_len, k_len] int32, read-only (cached)."""
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    buckets = relative_position_bucket(rel, num_buckets, max_distance, bidirectional).astype(np.int32)
    buckets.flags.writeable = False
    return buckets


# ------------------------------------------------------------------------------------------------ blocks
class T5Block:
    """x + o(attention(RMSNorm x, + position bias)), then x + wo(FFN(RMSNorm x))."""

    def __init__(self, w: dict[str, Tensor], i: int, cfg: T5Config):
        attn, ff = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        self.heads, self.d_kv, self.eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        self.gated, self.act, self.d_ff = cfg.is_gated, cfg.activation, cfg.d_ff
        self.norm1 = w.pop(attn + "layer_norm.weight")
        self.qkv = ops.concat([w.pop(f"{attn}SelfAttention.{n}.weight") for n in "qkv"], axis=0)  # [3 H d_kv, D]
        self.o = w.pop(attn + "SelfAttention.o.weight")  # [D, H d_kv]
        self.relative_bias = w.pop(_bias_name(i), None)  # [num_buckets, H]: layer 0 (T5), every layer (UMT5)
        self.norm2 = w.pop(ff + "layer_norm.weight")
        if self.gated:
            # [wi_1; wi_0]: ops.gelu_mul takes (h, g) halves and returns h * gelu(g)
            self.wi = ops.concat([w.pop(ff + "DenseReluDense.wi_1.weight"), w.pop(ff + "DenseReluDense.wi_0.weight")],
                                 axis=0)  # [2F, D]
        else:
            self.wi = w.pop(ff + "DenseReluDense.wi.weight")  # [F, D]
        self.wo = w.pop(ff + "DenseReluDense.wo.weight")  # [D, F]

    def _ffn(self, h: Tensor) -> Tensor:
        if not self.gated:
            return ops.linear(h, self.wi, activation=self.act)  # [B, S, F]
        y = ops.linear(h, self.wi)  # [B, S, 2F]: wi_1 h, wi_0 h
        if self.act in ("gelu", "gelu_tanh"):
            return ops.gelu_mul(y, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return ops.mul(ops.silu(y.narrow(-1, self.d_ff, self.d_ff)), y.narrow(-1, 0, self.d_ff))

    def __call__(self, x: Tensor, bias: Tensor) -> Tensor:
        # x: [B, S, D]; bias: [H, S, S] position bias, or [B, H, S, S] with key padding folded in
        b, s, _ = x.shape
        qkv = ops.linear(ops.rms_norm(x, self.norm1, eps=self.eps), self.qkv).view(b, s, 3, self.heads, self.d_kv)
        attn = attention_with_bias(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, 1.0)  # T5 does not scale
        x = ops.add(x, ops.linear(attn.view(b, s, self.heads * self.d_kv), self.o))
        return ops.add(x, ops.linear(self._ffn(ops.rms_norm(x, self.norm2, eps=self.eps)), self.wo))


# ------------------------------------------------------------------------------------------------- model
class T5EncoderModel:
    """The T5 v1.1 / UMT5 encoder. Build with `from_pretrained(folder)` or from a weights dict (transformers names).
    Calling it returns last_hidden_state [B, S, d_model]."""

    def __init__(self, config: T5Config, weights: dict[str, Tensor], source: str = "the weights dict"):
        """`weights` maps transformers state-dict names to Tensors (all on one device, in bfloat16 or float32). The
        dict is consumed: tensors are removed from it as they are fused, so a checkpoint is never held twice. Pass
        `dict(weights)` to keep yours."""
        names = encoder_names(weights)
        w = {name: weights.pop(stored) for stored, name in names.items()}
        check_model_weights(w, expected_weights(config), self.what(config), source)
        cfg = self.config = config
        self.embedding = w.pop(EMBEDDING)  # [V, D]
        self.device = self.embedding.device
        self.dtype: DType = self.embedding.dtype
        _check_dtype(self.dtype, source)
        self.blocks = [T5Block(w, i, cfg) for i in range(cfg.num_layers)]
        self.final_norm = w.pop("encoder.final_layer_norm.weight")
        self._buckets: tuple[int, Tensor] | None = None

    @staticmethod
    def what(config: T5Config) -> str:
        return "UMT5 encoder (UMT5EncoderModel)" if config.bias_per_layer else "T5 encoder (T5EncoderModel)"

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = "cpu", dtype: Any = None,
                        subfolder: str = "text_encoder_2") -> T5EncoderModel:
        """Load a transformers T5EncoderModel / UMT5EncoderModel folder (config.json + model*.safetensors), or a
        pipeline root holding it in `subfolder` (FLUX.1: text_encoder_2, SD3: text_encoder_3, Wan: text_encoder).
        `dtype` None keeps the stored dtype; float16 is refused (T5 overflows it)."""
        folder = component_folder(folder, subfolder)
        config = read_config(T5Config, folder)
        ckpt = safetensors.open_checkpoint(folder)
        try:
            names = encoder_names(ckpt.keys())
            check_weights({name: ckpt.shape(stored) for stored, name in names.items()}, expected_weights(config),
                          cls.what(config), str(folder))
            stored_dtype = ckpt.dtype(next(s for s, n in names.items() if n == EMBEDDING))
            _check_dtype(dtypes.dtype(dtype) if dtype is not None else stored_dtype, str(folder))
            weights = safetensors.load(ckpt, device=device, dtype=dtype, names=list(names))
        finally:
            ckpt.close()  # loaded CPU tensors keep their own mappings
        return cls(config, weights, source=str(folder))

    def _bucket_ids(self, s: int) -> Tensor:
        """The bucket of every (query, key) pair, [S, S] int32 on the model's device; kept for the last length."""
        if self._buckets is None or self._buckets[0] != s:
            cfg = self.config
            table = relative_position_buckets(s, s, cfg.relative_attention_num_buckets,
                                              cfg.relative_attention_max_distance)
            self._buckets = (s, Tensor.from_numpy(np.ascontiguousarray(table), device=self.device))
        return self._buckets[1]

    def _bias(self, table: Tensor, s: int, padding: Tensor | None) -> Tensor:
        """Position bias [H, S, S] from a relative position table, plus the key padding bias when there is one."""
        bias = ops.permute(ops.embedding(self._bucket_ids(s), table), (2, 0, 1))  # [S, S, H] -> [H, S, S]
        if padding is None:
            return bias
        b, h = padding.shape[0], bias.shape[0]
        return ops.add(bias.unsqueeze(0).expand(b, h, s, s), padding)  # [B, H, S, S]

    def forward(self, input_ids: Any, attention_mask: Any = None) -> Tensor:
        """Encode token ids [B, S] (numpy or Tensor). attention_mask [B, S] (1 = token, 0 = padding) is optional: the
        FLUX / SD3 pipelines pass none, Wan passes one. Returns last_hidden_state [B, S, d_model] on the model's
        device, in its dtype."""
        cfg = self.config
        ids = token_ids(input_ids, cfg.vocab_size, None, type(self).__name__)
        b, s = ids.shape
        mask = key_mask(attention_mask, (b, s), type(self).__name__)
        padding = None
        if mask is not None:
            values = np.where(mask, 0.0, mask_value(self.dtype)).astype(self.dtype.np).reshape(b, 1, 1, s)
            padding = Tensor.from_numpy(values, device=self.device)  # [B, 1, 1, S]
        x = ops.embedding(Tensor.from_numpy(ids, device=self.device), self.embedding)  # [B, S, D]
        bias = None
        for block in self.blocks:
            if block.relative_bias is not None:  # T5: layer 0 only, then reused; UMT5: every layer
                bias = self._bias(block.relative_bias, s, padding)
            x = block(x, bias)
        return ops.rms_norm(x, self.final_norm, eps=cfg.layer_norm_epsilon)

    __call__ = forward
