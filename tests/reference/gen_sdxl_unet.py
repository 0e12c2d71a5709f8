"""Writes the SDXL UNet parity fixtures from diffusers' UNet2DConditionModel.

Run with the reference venv (torch + diffusers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_sdxl_unet.py

Writes, under tests/fixtures/:
  sdxl_unet_tiny/config.json + diffusion_pytorch_model.safetensors   a tiny SDXL-shaped UNet, diffusers layout
  sdxl_unet_tiny_io.safetensors                                       fixed inputs and diffusers' float32 outputs

The tiny UNet keeps SDXL's structure: DownBlock2D then CrossAttnDownBlock2D, CrossAttnUpBlock2D then UpBlock2D,
the "text_time" addition embedding (6 micro-conditioning numbers + pooled text), linear projections in the
transformers, GEGLU feed-forwards, and a head dim of 64 (one head over 64 channels: a head dim the GPU attention
takes). layers_per_block (2, 1) gives a down block with two resnets and an up block with three, and
transformer_layers_per_block (1, 2) chains two BasicTransformerBlocks per Transformer2DModel (the first entry
belongs to the DownBlock2D and is unused, as SDXL's is). Channels are as small as a head dim of 64 allows, to keep
the fixture small (about 2.7 MB of bf16 weights: each 64-wide transformer block alone is 82k parameters).

Weights are stored in bfloat16, and the reference runs in float32 on exactly those bf16 values, so loading casts
bf16 -> fp32 losslessly and the expected outputs are exact for that model.

The io file holds:
- sample [2, 4, 16, 16], timestep [2] (two different timesteps, so a batch mix-up shows), encoder_hidden_states
  [2, 77, 64], text_embeds [2, 32], time_ids [2, 6]; expected: diffusers' output.
- expected_heads2: the same weights and inputs run with attention_head_dim [1, 2], i.e. 2 heads of 32 in the
  transformers (weight shapes do not depend on the head count): covers the head split on the CPU, where any head
  dim works.
- odd_sample [2, 4, 13, 11] with the scalar timestep odd_timestep[0] (passed as a Python number): the latent
  size is not a multiple of 2, so diffusers forwards the skip's size to the upsampler (ceil-sized downsampling,
  nearest upsampling to 13 x 11); expected_odd.
- metadata full_size_config / full_size_shapes: SDXL base's UNet config (tests' shared full-size config) and every
  tensor name and shape of diffusers' state dict at that size, built on the meta device (nothing allocated), so the
  tests check fastdm's weight list against diffusers' at full size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
NAME = "sdxl_unet_tiny"
FULL_SIZE_CONFIGS = Path("/work/shared/reference/full_size_configs.json")

TIME_DIM, N_TIME_IDS, POOLED = 8, 6, 32
CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=[2, 1], transformer_layers_per_block=[1, 2],
    attention_head_dim=[1, 1],  # diffusers reads these as head COUNTS: 64 channels / 1 head = head dim 64
    cross_attention_dim=64, norm_num_groups=16, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=N_TIME_IDS * TIME_DIM + POOLED,
)
BATCH, S_TXT = 2, 77


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace the default init (which zeroes conv_out and the transformers' proj_out, and leaves norms at 1 / 0)
    so every parameter shapes the output, then round to bf16 so checkpoint and reference agree exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # Linear [out, in] or Conv2d [out, in, k, k]: unit-gain init keeps the stack O(1)
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * (0.9 / math.sqrt(fan_in)))
            elif "norm" in name and name.endswith(".weight"):  # GroupNorm / LayerNorm scale
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def run(model: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                     return_dict=False)[0]


def check_every_parameter_matters(model, inputs: dict, ref: torch.Tensor) -> tuple[float, str]:
    """Zero each parameter in turn; the output must move (a path that does not matter would not be tested)."""
    worst, worst_name = float("inf"), ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            saved = p.clone()
            p.zero_()
            out = run(model, inputs)
            p.copy_(saved)
            change = float((out - ref).norm() / ref.norm())
            if change < 3e-4:  # 3x the CPU parity bound: dropping it would fail the test
                raise SystemExit(f"parameter {name} barely changes the output (rel {change:.2e}); adjust the init")
            if change < worst:
                worst, worst_name = change, name
    return worst, worst_name


def full_size_listing() -> tuple[dict, dict[str, list[int]]]:
    """SDXL base's UNet config and diffusers' state-dict shapes at that size (meta tensors: nothing allocated)."""
    cfg = json.loads(FULL_SIZE_CONFIGS.read_text())["sdxl_unet"]
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return cfg, {k: list(v.shape) for k, v in model.state_dict().items()}


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = UNet2DConditionModel(**CONFIG).eval()
    randomise(model, gen)

    folder = FIXTURES / NAME
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)

    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                             [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]])
    inputs = dict(
        sample=torch.randn(BATCH, 4, 16, 16, generator=gen),
        timestep=torch.tensor([999.0, 457.5]),
        encoder_hidden_states=torch.randn(BATCH, S_TXT, CONFIG["cross_attention_dim"], generator=gen),
        text_embeds=torch.randn(BATCH, POOLED, generator=gen),
        time_ids=time_ids,
    )
    expected = run(model, inputs)
    worst, worst_name = check_every_parameter_matters(model, inputs, expected)

    # the same weights read with 2 heads of 32 in every transformer
    heads2 = UNet2DConditionModel(**dict(CONFIG, attention_head_dim=[1, 2])).eval()
    heads2.load_state_dict(model.state_dict())
    expected_heads2 = run(heads2, inputs)

    odd_timestep = 250.0
    odd = dict(inputs, sample=torch.randn(BATCH, 4, 13, 11, generator=gen), timestep=odd_timestep)
    expected_odd = run(model, odd)

    tensors = {k: v.contiguous().float() for k, v in inputs.items()}
    tensors.update(expected=expected, expected_heads2=expected_heads2, odd_sample=odd["sample"],
                   odd_timestep=torch.tensor([odd_timestep]), expected_odd=expected_odd)
    full_cfg, full_shapes = full_size_listing()
    metadata = {"full_size_config": json.dumps(full_cfg), "full_size_shapes": json.dumps(full_shapes)}
    io_path = FIXTURES / f"{NAME}_io.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(io_path), metadata=metadata)

    heads_change = float((expected_heads2 - expected).norm() / expected.norm())
    n_params = sum(p.numel() for p in model.parameters())
    sizes = sum(f.stat().st_size for f in folder.iterdir()) + io_path.stat().st_size
    print(f"{NAME}: {n_params} parameters; output {tuple(expected.shape)} std {expected.std():.3f}; "
          f"least sensitive parameter {worst_name} moves the output by {worst:.2e}; 2 heads instead of 1 move it "
          f"by {heads_change:.2e}; odd-size output {tuple(expected_odd.shape)}; {sizes / 1e6:.2f} MB written")
    print(f"full size: {len(full_shapes)} tensors, "
          f"{sum(math.prod(s) for s in full_shapes.values())} parameters")


if __name__ == "__main__":
    main()
