"""Writes a tiny SDXL text-to-image model and its parity fixture from diffusers' StableDiffusionXLPipeline.

Run with the reference venv (torch + diffusers + transformers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_tiny_sdxl_pipeline.py

Written under tests/fixtures/:
  tiny-sdxl/                         a StableDiffusionXLPipeline in diffusers' folder layout (model_index.json with
                                     force_zeros_for_empty_prompt, scheduler/, text_encoder/, text_encoder_2/,
                                     tokenizer/, tokenizer_2/, unet/, vae/), weights in bfloat16
  tiny_sdxl_pipeline_io.safetensors  diffusers' outputs for that folder, keys "<case>.<what>"

The components are SDXL base's architectures at toy widths, with the real CLIP tokenizer and vocabulary (49408):
- text_encoder: CLIP-L text model (hidden 32, 2 heads, 3 layers, quick_gelu);
- text_encoder_2: OpenCLIP-bigG-style CLIPTextModelWithProjection (hidden 16, 1 head, 3 layers, gelu, projection
  32); both with the published configs' legacy eos_token_id 2;
- unet: UNet2DConditionModel with SDXL's block pattern (DownBlock2D, CrossAttnDownBlock2D / CrossAttnUpBlock2D,
  UpBlock2D, linear projections, GEGLU, "text_time" addition embedding, head dim 64), cross_attention_dim
  32 + 16 = 48 (the two encoders' penultimate states side by side), add_embedding over the 32-wide pooled
  projection plus 6 x 8 micro-conditioning sinusoids;
- vae: AutoencoderKL with 4 latent channels, 4 blocks (8x spatial factor), quant convs, SDXL's scaling 0.13025;
- scheduler: SDXL base's scheduler_config.json (EulerDiscreteScheduler);
- tokenizer/, tokenizer_2/: copies of tests/fixtures/tokenizers/clip (tokenizer_2 pads with "!", as SDXL's does).
Every parameter is re-drawn (the default init zeroes conv_out and proj_out, which would make the image a constant;
cross-attention is drawn stronger so the text and the guidance visibly shape the image) and rounded to bf16.

The reference is `StableDiffusionXLPipeline.from_pretrained(tiny-sdxl, add_watermarker=False)` itself (the
invisible watermark is not part of the model and fastdm does not add one), run on the CPU with
`generator=torch.Generator("cpu").manual_seed(seed)`, for each case:
  float32: the latents after every step (callback_on_step_end; the last is output_type="latent"), the float images
  (output_type="np", [B, H, W, 3] in [0, 1]), the uint8 pixels (output_type="pil"), and what the UNet got at its
  first call (encoder_hidden_states for some cases, text_embeds, time_ids) and the timestep of every call;
  "<case>.bf16.*" / "<case>.fp16.*" for a few cases: the same pipeline loaded with torch_dtype bfloat16 / float16
  (the fp16 run decodes with the VAE upcast to float32, diffusers' force_upcast), so GPU runs can be judged against
  the drift of those dtypes themselves.
Schedulers: "euler" is the folder's own; "euler_a" is EulerAncestralDiscreteScheduler.from_config(its config) and
"dpmpp_2m_karras" DPMSolverMultistepScheduler.from_config(its config, use_karras_sigmas=True), as a diffusers user
switches samplers. The torch CPU capability (which Box-Muller kernel drew the noise) is stored in the metadata.
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
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FOLDER = FIXTURES / "tiny-sdxl"
IO_FILE = FIXTURES / "tiny_sdxl_pipeline_io.safetensors"
TOKENIZERS = FIXTURES / "tokenizers"

CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
# bigG: gelu and a text projection (CLIPTextModelWithProjection); narrower than CLIP-L, as bigG is wider, so the
# two encoders' states can't be swapped unnoticed
CLIP_G = dict(CLIP_L, hidden_size=16, intermediate_size=48, num_attention_heads=1, hidden_act="gelu")
TIME_DIM, N_TIME_IDS = 8, 6
UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[32, 64], layers_per_block=[1, 1], transformer_layers_per_block=[1, 1],
            attention_head_dim=[1, 1],  # head COUNTS in diffusers' UNet: 64 channels / 1 head = head dim 64
            cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"], norm_num_groups=16,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=N_TIME_IDS * TIME_DIM + CLIP_G["projection_dim"])
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
           act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.13025,
           use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, force_upcast=True)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
                 sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                 timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)

LONG_PROMPT = ("a detailed oil painting of a lighthouse on a rocky cliff at dusk, waves crashing below, seagulls "
               "circling in an orange and violet sky, a small fishing boat with a red sail returning to the harbour, "
               "warm light in the keeper's window, thick impasto brush strokes, dramatic clouds, in the style of the "
               "old dutch masters, museum quality, highly detailed, golden frame, hung in a quiet gallery")
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "A watercolor fox in a snowy forest!!"]
COMMON = dict(num_inference_steps=3, guidance_scale=5.0, seed=0)
SQUARE, RECT = dict(height=64, width=64), dict(height=32, width=48)
CASES = {
    # no negative prompt: zeros for the unconditional half (force_zeros_for_empty_prompt)
    "euler_square": dict(prompt=PROMPTS, **SQUARE, **COMMON, scheduler="euler"),
    # prompt_2 and negative_prompt_2 for the second encoder, a prompt past 77 tokens, 2 images per prompt
    "euler_rect": dict(prompt=LONG_PROMPT, prompt_2="a lighthouse at dusk, oil painting",
                       negative_prompt="blurry, low quality", negative_prompt_2="jpeg artifacts, watermark",
                       num_images_per_prompt=2, **RECT, **COMMON, scheduler="euler"),
    "dpmpp_2m_karras_square": dict(prompt=PROMPTS, negative_prompt=["blurry, low quality", "a dog"], **SQUARE,
                                   **COMMON, scheduler="dpmpp_2m_karras"),
    # the CLI test's case: one prompt, one negative prompt
    "dpmpp_2m_karras_rect": dict(prompt="a red bicycle leaning on a brick wall", negative_prompt="blurry, low quality",
                                 **RECT, **COMMON, scheduler="dpmpp_2m_karras"),
    # an explicit empty negative prompt is encoded (only None gives zeros)
    "euler_a_square": dict(prompt=PROMPTS, negative_prompt="", **SQUARE, **COMMON, scheduler="euler_a"),
    # ancestral noise for a batch of 2 images
    "euler_a_rect": dict(prompt="a castle on a hill, sunset", negative_prompt="fog", num_images_per_prompt=2, **RECT,
                         **COMMON, scheduler="euler_a"),
    # guidance 1: no classifier-free guidance, one UNet batch (the negative prompt is ignored)
    "nocfg": dict(prompt=PROMPTS, negative_prompt="fog", **RECT, num_inference_steps=3, guidance_scale=1.0, seed=7,
                  scheduler="euler"),
}
EMBEDS_CASES = ("euler_square", "euler_rect", "dpmpp_2m_karras_rect", "euler_a_square", "nocfg")
LOW_PRECISION = {"bf16": (torch.bfloat16, ("euler_square", "dpmpp_2m_karras_rect", "euler_a_rect")),
                 "fp16": (torch.float16, ("euler_square",))}


# ------------------------------------------------------------------------------------------------ weights
def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter re-drawn so that it shapes the output with activations O(1), then rounded to bf16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name and p.ndim == 2 and ("token" in name or "position" in name):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 4:  # conv [O, C, kh, kw]; the image layer smaller, so few pixels clip at 0 or 255
                gain = 0.5 if name == "decoder.conv_out.weight" else 1.1
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p[0].numel())))
            elif p.ndim == 2:  # Linear [out, in]; cross-attention stronger, so the text (and CFG) shape the image
                gain = 1.6 if ".attn2." in name else 0.9
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def build_pipeline() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    randomise(text_encoder, torch.Generator().manual_seed(1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).eval()
    randomise(text_encoder_2, torch.Generator().manual_seed(2))
    unet = UNet2DConditionModel(**UNET).eval()
    randomise(unet, torch.Generator().manual_seed(3))
    vae = AutoencoderKL(**VAE).eval()
    randomise(vae, torch.Generator().manual_seed(4))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZERS / "clip")
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZERS / "clip", pad_token="!")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def copy_tokenizer(dst: Path, pad: str | None = None) -> None:
    """tests/fixtures/tokenizers/clip's files; `pad` replaces the pad token (SDXL's tokenizer_2 pads with "!")."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    src = TOKENIZERS / "clip"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if pad is not None and name.endswith(".json") and name != "vocab.json":
            cfg = json.loads((src / name).read_text())
            cfg["pad_token"] = pad
            (dst / name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copy(src / name, dst / name)  # byte for byte: git stores the files once


def save_folder(pipe: StableDiffusionXLPipeline) -> None:
    """save_pretrained in bf16, CLIP-L with the published "text_model." names, the tokenizer files copied."""
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    pipe.to(torch.bfloat16).save_pretrained(FOLDER, safe_serialization=True)
    pipe.to(torch.float32)
    clip_file = FOLDER / "text_encoder" / "model.safetensors"
    tensors = load_file(str(clip_file))
    if not any(k.startswith("text_model.") for k in tensors):  # transformers 5 drops the prefix
        save_file({"text_model." + k: v for k, v in tensors.items()}, str(clip_file), metadata={"format": "pt"})
    copy_tokenizer(FOLDER / "tokenizer")
    copy_tokenizer(FOLDER / "tokenizer_2", pad="!")


# ------------------------------------------------------------------------------------------------ reference
def set_scheduler(pipe: StableDiffusionXLPipeline, name: str) -> None:
    """The named sampler, configured from the folder's scheduler config (not the last sampler's: from_config keeps
    keys the sampler does not take, so use_karras_sigmas would leak from DPM-Solver into a later Euler)."""
    cfg = EulerDiscreteScheduler.load_config(FOLDER / "scheduler")
    if name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(cfg)
    elif name == "euler_a":
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(cfg)
    elif name == "dpmpp_2m_karras":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)
    else:
        raise SystemExit(f"no scheduler {name}")


def run_case(pipe: StableDiffusionXLPipeline, case: dict, prefix: str, io: dict, embeds: bool) -> None:
    args = {k: v for k, v in case.items() if k not in ("seed", "scheduler")}
    set_scheduler(pipe, case["scheduler"])
    steps: list[torch.Tensor] = []
    unet_calls: list[dict] = []

    def on_step(_pipe, i, t, kwargs):
        steps.append(kwargs["latents"].clone())
        return {}

    forward = pipe.unet.forward

    def recording_forward(sample, timestep, encoder_hidden_states, **kw):
        unet_calls.append(dict(sample=sample.clone(), timestep=torch.as_tensor(timestep).float().clone(),
                               encoder_hidden_states=encoder_hidden_states.clone(),
                               text_embeds=kw["added_cond_kwargs"]["text_embeds"].clone(),
                               time_ids=kw["added_cond_kwargs"]["time_ids"].clone()))
        return forward(sample, timestep, encoder_hidden_states, **kw)

    def generator() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(case["seed"])

    with torch.no_grad():
        pipe.unet.forward = recording_forward
        images = pipe(**args, generator=generator(), output_type="np", callback_on_step_end=on_step).images
        pipe.unet.forward = forward
        pils = pipe(**args, generator=generator(), output_type="pil").images
    pixels = np.stack([np.asarray(p) for p in pils])
    images = np.asarray(images, dtype=np.float32)
    # the runs share the seed: the pil output is the np output rounded (diffusers' numpy_to_pil)
    assert np.array_equal(np.round(images * 255).astype(np.uint8), pixels), "np and pil outputs disagree"
    io[f"{prefix}.latents"] = steps[-1].float()
    io[f"{prefix}.step_latents"] = torch.stack(steps).float()
    io[f"{prefix}.images"] = torch.from_numpy(np.ascontiguousarray(images))
    io[f"{prefix}.pixels"] = torch.from_numpy(pixels.copy())
    first = unet_calls[0]
    io[f"{prefix}.unet_timesteps"] = torch.stack([c["timestep"].reshape(-1)[0] for c in unet_calls])
    io[f"{prefix}.unet_text_embeds"] = first["text_embeds"].float()
    io[f"{prefix}.unet_time_ids"] = first["time_ids"].float()
    if embeds:
        io[f"{prefix}.unet_encoder_hidden_states"] = first["encoder_hidden_states"].float()
    batch = first["sample"].shape[0]
    print(f"{prefix}: UNet batch {batch}, latents {tuple(steps[-1].shape)} std {steps[-1].float().std():.3f}; "
          f"images per-image std {float(images.std(axis=(1, 2)).mean()):.3f}, "
          f"clipped {float(((images <= 0) | (images >= 1)).mean()):.1%}")
    spread = float(images.std(axis=(1, 2)).mean())
    clipped = float(((images <= 0) | (images >= 1)).mean())
    if spread < 0.08 or clipped > 0.3:
        raise SystemExit(f"{prefix}: the image is too flat or too saturated to test against; adjust the init")
    if len(images) > 1:
        gap = float(np.abs(images[0] - images[1]).mean())
        if gap < 0.02:
            raise SystemExit(f"{prefix}: the images of the batch barely differ ({gap:.3f}); the prompt/noise must "
                             "matter")


def check_conditioning_matters(pipe: StableDiffusionXLPipeline, io: dict) -> None:
    """The negative prompt, prompt_2 and the guidance scale each change the image (else the tests could not see a
    mix-up of the CFG halves or of the encoders' inputs)."""
    base = dict(CASES["dpmpp_2m_karras_rect"])
    set_scheduler(pipe, base.pop("scheduler"))
    seed = base.pop("seed")

    def image(**kw):
        with torch.no_grad():
            return pipe(**(base | kw), generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images

    ref = image()
    for what, kw in (("negative prompt", dict(negative_prompt="a cat")), ("prompt_2", dict(prompt_2="a cat")),
                     ("guidance", dict(guidance_scale=3.0)), ("no negative prompt", dict(negative_prompt=None))):
        gap = float(np.abs(image(**kw) - ref).mean())
        print(f"changing the {what}: mean |image change| {gap:.3f}")
        if gap < 0.01:
            raise SystemExit(f"the {what} barely changes the image; adjust the init")


def main() -> None:
    pipe = build_pipeline()
    save_folder(pipe)
    weights = sum(f.stat().st_size for f in FOLDER.rglob("*.safetensors"))
    print(f"{FOLDER.name}: {weights / 1e6:.2f} MB of weights")
    assert pipe.tokenizer_2.pad_token_id == 0

    io: dict[str, torch.Tensor] = {}
    ref = StableDiffusionXLPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32, add_watermarker=False)
    assert ref.tokenizer_2.pad_token == "!" and ref.config.force_zeros_for_empty_prompt
    for name, case in CASES.items():
        run_case(ref, case, name, io, embeds=name in EMBEDS_CASES)
    check_conditioning_matters(ref, io)
    for tag, (dtype, names) in LOW_PRECISION.items():
        low = StableDiffusionXLPipeline.from_pretrained(FOLDER, torch_dtype=dtype, add_watermarker=False)
        for name in names:
            run_case(low, CASES[name], f"{name}.{tag}", io, embeds=False)
            for what in ("latents", "images"):  # how far the dtype alone takes diffusers from its fp32 result
                a, b = io[f"{name}.{tag}.{what}"].double(), io[f"{name}.{what}"].double()
                print(f"{name}: {tag} vs fp32 {what} rel_l2 {float((a - b).norm() / b.norm()):.3e}")

    meta = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": json.dumps(CASES),
            "low_precision": json.dumps({k: list(v[1]) for k, v in LOW_PRECISION.items()}),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in io.items()}, str(IO_FILE), metadata=meta)
    print(f"{IO_FILE.name}: {len(io)} tensors, {IO_FILE.stat().st_size / 1e6:.2f} MB; torch CPU capability "
          f"{meta['cpu_capability']}")


if __name__ == "__main__":
    main()
