"""Writes the tiny FLUX.1 pipeline (the README quick-start model) and its parity fixture from diffusers' FluxPipeline.

Run with the reference venv (torch + diffusers + transformers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_tiny_flux_pipeline.py

Written under tests/fixtures/:
  tiny-flux/                        a FluxPipeline in diffusers' folder layout (model_index.json, scheduler/,
                                    text_encoder/, text_encoder_2/ (sharded, as FLUX.1-dev's), tokenizer/,
                                    tokenizer_2/, transformer/, vae/), weights in bfloat16
  tiny_flux_pipeline_io.safetensors diffusers' outputs for that folder, keys "<case>.<what>"

The components are FLUX.1-dev's architectures at toy widths, with the real tokenizers and vocabularies:
CLIP-L text model (vocab 49408, hidden 32, 2 layers, the legacy eos_token_id 2 of the published config),
T5 v1.1 encoder (vocab 32128, d_model 32, 2 layers, gated-gelu), FluxTransformer2DModel (2 heads x 64, one double
and one single block, guidance embedder, 64 packed input channels), AutoencoderKL (16 latent channels, 4 blocks:
8x spatial factor, FLUX's scaling/shift factors, no quant convs) and FLUX.1-dev's scheduler config. Every parameter is
re-drawn (the default init zeroes adaLN and output layers, which would make the image a constant) and rounded to
bf16; the tokenizer folders are copies of tests/fixtures/tokenizers/{clip,t5} (the files the tokenizer tests check).

The reference is `FluxPipeline.from_pretrained(tiny-flux)` itself, so the committed folder is proven to be a
diffusers pipeline. It runs on the CPU with `generator=torch.Generator("cpu").manual_seed(seed)`:
  float32 (loaded with torch_dtype=float32: the bf16 weights upcast exactly), per case: output_type "latent"
  (the packed latents [B, S, 64]), "np" (float images [B, H, W, 3] in [0, 1]) and "pil" (uint8 pixels), the
  prompt embeddings, the packed latents after every step (callback_on_step_end), and the timestep and guidance
  values the transformer embedded at each step (its `x.to(dtype) * 1000`, recorded from its forward's arguments);
  bfloat16 (torch_dtype=bfloat16), "<case>.bf16.*": the same outputs of a bf16 pipeline, so a bf16 run can be
  judged against the drift bf16 arithmetic itself causes.
  "table.<dtype>.*": the embedded timesteps of 1, 4, 28 and 50-step schedules at 1024x1024 and 512x512 and the
  embedded guidance of several scales, as the pipeline and transformer compute them.

Cases:
  square  two prompts, 64x64, 4 steps, guidance 3.5, seed 0, max_sequence_length 512 (FLUX.1-dev's)
  rect    one long prompt (CLIP truncates it at 77 tokens) with a different prompt_2 for T5 (truncated at
          max_sequence_length 16), height 32 x width 48, 2 steps, num_images_per_prompt 2, seed 0
The torch CPU capability (which Box-Muller kernel drew the noise) is stored in the metadata.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FOLDER = FIXTURES / "tiny-flux"
IO_FILE = FIXTURES / "tiny_flux_pipeline_io.safetensors"
TOKENIZERS = FIXTURES / "tokenizers"

CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5 = dict(vocab_size=32128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
          feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
          layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False)
TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   guidance_embeds=True, axes_dims_rope=[16, 24, 24])
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
           act_fn="silu", latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
           shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
           force_upcast=True)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)  # FLUX.1-dev's scheduler_config

LONG_PROMPT = ("a detailed oil painting of a lighthouse on a rocky cliff at dusk, waves crashing below, seagulls "
               "circling in an orange and violet sky, a small fishing boat with a red sail returning to the harbour, "
               "warm light in the keeper's window, thick impasto brush strokes, dramatic clouds, in the style of the "
               "old dutch masters, museum quality, highly detailed, golden frame, hung in a quiet gallery beside a "
               "window that looks out over a snowy village square")
CASES = {
    "square": dict(prompt=["a photo of a cat wearing a tiny wizard hat", "A red bicycle leaning on a brick wall"],
                   height=64, width=64, num_inference_steps=4, guidance_scale=3.5, seed=0, max_sequence_length=512),
    "rect": dict(prompt=LONG_PROMPT, prompt_2="a lighthouse at dusk, oil painting, waves, seagulls, a boat with a red "
                 "sail, dramatic clouds", height=32, width=48, num_inference_steps=2, guidance_scale=3.5, seed=0,
                 num_images_per_prompt=2, max_sequence_length=16),
}
BF16_CASES = ("square", "rect")
EMBED_TABLE_STEPS = (1, 4, 28, 50)  # schedules whose embedded timesteps are tabulated, at 1024x1024 and 512x512
EMBED_TABLE_GUIDANCE = (1.0, 2.5, 3.5, 4.0, 5.0, 7.5, 30.0)


# ------------------------------------------------------------------------------------------------ weights
def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter re-drawn so that it shapes the output with activations O(1), then rounded to bf16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name or name.endswith(("shared.weight", "embed_tokens.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 4:  # conv [O, C, kh, kw]; the image layer smaller, so few pixels clip at 0 or 255
                gain = 0.5 if name == "decoder.conv_out.weight" else 1.2
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p[0].numel())))
            elif p.ndim == 2:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) * (0.8 / math.sqrt(p.shape[1])))
            elif name.endswith(("norm_q.weight", "norm_k.weight")) or ".norm_added_" in name:
                p.copy_(1.5 + 0.3 * torch.randn(p.shape, generator=gen))  # sharper attention
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def build_pipeline() -> FluxPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP)).eval()
    randomise(text_encoder, torch.Generator().manual_seed(1))
    text_encoder_2 = T5EncoderModel(T5Config(**T5)).eval()
    randomise(text_encoder_2, torch.Generator().manual_seed(2))
    transformer = FluxTransformer2DModel(**TRANSFORMER).eval()
    randomise(transformer, torch.Generator().manual_seed(3))
    vae = AutoencoderKL(**VAE).eval()
    randomise(vae, torch.Generator().manual_seed(4))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZERS / "clip"), text_encoder_2=text_encoder_2,
                        tokenizer_2=T5TokenizerFast.from_pretrained(TOKENIZERS / "t5"), transformer=transformer)


def copy_tokenizer(src: Path, dst: Path, names: list[str]) -> None:
    shutil.rmtree(dst)
    dst.mkdir()
    for name in names:
        shutil.copy(src / name, dst / name)


def save_folder(pipe: FluxPipeline) -> None:
    """save_pretrained in bf16, then the published touches: CLIP's "text_model." names, T5 in two shards, and the
    tokenizer files the fastdm tokenizer tests check."""
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    pipe.to(torch.bfloat16).save_pretrained(FOLDER, safe_serialization=True)
    pipe.to(torch.float32)

    clip_file = FOLDER / "text_encoder" / "model.safetensors"
    tensors = load_file(str(clip_file))
    if not any(k.startswith("text_model.") for k in tensors):  # transformers 5 drops the prefix
        save_file({"text_model." + k: v for k, v in tensors.items()}, str(clip_file), metadata={"format": "pt"})

    t5_dir = FOLDER / "text_encoder_2"
    for f in t5_dir.glob("model*.safetensors*"):
        f.unlink()
    pipe.text_encoder_2.to(torch.bfloat16).save_pretrained(t5_dir, safe_serialization=True, max_shard_size="1MB")
    pipe.text_encoder_2.to(torch.float32)

    copy_tokenizer(TOKENIZERS / "clip", FOLDER / "tokenizer",
                   ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
    copy_tokenizer(TOKENIZERS / "t5", FOLDER / "tokenizer_2",
                   ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"])


# ------------------------------------------------------------------------------------------------ reference
def run_case(pipe: FluxPipeline, case: dict, prefix: str, io: dict) -> None:
    args = {k: v for k, v in case.items() if k != "seed"}
    steps: list[torch.Tensor] = []

    def on_step(_pipe, i, t, kwargs):
        steps.append(kwargs["latents"].clone())
        return {}

    def generator() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(case["seed"])

    # what the transformer embeds: its forward computes `x.to(dtype) * 1000` for timestep and guidance
    embedded: dict[str, list[torch.Tensor]] = {"timestep": [], "guidance": []}
    forward = pipe.transformer.forward

    def recording_forward(*a, **kw):
        for key in embedded:
            embedded[key].append((kw[key].to(pipe.transformer.dtype) * 1000).float())
        return forward(*a, **kw)

    with torch.no_grad():
        pipe.transformer.forward = recording_forward
        latents = pipe(**args, generator=generator(), output_type="latent", callback_on_step_end=on_step).images
        pipe.transformer.forward = forward
        images = pipe(**args, generator=generator(), output_type="np").images
        pils = pipe(**args, generator=generator(), output_type="pil").images
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=case["prompt"], prompt_2=case.get("prompt_2"),
                                                      num_images_per_prompt=case.get("num_images_per_prompt", 1),
                                                      max_sequence_length=case["max_sequence_length"])
    pixels = np.stack([np.asarray(p) for p in pils])
    # the three runs share the seed: the np and pil outputs decode the latents saved here
    assert np.array_equal(np.round(images * 255).astype(np.uint8), pixels), "np and pil outputs disagree"
    io[f"{prefix}.latents"] = latents.float()
    io[f"{prefix}.step_latents"] = torch.stack(steps).float()
    io[f"{prefix}.images"] = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    io[f"{prefix}.pixels"] = torch.from_numpy(pixels.copy())
    io[f"{prefix}.prompt_embeds"] = prompt_embeds.float()
    io[f"{prefix}.pooled_prompt_embeds"] = pooled.float()
    io[f"{prefix}.embedded_timestep"] = torch.stack(embedded["timestep"])  # [steps, B]
    io[f"{prefix}.embedded_guidance"] = torch.stack(embedded["guidance"])

    spread = float(images.std(axis=(1, 2)).mean())
    clipped = float(((images <= 0) | (images >= 1)).mean())
    print(f"{prefix}: latents {tuple(latents.shape)} std {latents.float().std():.3f}; images {images.shape} "
          f"per-image std {spread:.3f}, clipped {clipped:.1%}")
    if spread < 0.08 or clipped > 0.3:
        raise SystemExit(f"{prefix}: the image is too flat or too saturated to test against; adjust the init")
    if len(images) > 1:
        gap = float(np.abs(images[0] - images[1]).mean())
        print(f"{prefix}: mean |image 0 - image 1| = {gap:.3f}")
        if gap < 0.02:
            raise SystemExit(f"{prefix}: the images of the batch barely differ; the prompt/noise must matter")


def embedding_tables(io: dict) -> None:
    """The timestep and guidance values diffusers' FluxPipeline makes its transformer embed, for longer schedules
    than the tiny runs: the pipeline's `t.expand(B).to(dtype) / 1000`, then the transformer's `.to(dtype) * 1000`
    (and `guidance.to(dtype) * 1000` of a float32 guidance tensor)."""
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for steps in EMBED_TABLE_STEPS:
            for seq_len in (4096, 1024):
                sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
                sigmas = np.linspace(1.0, 1 / steps, steps)
                mu = calculate_shift(seq_len, SCHEDULER["base_image_seq_len"], SCHEDULER["max_image_seq_len"],
                                     SCHEDULER["base_shift"], SCHEDULER["max_shift"])
                sched.set_timesteps(sigmas=sigmas, mu=mu)
                ts = sched.timesteps.to(dtype) / 1000
                io[f"table.{name}.timesteps_{steps}_{seq_len}"] = sched.timesteps.float()
                io[f"table.{name}.embedded_{steps}_{seq_len}"] = (ts.to(dtype) * 1000).float()
        g = torch.tensor(EMBED_TABLE_GUIDANCE, dtype=torch.float32)
        io[f"table.{name}.guidance"] = g
        io[f"table.{name}.embedded_guidance"] = (g.to(dtype) * 1000).float()


def main() -> None:
    pipe = build_pipeline()
    save_folder(pipe)
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    print(f"{FOLDER.name}: {size / 1e6:.2f} MB")

    io: dict[str, torch.Tensor] = {}
    ref = FluxPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
    for name, case in CASES.items():
        run_case(ref, case, name, io)
    ref_bf16 = FluxPipeline.from_pretrained(FOLDER, torch_dtype=torch.bfloat16)
    for name in BF16_CASES:
        run_case(ref_bf16, CASES[name], f"{name}.bf16", io)
        for what in ("latents", "images"):  # how far bf16 arithmetic alone takes diffusers from its fp32 result
            a, b = io[f"{name}.bf16.{what}"].double(), io[f"{name}.{what}"].double()
            print(f"{name}: bf16 vs fp32 {what} rel_l2 {float((a - b).norm() / b.norm()):.3e}")

    embedding_tables(io)
    meta = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": json.dumps(CASES),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in io.items()}, str(IO_FILE), metadata=meta)
    print(f"{IO_FILE.name}: {len(io)} tensors, {IO_FILE.stat().st_size / 1e6:.2f} MB; torch CPU capability "
          f"{meta['cpu_capability']}")


if __name__ == "__main__":
    main()
