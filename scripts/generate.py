"""Generate images from a prompt with a diffusers checkpoint folder, on the GPU when there is one.

    python scripts/generate.py --model /models/FLUX.1-dev --prompt "a frog holding a sign" --out frog.png
    python -m fastdm.scripts.generate --model /models/FLUX.1-schnell --steps 4 --guidance 0 --prompt "..."
    python scripts/generate.py --model /models/stable-diffusion-xl-base-1.0 --prompt "an astronaut riding a horse" \
        --negative-prompt "blurry, low quality" --scheduler dpmpp_2m_karras --out astronaut.png

Options a model does not take (--negative-prompt or --scheduler for FLUX, --max-sequence-length for SDXL) are
refused; steps, guidance and size default to the model's own (FLUX: 28 steps, guidance 3.5, 1024x1024; SDXL: 30
steps, guidance 5.0, its UNet's native size).

Prints the load time, the time per denoising step, the total and the GPU's peak memory, and writes PNGs (numbered
out-0.png, out-1.png, ... when there are several). Mistakes in the arguments or the model folder print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as `python scripts/generate.py` from a checkout: make the checkout importable as fastdm
    _root = Path(__file__).resolve().parents[1]
    if (_root / "fastdm" / "__init__.py").is_file():
        sys.path.insert(0, str(_root))

EXIT_USAGE = 2


# --flag -> (the pipeline __call__ argument it sets, why a pipeline without that argument cannot honour it)
OPTIONAL_FLAGS = {
    "--prompt-2": ("prompt_2", "it has one text encoder for the prompt"),
    "--negative-prompt": ("negative_prompt", "FLUX.1 is guidance-distilled and has no negative prompt"),
    "--scheduler": ("scheduler", "it runs its own flow-matching Euler schedule"),
    "--max-sequence-length": ("max_sequence_length", "its CLIP text encoders read 77 tokens"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description="Text-to-image with fastdm (no PyTorch).")
    p.add_argument("--model", required=True, help="diffusers pipeline folder (with model_index.json)")
    p.add_argument("--prompt", required=True, help="the prompt (for every text encoder unless --prompt-2 is given)")
    p.add_argument("--prompt-2", default=None,
                   help="a separate prompt for the second text encoder (FLUX: T5; SDXL: OpenCLIP-bigG)")
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (SDXL; default none: the unconditional half is zeros)")
    p.add_argument("--scheduler", default=None,
                   help="sampler (SDXL): euler | euler_a | dpmpp_2m | dpmpp_2m_karras (default: the model's own)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of 16 (FLUX) / 8 (SDXL) (default: the model's native size, 1024)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 16 (FLUX) / 8 (SDXL) (default: the model's native size, 1024)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the pipeline's, FLUX 28, SDXL 30; FLUX.1-schnell: use 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's, FLUX 3.5, SDXL 5.0; SDXL: <= 1 turns CFG off)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch.Generator('cpu') noise (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png); several: out-0.png, ...")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (FLUX; default: 512 for FLUX.1-dev, 256 for schnell)")
    return p.parse_args(argv)


def call_arguments(args: argparse.Namespace, pipeline_class: type) -> dict[str, Any]:
    """The pipeline call's keyword arguments from the flags given; a flag the pipeline cannot honour is refused
    with InvalidArgumentError (nothing is silently dropped)."""
    from fastdm.runtime.errors import InvalidArgumentError

    accepted = inspect.signature(pipeline_class.__call__).parameters
    for flag, (name, why) in OPTIONAL_FLAGS.items():
        if getattr(args, name) is not None and name not in accepted:
            raise InvalidArgumentError(f"{flag} does not apply to {pipeline_class.__name__} ({why}); leave it out")
    given = {"prompt_2": args.prompt_2, "negative_prompt": args.negative_prompt, "scheduler": args.scheduler,
             "max_sequence_length": args.max_sequence_length, "height": args.height, "width": args.width,
             "num_inference_steps": args.steps, "guidance_scale": args.guidance}
    call = {k: v for k, v in given.items() if v is not None}
    call.update(seed=args.seed, num_images_per_prompt=args.num_images)
    return call


def default_of(pipeline_class: type, name: str) -> Any:
    """The default of one of the pipeline call's arguments."""
    return inspect.signature(pipeline_class.__call__).parameters[name].default


def output_paths(out: str, n: int) -> list[Path]:
    """--out as PNG paths: the name itself for one image, numbered name-0.png, name-1.png, ... for several."""
    from fastdm.runtime.errors import InvalidArgumentError

    path = Path(out)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() != ".png" or not path.stem:
        raise InvalidArgumentError(f"--out {out}: images are written as PNG; give a file name ending in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    import fastdm

    paths = output_paths(args.out, args.num_images)
    # mistakes in the folder, the flags or the size show before a load that can take a minute
    call = call_arguments(args, fastdm.Pipeline.class_for(args.model))
    fastdm.Pipeline.check_call(args.model, **call)
    pipe = fastdm.Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    print(f"loaded {args.model} ({type(pipe).__name__}, {pipe.device}, {pipe.dtype.name}) in "
          f"{pipe.timings.load_s:.2f} s", flush=True)

    steps = call.get("num_inference_steps", default_of(type(pipe), "num_inference_steps"))
    with tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        images = pipe(args.prompt, **call, callback=lambda *_: bar.update())

    t = pipe.timings
    print(f"text encoding: {t.encode_s:.3f} s")
    print(f"time per step: {t.mean_step_s:.3f} s (mean of {len(t.step_s)}; first {t.step_s[0]:.3f} s)")
    print(f"decode: {t.decode_s:.3f} s")
    print(f"total: {t.total_s:.2f} s (load {t.load_s:.2f} s not included)")
    print(f"peak GPU memory: {_gib(t.peak_memory_bytes) if t.peak_memory_bytes is not None else 'n/a (CPU run)'}")
    for img, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        print(f"wrote {path} ({img.width}x{img.height})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fastdm.runtime.errors import CudaError, FastdmError

    try:
        run(args)
    except CudaError:  # a driver or kernel failure is a bug to report, with its traceback
        raise
    except (FastdmError, OSError) as e:  # what the user can fix: the folder, the arguments, the output path
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
