"""Writes the text encoder parity fixtures from transformers' CLIPTextModel, CLIPTextModelWithProjection,
T5EncoderModel and UMT5EncoderModel on tiny random configs.

Run with the reference venv (torch + transformers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_text_encoders.py

Written under tests/fixtures/:
  clip_text_tiny/clip_l/   CLIPTextModel, quick_gelu, the legacy eos_token_id 2 (pooled at the largest id), as the
                           published CLIP-L config; stored with the published "text_model." names (transformers 5
                           saves a CLIPTextModel without the prefix; it loads both, checked here)
  clip_text_tiny/bigg/     CLIPTextModelWithProjection, gelu, eos_token_id 997 (pooled at the first 997), a
                           projection to a width unlike the hidden size
  t5_encoder_tiny/t5/      T5EncoderModel, gated-gelu, one relative position table (layer 0)
  t5_encoder_tiny/umt5/    UMT5EncoderModel, a table per layer
  text_encoders_tiny_io.safetensors   inputs and transformers' float32 outputs, "<variant>.<name>":
      clip_l.input_ids [3, 77], clip_l.attention_mask; clip_l.{last_hidden_state, pooler_output, hidden_states} without
      the mask (hidden_states stacked [num_layers + 1, B, S, D]) and clip_l.masked.{last_hidden_state, pooler_output,
      penultimate_hidden_state} with it.
      bigg.input_ids [3, 29] (ids above the eos id before it, and a prompt without eos), bigg.* as above plus
      text_embeds (no mask).
      t5.input_ids [2, 150], t5.attention_mask (the second prompt padded), t5.last_hidden_state, t5.masked.*; the
      same for umt5.
      buckets.<num_buckets>_<max_distance>: int8 T5Attention._relative_position_bucket (bidirectional) of the
      relative positions -R..R, R = (length - 1) / 2.

Weights are rounded to bfloat16 and stored so (as the published checkpoints are), and the reference runs in float32
on exactly those values. Every parameter is re-drawn with a non-trivial spread (the default init zeroes biases and
makes LayerNorms identities), and the generator checks that zeroing any one of them moves the outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.models.t5.modeling_t5 import T5Attention

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IO_FILE = FIXTURES / "text_encoders_tiny_io.safetensors"

CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=48, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
BIGG = dict(vocab_size=1000, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=3,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=48, layer_norm_eps=1e-5,
            bos_token_id=998, eos_token_id=997, pad_token_id=0)
T5 = dict(vocab_size=500, d_model=64, d_kv=32, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
          dropout_rate=0.0)
BUCKET_CONFIGS = {(32, 128): 4096, (20, 50): 600, (64, 256): 1200}  # (num_buckets, max_distance): largest |rel|


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter re-drawn so that it shapes the output, then rounded to bf16 (the stored dtype)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:  # [buckets, heads]: position preferences of a few logits
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "embedding" in name or name.endswith("shared.weight") or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:  # Linear [out, in]: activations stay O(1) through the stack
                p.copy_(torch.randn(p.shape, generator=gen) * (0.7 / math.sqrt(p.shape[1])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def check_every_parameter_matters(model, run, ref: torch.Tensor) -> float:
    """Zero each parameter in turn; the outputs must move (a path that does not matter would not be tested)."""
    worst = float("inf")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_proj.bias"):  # adds q.b_k to every key of a query: softmax cancels it exactly
                continue
            saved = p.clone()
            p.zero_()
            out = run()
            p.copy_(saved)
            change = float((out - ref).norm() / ref.norm())
            if change < 3e-4:  # 3x the CPU parity bound: dropping it would fail the test
                raise SystemExit(f"parameter {name} barely changes the output (rel {change:.2e}); adjust the init")
            worst = min(worst, change)
    return worst


def save_model(model, folder: Path, prefix: str | None = None) -> None:
    """save_pretrained in bf16; with `prefix`, the tensors are renamed to the published layout."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    if prefix is not None:
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        assert not any(k.startswith(prefix) for k in tensors), "transformers already wrote the prefix"
        save_file({prefix + k: v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


# ------------------------------------------------------------------------------------------------- CLIP
def clip_l_inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 77] prompts as the CLIP tokenizer pads them for FLUX: <bos> words <eos> <eos>..., bos 998, eos 999 (the
    largest ids, as in the real vocabulary); lengths 10, 77 (truncated) and 40."""
    bos, eos = 998, 999
    ids = torch.full((3, 77), eos, dtype=torch.long)
    mask = torch.zeros((3, 77), dtype=torch.long)
    for row, n in enumerate((10, 77, 40)):  # n tokens including bos and eos
        ids[row, 0] = bos
        ids[row, 1:n - 1] = torch.randint(3, 990, (n - 2,), generator=gen)
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    return ids, mask


def bigg_inputs(gen: torch.Generator) -> torch.Tensor:
    """[3, 29] prompts with bos 998 and eos 997, where the largest id is not the eos: ids 999 before the eos
    (row 0), after it (row 1), and a prompt without eos (row 2, pooled at position 0 by transformers)."""
    bos, eos = 998, 997
    ids = torch.randint(3, 997, (3, 29), generator=gen)
    ids[:, 0] = bos
    ids[0, 3], ids[0, 12], ids[0, 13:] = 999, eos, 0
    ids[1, 20], ids[1, 21:], ids[1, 25] = eos, 0, 999
    return ids


def clip_outputs(model, ids: torch.Tensor, mask: torch.Tensor | None, with_projection: bool) -> dict:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1, "hidden_states: embeddings + one per layer"
    res = {"last_hidden_state": out.last_hidden_state, "hidden_states": torch.stack(hidden)}
    if with_projection:
        res["text_embeds"] = out.text_embeds
        # the pooled state is what text_projection reads; CLIPTextModelOutput does not return it
        res["pooler_output"] = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
    else:
        res["pooler_output"] = out.pooler_output
    return res


def flat(outputs: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in outputs.values()])


def generate_clip(name: str, cls, cfg: dict, ids: torch.Tensor, mask: torch.Tensor | None, seed: int,
                  io: dict) -> None:
    gen = torch.Generator().manual_seed(seed)
    with_projection = cls is CLIPTextModelWithProjection
    model = cls(CLIPTextConfig(**cfg)).eval()
    randomise(model, gen)
    folder = FIXTURES / "clip_text_tiny" / name
    save_model(model, folder, prefix=None if with_projection else "text_model.")

    expected = clip_outputs(model, ids, None, with_projection)
    worst = check_every_parameter_matters(model, lambda: flat(clip_outputs(model, ids, None, with_projection)),
                                          flat(expected))
    # transformers reads the stored folder back to the same outputs (the published-name layout included)
    reloaded = cls.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(flat(clip_outputs(reloaded, ids, None, with_projection)), flat(expected))

    io[f"{name}.input_ids"] = ids
    io.update({f"{name}.{k}": v for k, v in expected.items()})
    if mask is not None:
        io[f"{name}.attention_mask"] = mask
        masked = clip_outputs(model, ids, mask, with_projection)
        masked["penultimate_hidden_state"] = masked.pop("hidden_states")[-2]  # the one pipelines read (fixture size)
        io.update({f"{name}.masked.{k}": v for k, v in masked.items()})
    print(f"{name}: last_hidden_state {tuple(expected['last_hidden_state'].shape)} std "
          f"{expected['last_hidden_state'].std():.3f}; least sensitive parameter moves the outputs by {worst:.2e}; "
          f"{size_of(folder) / 1e6:.2f} MB")


# --------------------------------------------------------------------------------------------------- T5
def t5_inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 150] ids (relative distances past max_distance 128 reach the last buckets); the second prompt is 97
    tokens then padding (pad id 0), as a tokenizer with padding="max_length" gives it."""
    ids = torch.randint(2, T5["vocab_size"], (2, 150), generator=gen)
    mask = torch.ones((2, 150), dtype=torch.long)
    ids[1, 96], ids[1, 97:], mask[1, 97:] = 1, 0, 0  # eos 1, then pad 0
    return ids, mask


def generate_t5(name: str, cls, config, ids: torch.Tensor, mask: torch.Tensor, seed: int, io: dict) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = cls(config).eval()
    randomise(model, gen)
    folder = FIXTURES / "t5_encoder_tiny" / name
    save_model(model, folder)

    def run(m=model, attention_mask=None):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    expected = run()
    worst = check_every_parameter_matters(model, run, expected)
    reloaded = cls.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(run(reloaded), expected)
    io[f"{name}.input_ids"] = ids
    io[f"{name}.attention_mask"] = mask
    io[f"{name}.last_hidden_state"] = expected
    io[f"{name}.masked.last_hidden_state"] = run(attention_mask=mask)
    print(f"{name}: last_hidden_state {tuple(expected.shape)} std {expected.std():.3f}; least sensitive parameter "
          f"moves the output by {worst:.2e}; {size_of(folder) / 1e6:.2f} MB")


def bucket_tables(io: dict) -> None:
    for (num_buckets, max_distance), reach in BUCKET_CONFIGS.items():
        rel = torch.arange(-reach, reach + 1)
        buckets = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance)
        io[f"buckets.{num_buckets}_{max_distance}"] = buckets.to(torch.int8)


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    io: dict[str, torch.Tensor] = {}

    ids, mask = clip_l_inputs(gen)
    generate_clip("clip_l", CLIPTextModel, CLIP_L, ids, mask, seed=0, io=io)
    generate_clip("bigg", CLIPTextModelWithProjection, BIGG, bigg_inputs(gen), None, seed=1, io=io)

    ids, mask = t5_inputs(gen)
    generate_t5("t5", T5EncoderModel, T5Config(**T5), ids, mask, seed=2, io=io)
    generate_t5("umt5", UMT5EncoderModel, UMT5Config(**T5), ids, mask, seed=3, io=io)
    bucket_tables(io)

    save_file({k: v.contiguous().clone() for k, v in io.items()}, str(IO_FILE))
    print(f"{IO_FILE.name}: {len(io)} tensors, {IO_FILE.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
