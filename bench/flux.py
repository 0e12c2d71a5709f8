"""FLUX.1 at full size with random bf16 weights: fastdm vs diffusers on the same card, in one run.

  python bench/flux.py make --dir /tmp/flux-rand [--pipeline]   # write random weights in the diffusers layout
  python bench/flux.py transformer --dir /tmp/flux-rand         # one forward at 1024x1024: rel error and ms
  python bench/flux.py pipeline --dir /tmp/flux-rand            # 1024x1024, 28 steps: seconds and peak memory

The checkpoint is the real published layout (config.json + sharded safetensors, written by diffusers/transformers
save_pretrained) and fastdm loads it through from_pretrained, so the loading code under test is the real one.
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

FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def make(folder: Path, pipeline: bool) -> None:
    """Random full-size FLUX.1-dev components, initialised on the GPU in bf16, saved with save_pretrained."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (folder / "transformer" / "config.json").exists():
        with torch.device("cuda"):
            model = FluxTransformer2DModel(**FLUX_TRANSFORMER).to(torch.bfloat16)
        model.save_pretrained(folder / "transformer", max_shard_size="10GB")
        del model
        torch.cuda.empty_cache()
    if pipeline:
        _make_pipeline_rest(folder)
    print(f"made {folder} in {time.perf_counter() - t0:.0f} s", flush=True)


def _make_pipeline_rest(folder: Path) -> None:
    import lzma

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if not (folder / "text_encoder_2" / "config.json").exists():
        with torch.device("cuda"):
            t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                         feed_forward_proj="gated-gelu", vocab_size=32128,
                                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                         layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True))
        t5.to(torch.bfloat16).save_pretrained(folder / "text_encoder_2", max_shard_size="10GB")
        del t5
    if not (folder / "text_encoder" / "config.json").exists():
        with torch.device("cuda"):
            clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                                hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=1))
        clip.to(torch.bfloat16).save_pretrained(folder / "text_encoder")
        del clip
    if not (folder / "vae" / "config.json").exists():
        with torch.device("cuda"):
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
        vae.to(torch.bfloat16).save_pretrained(folder / "vae")
        del vae
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.save_pretrained(folder / "scheduler")
    shutil.copytree(TOKENIZERS / "clip", folder / "tokenizer", dirs_exist_ok=True)
    t5_tok = folder / "tokenizer_2"
    shutil.copytree(TOKENIZERS / "t5", t5_tok, dirs_exist_ok=True)
    if (t5_tok / "tokenizer.json.xz").exists():
        (t5_tok / "tokenizer.json").write_bytes(lzma.decompress((t5_tok / "tokenizer.json.xz").read_bytes()))
        (t5_tok / "tokenizer.json.xz").unlink()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    torch.cuda.empty_cache()


def transformer_inputs(seed: int = 0, height: int = 1024, width: int = 1024, s_txt: int = 512):
    rng = np.random.default_rng(seed)
    h, w = height // 16, width // 16
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    return {
        "hidden_states": rng.standard_normal((1, h * w, 64)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((1, s_txt, 4096)).astype(np.float32),
        "pooled_projections": rng.standard_normal((1, 768)).astype(np.float32),
        # 0.5 * 1000 and 4.0 * 1000 are exact in bf16, so diffusers' bf16 timestep rounding changes nothing
        "timestep": np.array([0.5], np.float32), "guidance": np.array([4.0], np.float32),
        "img_ids": img_ids.reshape(-1, 3), "txt_ids": np.zeros((s_txt, 3), np.float32),
    }


def _torch_forward(folder: Path, inp: dict, iters: int) -> tuple[np.ndarray, float, float]:
    """diffusers' output, median forward ms and load seconds; the model is freed on return."""
    import torch
    from diffusers import FluxTransformer2DModel
    from timing import time_torch

    t0 = time.perf_counter()
    ref_model = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16).cuda()
    load = time.perf_counter() - t0
    tin = {k: torch.from_numpy(v).cuda() for k, v in inp.items()}
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        tin[k] = tin[k].to(torch.bfloat16)
    with torch.inference_mode():
        ref = ref_model(**tin, return_dict=False)[0].float().cpu().numpy()
        ms = time_torch(lambda: ref_model(**tin, return_dict=False)[0], warmup=2, iters=iters)
    return ref, ms, load


def _torch_forward_fp32(folder: Path, inp: dict) -> np.ndarray:
    """diffusers in float32 on the same bf16 weights: the reference both bf16 outputs are measured against."""
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32).cuda()
    tin = {k: torch.from_numpy(v).cuda() for k, v in inp.items()}
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):  # the bf16 runs' exact inputs
        tin[k] = tin[k].to(torch.bfloat16).float()
    with torch.inference_mode():
        return model(**tin, return_dict=False)[0].float().cpu().numpy()


def bench_transformer(folder: Path, iters: int) -> None:
    import torch
    from fastdm.models.denoisers.flux import FluxTransformer
    from fastdm.runtime import memory, ops
    from fastdm.runtime.tensor import Tensor
    from timing import time_fastdm, without_pdl

    inp = transformer_inputs()
    ref, ms_torch, t_load_torch = _torch_forward(folder, inp, iters)
    torch.cuda.empty_cache()
    ref32 = _torch_forward_fp32(folder, inp)
    torch.cuda.empty_cache()

    t0 = time.perf_counter()
    model = FluxTransformer.from_pretrained(folder / "transformer", device="cuda", dtype="bfloat16")
    t_load_ours = time.perf_counter() - t0
    dev_inp = dict(inp)  # activations uploaded once, as diffusers gets them; ids and scalars stay on the host
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        dev_inp[k] = ops.cast(Tensor.from_numpy(inp[k], device="cuda"), "bfloat16")
    out = model(**dev_inp).numpy().astype(np.float32)
    ms_ours = time_fastdm(lambda: model(**dev_inp), warmup=2, iters=iters)
    ms_no_pdl = without_pdl(lambda: time_fastdm(lambda: model(**dev_inp), warmup=2, iters=iters))
    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    err, err32, floor = rel(out, ref), rel(out, ref32), rel(ref, ref32)
    peak = memory.memory_stats().peak / 2**30
    print(f"card: {torch.cuda.get_device_name()}, FLUX.1 transformer 1024x1024 (4096 img + 512 txt tokens), bf16")
    print("| what | diffusers eager | fastdm | ratio |")
    print("|---|---|---|---|")
    print(f"| forward ms (median of {iters}) | {ms_torch:.1f} | {ms_ours:.1f} | {ms_torch / ms_ours:.2f}x |")
    print(f"| forward ms, programmatic dependent launch off (FASTDM_PDL=0) | {ms_torch:.1f} | {ms_no_pdl:.1f} | "
          f"{ms_torch / ms_no_pdl:.2f}x |")
    print(f"| load s (warm page cache) | {t_load_torch:.1f} | {t_load_ours:.1f} | {t_load_torch / t_load_ours:.2f}x |")
    print(f"| output rel L2 vs diffusers bf16 | - | {err:.2e} | |")
    print(f"| output rel L2 vs diffusers fp32 | {floor:.2e} (diffusers bf16) | {err32:.2e} | |")
    print(f"| fastdm peak allocated GiB | - | {peak:.1f} | |", flush=True)


def _pipeline_torch(folder: Path, steps: int, size: int) -> dict:
    import torch
    from diffusers import FluxPipeline

    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
    load = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    kw = dict(prompt="a frog holding a sign that says hello", height=size, width=size, num_inference_steps=steps,
              guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    pipe(**{**kw, "num_inference_steps": 2})  # warm-up (cuDNN/cuBLAS handles)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    img = pipe(**kw).images[0]
    torch.cuda.synchronize()
    return {"load_s": load, "total_s": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "image": np.asarray(img, np.float32).tolist() if size <= 64 else None}


def _pipeline_fastdm(folder: Path, steps: int, size: int) -> dict:
    from fastdm.runtime import cuda, memory

    import fastdm

    t0 = time.perf_counter()
    pipe = fastdm.Pipeline.from_pretrained(folder, device="cuda")
    load = time.perf_counter() - t0
    kw = dict(prompt="a frog holding a sign that says hello", height=size, width=size, num_inference_steps=steps,
              guidance_scale=3.5, seed=0)
    pipe(**{**kw, "num_inference_steps": 2})
    cuda.current_stream().synchronize()
    memory.allocator().reset_peak()
    t0 = time.perf_counter()
    pipe(**kw)
    cuda.current_stream().synchronize()
    return {"load_s": load, "total_s": time.perf_counter() - t0, "peak_gib": memory.memory_stats().peak / 2**30}


def bench_pipeline(folder: Path, steps: int, size: int) -> None:
    from timing import pipeline_table

    title = f"FLUX.1 pipeline {size}x{size}, {steps} steps, all components on the GPU, bf16"
    pipeline_table(__file__, folder, steps, size, title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["make", "transformer", "pipeline", "_pipeline_one"])
    p.add_argument("--dir", type=Path, default=Path("/tmp/flux-rand"))
    p.add_argument("--pipeline", action="store_true", help="make: also the text encoders, VAE, tokenizers")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--impl", choices=["torch", "fastdm"])
    a = p.parse_args()
    if a.what == "make":
        make(a.dir, a.pipeline)
    elif a.what == "transformer":
        bench_transformer(a.dir, a.iters)
    elif a.what == "pipeline":
        bench_pipeline(a.dir, a.steps, a.size)
    else:
        fn = _pipeline_torch if a.impl == "torch" else _pipeline_fastdm
        print(json.dumps(fn(a.dir, a.steps, a.size)))


if __name__ == "__main__":
    main()
