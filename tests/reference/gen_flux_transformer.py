"""Writes the FLUX.1 transformer parity fixtures from diffusers' FluxTransformer2DModel.

Run with the reference venv (torch + diffusers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_flux_transformer.py

For each variant it writes, under tests/fixtures/:
  <name>/config.json + <name>/diffusion_pytorch_model.safetensors   the model in the published diffusers layout
  <name>_io.safetensors                                              fixed inputs and diffusers' float32 output

Weights are stored in bfloat16 (as the published checkpoints are), and the reference runs in float32 on exactly
those bf16 values, so loading casts bf16 -> fp32 losslessly and the expected output is exact for that model.

- flux_transformer_tiny: guidance-distilled (dev) layout, 2 heads x 64 (a head dim the GPU attention takes),
  one double-stream and one single-stream block, pipeline-style ids (text ids zero, image ids (0, row, col)).
- flux_transformer_tiny_schnell: no guidance embedder, 2 heads x 32 and two blocks of each kind (so chaining
  blocks is covered), and non-zero text ids and image axis 0 so every part of the RoPE tables matters.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

VARIANTS = {
    "flux_transformer_tiny": dict(
        config=dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                    attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                    guidance_embeds=True, axes_dims_rope=[16, 24, 24]),
        seed=0, kontext_ids=False),
    "flux_transformer_tiny_schnell": dict(
        config=dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                    attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                    guidance_embeds=False, axes_dims_rope=[8, 12, 12]),
        seed=1, kontext_ids=True),
}
BATCH, GRID_H, GRID_W, S_TXT = 2, 4, 8, 7


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace the default init (which zeroes some layers) so every parameter shapes the output, then round to
    bf16 so the stored checkpoint and the reference agree exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # Linear weight [out, in]: keep activations O(1) through the stack
                p.copy_(torch.randn(p.shape, generator=gen) * (0.8 / math.sqrt(p.shape[1])))
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm_added_" in name:
                p.copy_(1.5 + 0.3 * torch.randn(p.shape, generator=gen))  # sharper attention
            else:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def image_ids(kontext: bool) -> torch.Tensor:
    """[GRID_H * GRID_W, 3] as FluxPipeline._prepare_latent_image_ids: (axis0, row, col)."""
    ids = torch.zeros(GRID_H, GRID_W, 3)
    ids[..., 1] = torch.arange(GRID_H)[:, None]
    ids[..., 2] = torch.arange(GRID_W)[None, :]
    if kontext:  # FLUX Kontext marks reference-image tokens with axis0 = 1
        ids[..., 0] = 1.0
    return ids.reshape(GRID_H * GRID_W, 3)


def text_ids(nonzero: bool, gen: torch.Generator) -> torch.Tensor:
    if not nonzero:
        return torch.zeros(S_TXT, 3)
    return torch.randint(0, 5, (S_TXT, 3), generator=gen).float()


def check_every_parameter_matters(model, inputs: dict, ref: torch.Tensor) -> float:
    """Zero each parameter in turn; the output must move (a path that does not matter would not be tested)."""
    worst = float("inf")
    with torch.no_grad():
        for name, p in model.named_parameters():
            saved = p.clone()
            p.zero_()
            out = model(**inputs, return_dict=False)[0]
            p.copy_(saved)
            change = float((out - ref).norm() / ref.norm())
            if change < 3e-4:  # 3x the CPU parity bound: dropping it would fail the test
                raise SystemExit(f"parameter {name} barely changes the output (rel {change:.2e}); adjust the init")
            worst = min(worst, change)
    return worst


def generate(name: str, spec: dict) -> None:
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg = spec["config"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomise(model, gen)

    folder = FIXTURES / name
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)

    s_img = GRID_H * GRID_W
    inputs = dict(
        hidden_states=torch.randn(BATCH, s_img, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(BATCH, S_TXT, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(BATCH, cfg["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.73, 0.21]),  # the pipeline passes t / 1000; the model scales by 1000
        img_ids=image_ids(spec["kontext_ids"]),
        txt_ids=text_ids(spec["kontext_ids"], gen),
    )
    if cfg["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5, 5.0])
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    worst = check_every_parameter_matters(model, inputs, expected)

    tensors = {k: v.contiguous().to(torch.float32) for k, v in inputs.items()}
    tensors["expected"] = expected.contiguous()
    save_file(tensors, str(FIXTURES / f"{name}_io.safetensors"))
    sizes = sum(f.stat().st_size for f in folder.iterdir()) + (FIXTURES / f"{name}_io.safetensors").stat().st_size
    print(f"{name}: output {tuple(expected.shape)} std {expected.std():.3f}; "
          f"least sensitive parameter moves the output by {worst:.2e}; {sizes / 1e6:.2f} MB written")


def main() -> None:
    torch.manual_seed(0)
    for name, spec in VARIANTS.items():
        generate(name, spec)


if __name__ == "__main__":
    main()
