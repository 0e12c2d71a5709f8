"""Generate images from a prompt with a diffusers checkpoint folder, on the GPU when there is one.

    python scripts/generate.py --model /models/FLUX.1-dev --prompt "a frog holding a sign" --out frog.png
    python -m fastdm.scripts.generate --model /models/FLUX.1-schnell --steps 4 --guidance 0 --prompt "..."

Prints the load time, the time per denoising step, the total and the GPU's peak memory, and writes PNGs (numbered
out-0.png, out-1.png, ... when there are several). Mistakes in the arguments or the model folder print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as `python scripts/generate.py` from a checkout: make the checkout importable as fastdm
    _root = Path(__file__).resolve().parents[1]
    if (_root / "fastdm" / "__init__.py").is_file():
        sys.path.insert(0, str(_root))

EXIT_USAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description="Text-to-image with fastdm (no PyTorch).")
    p.add_argument("--model", required=True, help="diffusers pipeline folder (with model_index.json)")
    p.add_argument("--prompt", required=True, help="the prompt (CLIP, and T5 unless --prompt-2 is given)")
    p.add_argument("--prompt-2", default=None, help="a separate prompt for the T5 encoder (FLUX)")
    p.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28; FLUX.1-schnell: 4)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch.Generator('cpu') noise (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png); several: out-0.png, ...")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default: 512 for FLUX.1-dev, 256 for schnell)")
    return p.parse_args(argv)


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
    # mistakes in the folder or the size show before a load that can take a minute
    fastdm.Pipeline.check_call(args.model, height=args.height, width=args.width, num_inference_steps=args.steps,
                               num_images_per_prompt=args.num_images, max_sequence_length=args.max_sequence_length)
    pipe = fastdm.Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    print(f"loaded {args.model} ({type(pipe).__name__}, {pipe.device}, {pipe.dtype.name}) in "
          f"{pipe.timings.load_s:.2f} s", flush=True)

    with tqdm(total=args.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        images = pipe(args.prompt, prompt_2=args.prompt_2, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      num_images_per_prompt=args.num_images, max_sequence_length=args.max_sequence_length,
                      callback=lambda *_: bar.update())

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
