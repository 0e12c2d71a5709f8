"""Writes the AutoencoderKL parity fixtures from diffusers' AutoencoderKL and VaeImageProcessor.

Run with the reference venv (torch + diffusers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_vae.py

It writes, under tests/fixtures/:
  vae_tiny/, vae_tiny_sdxl/          config.json + diffusion_pytorch_model.safetensors in the published layout
  vae_tiny_io.safetensors            inputs and diffusers' float32 outputs, keys "<variant>.<what>", plus the
                                     to_pil cases under "to_pil.<what>"

Weights are stored in bfloat16 and the reference runs in float32 on exactly those bf16 values, so loading casts
bf16 -> fp32 losslessly and the expected outputs are exact for that model.

- vae_tiny: FLUX.1-like (16 latent channels, shift_factor set, no quant convs), 8 groups.
- vae_tiny_sdxl: SDXL-like (4 latent channels, quant_conv + post_quant_conv, no shift), 16 groups.
Both: block_out_channels (32, 64), layers_per_block 1, sample_size 64 (tiled decode uses 32x32 latent tiles).

Per variant: decode of [1, C, 8, 8] and of [2, C, 6, 10] latents; encode (posterior mean) of a [1, 3, 16, 16] and
a [2, 3, 14, 22] image (odd downsampled size: the asymmetric padding matters), the posterior sample with given
noise; tiled decode (enable_tiling) of a [1, C, 56, 36] latent (3 x 2 tiles, so blends chain) and its untiled
decode. to_pil: diffusers' postprocess(output_type="pil") of float32 and bfloat16 images and a 1-channel image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COMMON = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
              act_fn="silu", sample_size=64, mid_block_add_attention=True, force_upcast=True)
VARIANTS = {
    "vae_tiny": dict(config=dict(COMMON, latent_channels=16, norm_num_groups=8, scaling_factor=0.3611,
                                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False), seed=0),
    "vae_tiny_sdxl": dict(config=dict(COMMON, latent_channels=4, norm_num_groups=16, scaling_factor=0.13025,
                                      shift_factor=None, use_quant_conv=True, use_post_quant_conv=True), seed=1),
}


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace the default init (GroupNorm 1/0, small biases) so every parameter shapes the outputs while
    activations stay O(1), then round to bf16 so the stored checkpoint and the reference agree exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:  # conv [O, C, kh, kw]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.2 / math.sqrt(p[0].numel())))
            elif p.ndim == 2:  # attention linears [out, in]; sharper q/k would make tiled decode (which sees
                # only a tile's tokens) drift far from the untiled one
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))
            else:  # biases (norm biases included)
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def encode_outputs(model: AutoencoderKL, image: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    post = model.encode(image).latent_dist
    parts = [post.mean] + ([post.mean + post.std * noise] if noise is not None else [])
    return torch.cat([p.flatten() for p in parts])


def check_every_parameter_matters(model: AutoencoderKL, latents: torch.Tensor, image: torch.Tensor,
                                  noise: torch.Tensor) -> float:
    """Zero each parameter in turn; the output it feeds (decode for decoder params, the encode mean and sample
    for encoder params) must move, or a path that does not matter would go untested."""
    with torch.no_grad():
        ref_dec = model.decode(latents).sample
        ref_enc = encode_outputs(model, image, noise)
        worst = float("inf")
        for name, p in model.named_parameters():
            if name.endswith(".to_k.bias"):  # adds q.b to every score of a query row: softmax cancels it exactly
                continue
            saved = p.clone()
            p.zero_()
            if name.startswith(("decoder.", "post_quant_conv.")):
                out, ref = model.decode(latents).sample, ref_dec
            else:
                out, ref = encode_outputs(model, image, noise), ref_enc
            p.copy_(saved)
            change = float((out - ref).norm() / ref.norm())
            if change < 3e-4:  # 3x the CPU parity bound
                raise SystemExit(f"parameter {name} barely changes the output (rel {change:.2e}); adjust the init")
            worst = min(worst, change)
    return worst


def generate(name: str, spec: dict, io: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg = spec["config"]
    model = AutoencoderKL(**cfg).eval()
    randomise(model, gen)
    folder = FIXTURES / name
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)

    c = cfg["latent_channels"]
    t = dict(
        latents=torch.randn(1, c, 8, 8, generator=gen),
        latents_rect=torch.randn(2, c, 6, 10, generator=gen),
        latents_tiled=torch.randn(1, c, 56, 36, generator=gen),
        image=(torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1),
        image_rect=(torch.rand(2, 3, 14, 22, generator=gen) * 2 - 1),
        noise=torch.randn(1, c, 8, 8, generator=gen),
    )
    with torch.no_grad():
        t["decode"] = model.decode(t["latents"]).sample
        t["decode_rect"] = model.decode(t["latents_rect"]).sample
        t["decode_tiled_untiled"] = model.decode(t["latents_tiled"]).sample
        post = model.encode(t["image"]).latent_dist
        t["encode_mean"] = post.mean
        t["encode_sample"] = post.mean + post.std * t["noise"]
        t["encode_mean_rect"] = model.encode(t["image_rect"]).latent_dist.mean
        model.enable_tiling()
        assert model.tile_latent_min_size == 32 and model.tile_sample_min_size == 64
        t["decode_tiled"] = model.decode(t["latents_tiled"]).sample
        model.disable_tiling()
    worst = check_every_parameter_matters(model, t["latents"], t["image"], t["noise"])
    for k, v in t.items():
        io[f"{name}.{k}"] = v.contiguous().to(torch.float32)
    tiled_gap = float((t["decode_tiled"] - t["decode_tiled_untiled"]).norm() / t["decode_tiled_untiled"].norm())
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: decode std {t['decode'].std():.3f}, encode mean std {t['encode_mean'].std():.3f}; tiled vs "
          f"untiled rel {tiled_gap:.3e}; least sensitive parameter moves its output by {worst:.2e}; "
          f"{size / 1e6:.2f} MB")


def to_pil_cases(io: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Images past [-1, 1] and a dense ramp (many values near the .5 rounding points) through diffusers'
    postprocess, in float32 and bfloat16 (the denormalisation then runs in bf16, as in a bf16 pipeline)."""
    proc = VaeImageProcessor(vae_scale_factor=8)
    ramp = torch.linspace(-1.1, 1.1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    noisy = torch.rand(2, 3, 16, 16, generator=gen) * 2.5 - 1.25
    image = torch.where(torch.arange(16)[None, None, :, None] % 2 == 0, ramp, noisy)
    gray = torch.rand(1, 1, 8, 8, generator=gen) * 2.2 - 1.1
    for key, img in (("float32", image), ("bfloat16", image.to(torch.bfloat16)), ("gray", gray)):
        pils = proc.postprocess(img, output_type="pil")
        io[f"to_pil.{key}"] = img.contiguous()
        io[f"to_pil.{key}_pixels"] = torch.from_numpy(np.stack([np.asarray(p) for p in pils]).copy())


def main() -> None:
    torch.manual_seed(0)
    io: dict[str, torch.Tensor] = {}
    for name, spec in VARIANTS.items():
        generate(name, spec, io)
    to_pil_cases(io, torch.Generator().manual_seed(7))
    path = FIXTURES / "vae_tiny_io.safetensors"
    save_file(io, str(path))
    print(f"{path.name}: {len(io)} tensors, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
