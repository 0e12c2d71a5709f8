"""SDXL at full size with random bf16 weights: fastdm vs diffusers on the same card, in one run.

  python bench/sdxl.py make --dir /tmp/sdxl-rand        # random SDXL base components, diffusers layout
  python bench/sdxl.py unet --dir /tmp/sdxl-rand        # one UNet forward, 1024x1024, batch 2 (CFG)
  python bench/sdxl.py pipeline --dir /tmp/sdxl-rand    # 1024x1024, 30 steps, CFG: seconds and peak memory
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "tests" / "fixtures" / "tokenizers"

UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def make(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        UNet2DConditionModel(**UNET).to(torch.bfloat16).save_pretrained(folder / "unet")
        CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, vocab_size=49408, hidden_act="quick_gelu",
                                     projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
                      ).to(torch.bfloat16).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                   num_attention_heads=20, vocab_size=49408, hidden_act="gelu",
                                                   projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
                                                   pad_token_id=1)).to(torch.bfloat16).save_pretrained(
            folder / "text_encoder_2")
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.13025,
                      sample_size=1024, force_upcast=True).to(torch.bfloat16).save_pretrained(folder / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading", num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    shutil.copytree(TOKENIZERS / "clip", folder / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(TOKENIZERS / "clip", folder / "tokenizer_2", dirs_exist_ok=True)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # SDXL's second tokenizer pads with "!"
        path = folder / "tokenizer_2" / name
        cfg = json.loads(path.read_text())
        cfg["pad_token"] = "!"
        path.write_text(json.dumps(cfg, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None], "image_encoder": [None, None]}, indent=2))
    torch.cuda.empty_cache()
    print(f"made {folder} in {time.perf_counter() - t0:.0f} s", flush=True)


def unet_inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 128, 128)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 2048)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, 1280)).astype(np.float32),
            "time_ids": np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (2, 1))}


def _torch_unet(folder: Path, inp: dict, iters: int, dtype) -> tuple[np.ndarray, float]:
    import torch
    from diffusers import UNet2DConditionModel
    from timing import time_torch

    model = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).cuda()
    t = {k: torch.from_numpy(v).cuda().to(torch.bfloat16).to(dtype) for k, v in inp.items()}
    cond = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}

    def run():
        return model(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=cond,
                     return_dict=False)[0]

    with torch.inference_mode():
        out = run().float().cpu().numpy()
        ms = time_torch(run, warmup=2, iters=iters) if iters else float("nan")
    return out, ms


def bench_unet(folder: Path, iters: int) -> None:
    import torch
    from fastdm.models.denoisers.unet2d import UNet2DCondition
    from fastdm.runtime import memory, ops
    from fastdm.runtime.tensor import Tensor
    from timing import time_fastdm, without_pdl

    inp = unet_inputs()
    ref, ms_torch = _torch_unet(folder, inp, iters, torch.bfloat16)
    torch.cuda.empty_cache()
    ref32, _ = _torch_unet(folder, inp, 0, torch.float32)
    torch.cuda.empty_cache()
    model = UNet2DCondition.from_pretrained(folder / "unet", device="cuda", dtype="bfloat16")
    dev = {k: ops.cast(Tensor.from_numpy(v, device="cuda"), "bfloat16") for k, v in inp.items() if k != "timestep"}
    dev["timestep"] = inp["timestep"]
    out = model(**dev).numpy().astype(np.float32)  # first call: eager
    ms = time_fastdm(lambda: model(**dev), warmup=2, iters=iters)  # the second call captures, the rest replay
    out_graph = model(**dev).numpy().astype(np.float32)
    graphed = model._body
    graphed.clear()  # recaptured with programmatic dependent launch off
    ms_no_pdl = without_pdl(lambda: time_fastdm(lambda: model(**dev), warmup=2, iters=iters))
    graphed.clear()
    model._body = model._denoise
    ms_eager = time_fastdm(lambda: model(**dev), warmup=1, iters=iters)
    model._body = graphed

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"card: {torch.cuda.get_device_name()}, SDXL UNet 1024x1024 (128x128 latents), batch 2, bf16")
    print("| what | diffusers eager | fastdm | ratio |")
    print("|---|---|---|---|")
    print(f"| forward ms (median of {iters}), fastdm CUDA graph | {ms_torch:.1f} | {ms:.1f} | {ms_torch / ms:.2f}x |")
    print(f"| forward ms, fastdm CUDA graph, programmatic dependent launch off (FASTDM_PDL=0) | {ms_torch:.1f} | "
          f"{ms_no_pdl:.1f} | {ms_torch / ms_no_pdl:.2f}x |")
    print(f"| forward ms (median of {iters}), fastdm eager | {ms_torch:.1f} | {ms_eager:.1f} | "
          f"{ms_torch / ms_eager:.2f}x |")
    print(f"| output rel L2 vs diffusers bf16 | - | {rel(out, ref):.2e} | |")
    print(f"| output rel L2 vs diffusers fp32 | {rel(ref, ref32):.2e} (diffusers bf16) | {rel(out, ref32):.2e} | |")
    print(f"| graph replay vs eager output, rel L2 | - | {rel(out_graph, out):.2e} | |")
    print(f"| fastdm peak allocated GiB | - | {memory.memory_stats().peak / 2**30:.1f} | |", flush=True)


def _pipeline_one(impl: str, folder: Path, steps: int, size: int) -> dict:
    kw = dict(prompt="an astronaut riding a horse on the moon", negative_prompt="blurry, low quality",
              height=size, width=size, num_inference_steps=steps, guidance_scale=5.0)
    if impl == "torch":
        import torch
        from diffusers import StableDiffusionXLPipeline

        t0 = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
        load = time.perf_counter() - t0
        pipe(**{**kw, "num_inference_steps": 2}, output_type="np")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe(**kw, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        torch.cuda.synchronize()
        return {"load_s": load, "total_s": time.perf_counter() - t0,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    from fastdm.runtime import cuda

    import fastdm

    t0 = time.perf_counter()
    pipe = fastdm.Pipeline.from_pretrained(folder, device="cuda")
    load = time.perf_counter() - t0
    pipe(**{**kw, "num_inference_steps": 2}, output_type="np")
    cuda.current_stream().synchronize()
    t0 = time.perf_counter()
    pipe(**kw, seed=0, output_type="np")
    cuda.current_stream().synchronize()
    total = time.perf_counter() - t0
    # The pipeline's own count: allocator peak + CUDA-graph memory peak (the UNet's activations while its graph
    # replays), an upper bound of what the process held at once.
    return {"load_s": load, "total_s": total, "peak_gib": pipe.timings.peak_memory_bytes / 2**30}


def bench_pipeline(folder: Path, steps: int, size: int) -> None:
    from timing import pipeline_table

    title = f"StableDiffusionXLPipeline {size}x{size}, {steps} steps, CFG 5.0, Euler, all on the GPU, bf16"
    pipeline_table(__file__, folder, steps, size, title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["make", "unet", "pipeline", "_pipeline_one"])
    p.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-rand"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--impl", choices=["torch", "fastdm"])
    a = p.parse_args()
    if a.what == "make":
        make(a.dir)
    elif a.what == "unet":
        bench_unet(a.dir, a.iters)
    elif a.what == "pipeline":
        bench_pipeline(a.dir, a.steps, a.size)
    else:
        print(json.dumps(_pipeline_one(a.impl, a.dir, a.steps, a.size)))


if __name__ == "__main__":
    main()
