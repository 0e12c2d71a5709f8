"""scripts/generate.py on the tiny FLUX model (tests/fixtures/tiny-flux), on the CPU: the images diffusers makes for
the same arguments, the timing lines, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-flux"
IO = ROOT / "tests" / "fixtures" / "tiny_flux_pipeline_io.safetensors"
SCRIPT = ROOT / "scripts" / "generate.py"


def _case(name: str) -> dict:
    with safe_open(str(IO), "np") as f:
        return json.loads(f.metadata()["cases"])[name]


def _run(args: list[str], cwd: Path, module: bool = False, isolated: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: by path (`python scripts/generate.py`) or as `python -m
    fastdm.scripts.generate`. isolated: without site processing, so the installed (editable) fastdm is invisible and
    only the checkout next to the script can provide it; the dependencies come through PYTHONPATH."""
    env = dict(os.environ)
    cmd = [sys.executable]
    if isolated:
        deps = str(Path(np.__file__).resolve().parents[1])  # site-packages with numpy, tokenizers, PIL, ...
        env["PYTHONPATH"] = deps
        cmd.append("-S")
    cmd += ["-m", "fastdm.scripts.generate"] if module else [str(SCRIPT)]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_writes_numbered_pngs_equal_to_diffusers_and_prints_timings(tmp_path):
    """The fixture's "rect" case through the CLI: 2 images of 48x32 for a prompt and a separate T5 prompt."""
    case = _case("rect")
    out = tmp_path / "out" / "light.png"
    res = _run(["--model", str(TINY), "--prompt", case["prompt"], "--prompt-2", case["prompt_2"],
                "--width", str(case["width"]), "--height", str(case["height"]), "--steps",
                str(case["num_inference_steps"]), "--guidance", str(case["guidance_scale"]), "--seed",
                str(case["seed"]), "--num-images", str(case["num_images_per_prompt"]), "--max-sequence-length",
                str(case["max_sequence_length"]), "--device", "cpu", "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    for start in ("loaded ", "text encoding: ", "time per step: ", "decode: ", "total: ", "peak GPU memory: "):
        assert any(line.startswith(start) for line in lines), f"no line starting {start!r} in:\n{res.stdout}"
    assert "FluxPipeline, cpu, float32" in res.stdout
    assert "denoising" in res.stderr and f"{case['num_inference_steps']}/{case['num_inference_steps']}" in res.stderr

    expected = load_file(str(IO))["rect.pixels"]  # diffusers' PIL output, [2, 32, 48, 3]
    for i in range(2):
        path = tmp_path / "out" / f"light-{i}.png"
        assert path.is_file(), res.stdout
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (case["width"], case["height"])
        diff = np.abs(_pixels(path).astype(np.int16) - expected[i].astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005  # the bound of test_flux_pipeline's pixel test
    assert not out.exists()  # several images are numbered


def test_runs_from_a_checkout_without_installing(tmp_path):
    res = _run(["--model", str(TINY), "--prompt", "a red bicycle", "--width", "32", "--height", "16", "--steps", "1",
                "--device", "cpu", "--out", "bike"], cwd=tmp_path, isolated=True)
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(tmp_path / "bike.png") as im:  # ".png" added
        assert im.size == (32, 16)


def test_runs_as_a_module():
    res = _run(["--help"], cwd=ROOT, module=True)
    assert res.returncode == 0 and "--max-sequence-length" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/no-such-model"], "does not exist"),
    (["--model", str(TINY / "transformer")], "has no model_index.json"),
    (["--model", str(TINY), "--width", "50"], "width 50 is not a multiple of 16"),
    (["--model", str(TINY), "--steps", "0"], "num_inference_steps must be a positive integer"),
    (["--model", str(TINY), "--out", "{tmp}/x.jpg"], "ending in .png"),
    (["--model", str(TINY), "--dtype", "int8", "--device", "cpu"], "not a compute dtype"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = _run(args + ["--prompt", "a cat"], cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpg"))


# ------------------------------------------------------------------------------------------------------ SDXL
TINY_SDXL = ROOT / "tests" / "fixtures" / "tiny-sdxl"
SDXL_IO = ROOT / "tests" / "fixtures" / "tiny_sdxl_pipeline_io.safetensors"


def _sdxl_case(name: str) -> dict:
    with safe_open(str(SDXL_IO), "np") as f:
        return json.loads(f.metadata()["cases"])[name]


def test_sdxl_with_negative_prompt_and_scheduler_writes_diffusers_pixels(tmp_path):
    """The fixture's "dpmpp_2m_karras_rect" case through the CLI: a negative prompt and DPM++ 2M Karras at 48x32."""
    case = _sdxl_case("dpmpp_2m_karras_rect")
    out = tmp_path / "bike.png"
    res = _run(["--model", str(TINY_SDXL), "--prompt", case["prompt"], "--negative-prompt", case["negative_prompt"],
                "--scheduler", case["scheduler"], "--width", str(case["width"]), "--height", str(case["height"]),
                "--steps", str(case["num_inference_steps"]), "--guidance", str(case["guidance_scale"]), "--seed",
                str(case["seed"]), "--device", "cpu", "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "StableDiffusionXLPipeline, cpu, float32" in res.stdout
    assert f"mean of {case['num_inference_steps']};" in res.stdout
    expected = load_file(str(SDXL_IO))["dpmpp_2m_karras_rect.pixels"][0]  # diffusers' PIL output [32, 48, 3]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (case["width"], case["height"])
    diff = np.abs(_pixels(out).astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005  # the bound of test_sdxl_pipeline's pixel test


def test_sdxl_defaults_come_from_the_model(tmp_path):
    """No --width/--height/--steps/--guidance: the pipeline's defaults (30 steps, guidance 5) at the UNet's native
    size (the tiny model's sample_size 8 -> 64x64), not FLUX's."""
    res = _run(["--model", str(TINY_SDXL), "--prompt", "a red bicycle", "--device", "cpu", "--out", "bike.png"],
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean of 30;" in res.stdout and "30/30" in res.stderr
    with Image.open(tmp_path / "bike.png") as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("model, args, message", [
    ("flux", ["--negative-prompt", "blurry"], "--negative-prompt does not apply to FluxPipeline"),
    ("flux", ["--scheduler", "euler"], "--scheduler does not apply to FluxPipeline"),
    ("sdxl", ["--max-sequence-length", "64"], "--max-sequence-length does not apply to StableDiffusionXLPipeline"),
    ("sdxl", ["--scheduler", "ddim"], "unknown scheduler 'ddim' for SDXL; use one of euler, euler_a, dpmpp_2m"),
    ("sdxl", ["--width", "60"], "width 60 is not a multiple of 8 (the VAE's latents are 1/8 of the image): use 56 "
                                "or 64"),
    ("sdxl", ["--steps", "0"], "num_inference_steps must be a positive integer"),
])
def test_flags_a_model_cannot_honour_are_refused(tmp_path, model, args, message):
    folder = TINY if model == "flux" else TINY_SDXL
    res = _run(["--model", str(folder), "--prompt", "a cat", "--device", "cpu"] + args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "loaded" not in res.stdout  # refused before loading the model
    assert not list(tmp_path.glob("*.png"))
