"""FluxPipeline against diffusers' FluxPipeline on the tiny model of tests/fixtures/tiny-flux (the README quick-start
model): same seed -> same latents and pixels. Fixture: tests/reference/gen_tiny_flux_pipeline.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastdm.models.pipelines import (
    FluxPipeline,
    Pipeline,
    gpu_ready,
    read_model_index,
    resolve_device,
    resolve_dtype,
)
from fastdm.models.pipelines.flux import (
    embedded_scale,
    latent_image_ids,
    model_timestep,
    pack_latents,
    unpack_latents,
)
from fastdm.models.schedulers import flux_timesteps, scheduler_from_config
from fastdm.runtime import dtypes
from fastdm.runtime.errors import (
    InvalidArgumentError,
    ModelLayoutError,
    NoGpuError,
    SafetensorsError,
    UnsupportedDtypeError,
)
from fastdm.runtime.tensor import Tensor
from numerics import rel_l2
from pipeline_fixtures import edit_index, io_metadata, noise_kernel, pipeline_copy
from safetensors.numpy import load_file, save_file

import fastdm

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-flux"
IO = FIXTURES / "tiny_flux_pipeline_io.safetensors"
META = io_metadata(IO)
CASES = json.loads(META["cases"])
NOISE_KERNEL = noise_kernel(META)


@pytest.fixture(scope="module")
def io() -> dict:
    return load_file(str(IO))


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    p = Pipeline.from_pretrained(TINY, device="cpu")
    p.noise_kernel = NOISE_KERNEL
    return p


def _run(pipe, case: str, **kw):
    """The pipeline on a fixture case; also returns the packed latents after every step."""
    steps = []
    out = pipe(**CASES[case], callback=lambda i, t, lat: steps.append(np.array(lat.numpy(), dtype=np.float32)), **kw)
    return out, steps


@pytest.fixture(scope="module")
def square(pipe):
    return _run(pipe, "square", output_type="np")


# ------------------------------------------------------------------------------------------------- parity
def test_from_pretrained_builds_a_flux_pipeline_on_the_cpu(pipe):
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe, fastdm.Pipeline)
    assert pipe.device.type == "cpu" and pipe.dtype == dtypes.float32
    assert pipe.default_max_sequence_length == 512  # guidance-distilled (dev) layout
    assert pipe.timings.load_s > 0


def test_square_case_matches_diffusers_step_by_step(square, io):
    """Two prompts in one batch at 64x64, 4 steps, 512 T5 tokens."""
    images, steps = square
    expected = io["square.step_latents"]
    assert len(steps) == len(expected) == CASES["square"]["num_inference_steps"]
    for i, (got, ref) in enumerate(zip(steps, expected, strict=True)):
        assert rel_l2(got, ref) < 1e-4, f"step {i}: rel_l2 {rel_l2(got, ref):.3e}"
    assert rel_l2(steps[-1], io["square.latents"]) < 1e-4
    # float images: diffusers' output_type="np" ([B, H, W, 3] in [0, 1])
    assert images.shape == io["square.images"].shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert np.abs(images - io["square.images"]).max() < 1e-3


def test_square_case_pil_pixels(pipe, square, io):
    """uint8 pixels are round(255 x) of the float image x. The float images agree with diffusers to ~1.3e-6 (max
    abs: float32 rounding); a pixel changes only where 255 x lies within 255 * err of a rounding point, which for
    values spread over many levels is a fraction 2 * 255 * err of them: ~0.06% here. Bound: every value within
    one level and at most 0.5% of them off by one (what a float error of 1e-5 would give)."""
    pils = pipe(**CASES["square"])
    assert len(pils) == 2 and all(p.size == (64, 64) and p.mode == "RGB" for p in pils)
    pixels = np.stack([np.asarray(p) for p in pils]).astype(np.int16)
    diff = np.abs(pixels - io["square.pixels"].astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 0.005
    # and the pil output is the np output rounded, as diffusers does it
    assert np.array_equal(pixels, np.round(square[0] * 255).astype(np.int16))


def test_rect_case_prompt_2_truncation_and_images_per_prompt(pipe, io):
    """32x48 (non-square), a CLIP prompt past 77 tokens, a different T5 prompt cut at 16 tokens, 2 images per
    prompt, 2 steps: the packed latents (output_type="latent") and the float images."""
    latents, steps = _run(pipe, "rect", output_type="latent")
    assert latents.shape == io["rect.latents"].shape == (2, 6, 64)  # 2 images, (32/16) x (48/16) tokens
    assert rel_l2(latents, io["rect.latents"]) < 1e-4
    assert np.array_equal(latents, steps[-1])
    assert pipe.timings.decode_s == 0.0  # nothing decoded for "latent"
    images = pipe(**CASES["rect"], output_type="np")
    assert images.shape == (2, 32, 48, 3)
    assert np.abs(images - io["rect.images"]).max() < 1e-3
    # the two images of one prompt come from different noise, so they differ
    assert np.abs(images[0] - images[1]).mean() > 0.05


def test_prompt_embeddings_match_diffusers(pipe, io):
    for case in ("square", "rect"):
        c = CASES[case]
        embeds, pooled = pipe.encode_prompt(c["prompt"], c.get("prompt_2"), c.get("num_images_per_prompt", 1),
                                            c["max_sequence_length"])
        assert embeds.shape == io[f"{case}.prompt_embeds"].shape
        assert rel_l2(embeds.numpy(), io[f"{case}.prompt_embeds"]) < 1e-5
        assert rel_l2(pooled.numpy(), io[f"{case}.pooled_prompt_embeds"]) < 1e-5
    # two prompts x 2 images: each prompt's rows repeated in a row, [p0, p0, p1, p1], as diffusers orders them
    c = CASES["square"]
    embeds, pooled = pipe.encode_prompt(c["prompt"], None, 2, c["max_sequence_length"])
    order = [0, 0, 1, 1]
    assert rel_l2(embeds.numpy(), io["square.prompt_embeds"][order]) < 1e-5
    assert rel_l2(pooled.numpy(), io["square.pooled_prompt_embeds"][order]) < 1e-5


def test_embedded_timesteps_and_guidance_equal_diffusers_bit_for_bit(io):
    """What the transformer's time / guidance embedding sees (its float32 1000 * x) is exactly diffusers' value:
    in bf16 diffusers rounds t, t / 1000 and 1000 * (t / 1000) to bf16 (3.5 -> 3504 after scaling)."""
    thousand = np.float32(1000)
    for dt in (dtypes.float32, dtypes.bfloat16):
        n = dt.name
        for steps in (1, 4, 28, 50):
            for seq_len in (4096, 1024):
                sched = scheduler_from_config(TINY / "scheduler")
                flux_timesteps(sched, steps, seq_len)
                assert np.array_equal(sched.timesteps, io[f"table.{n}.timesteps_{steps}_{seq_len}"])
                got = np.array([model_timestep(t, 3, dt) * thousand for t in sched.timesteps])  # [steps, B]
                expected = io[f"table.{n}.embedded_{steps}_{seq_len}"]
                assert np.array_equal(got, np.repeat(expected[:, None], 3, axis=1)), (n, steps, seq_len)
        assert np.array_equal(embedded_scale(io[f"table.{n}.guidance"], dt) * thousand,
                              io[f"table.{n}.embedded_guidance"])
    # the values recorded from the transformer's arguments during the fixture's pipeline runs
    for prefix, dt in (("square", dtypes.float32), ("square.bf16", dtypes.bfloat16), ("rect.bf16", dtypes.bfloat16)):
        case = CASES[prefix.split(".")[0]]
        sched = scheduler_from_config(TINY / "scheduler")
        flux_timesteps(sched, case["num_inference_steps"], (case["height"] // 16) * (case["width"] // 16))
        recorded = io[f"{prefix}.embedded_timestep"]  # [steps, B]
        got = np.stack([model_timestep(t, recorded.shape[1], dt) * thousand for t in sched.timesteps])
        assert np.array_equal(got, recorded), prefix
        g = np.full(recorded.shape[1], embedded_scale(np.float32(case["guidance_scale"]), dt)) * thousand
        assert np.array_equal(np.broadcast_to(g, recorded.shape), io[f"{prefix}.embedded_guidance"]), prefix


def test_pack_unpack_and_image_ids():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 6, 10)).astype(np.float32)  # [B, C, h, w]
    packed = pack_latents(x)
    assert packed.shape == (3, 15, 64)
    # token (r, c) holds the 2x2 patch at rows 2r..2r+1, cols 2c..2c+1, channel-major
    assert np.array_equal(packed[1, 1 * 5 + 3], x[1, :, 2:4, 6:8].reshape(-1))
    assert np.array_equal(unpack_latents(Tensor.from_numpy(packed), 6, 10).numpy(), x)
    ids = latent_image_ids(6, 10)
    assert ids.shape == (15, 3) and ids.dtype == np.float32
    assert np.array_equal(ids[7], [0, 1, 2]) and not ids[:, 0].any()


# ------------------------------------------------------------------------------------------- call arguments
def test_sizes_must_be_multiples_of_16(pipe):
    with pytest.raises(InvalidArgumentError, match="height 1000 is not a multiple of 16.*use 992 or 1008"):
        pipe("a cat", height=1000, width=1024)
    with pytest.raises(InvalidArgumentError, match="width 70 is not a multiple of 16.*use 64 or 80"):
        pipe("a cat", height=64, width=70)
    with pytest.raises(InvalidArgumentError, match="width 8 is too small.*use 16"):
        pipe("a cat", height=64, width=8)
    with pytest.raises(InvalidArgumentError, match="height must be an integer"):
        pipe("a cat", height=64.0, width=64)
    with pytest.raises(InvalidArgumentError, match="width 50 is not a multiple of 16"):
        Pipeline.check_call(TINY, height=64, width=50)  # the same check without loading


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_type="jpeg"), "output_type 'jpeg'"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(max_sequence_length=513), "max_sequence_length must be between 2 and 512"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list"),
    (dict(prompt=["a", "b"], prompt_2=["c", "d", "e"]), "prompt_2 has 3 prompts for 2 prompts"),
    (dict(seed="0"), "seed must be an integer"),
])
def test_bad_arguments(pipe, kwargs, message):
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1) | kwargs
    with pytest.raises(InvalidArgumentError, match=message):
        pipe(**args)


def test_seed_none_draws_one_and_records_it(pipe):
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1, max_sequence_length=8,
                output_type="latent")
    first = pipe(**args, seed=None)
    seed = pipe.last_seed
    assert isinstance(seed, int)
    assert np.array_equal(pipe(**args, seed=seed), first)
    assert not np.array_equal(pipe(**args, seed=seed + 1), first)


def test_timings_are_recorded(pipe):
    pipe(**CASES["rect"], output_type="np")
    t = pipe.timings
    assert t.encode_s > 0 and t.decode_s > 0 and len(t.step_s) == CASES["rect"]["num_inference_steps"]
    assert t.total_s >= t.encode_s + sum(t.step_s) + t.decode_s
    assert t.peak_memory_bytes is None  # a CPU run


def test_free_text_encoders_reloads_them_for_the_next_call(pipe, io):
    p = FluxPipeline.from_pretrained(TINY, device="cpu", free_text_encoders=True)
    p.noise_kernel = NOISE_KERNEL
    assert p.text_encoder is None and p.text_encoder_2 is None  # loaded when first needed
    for _ in range(2):
        latents = p(**CASES["rect"], output_type="latent")
        assert p.text_encoder is None and p.text_encoder_2 is None
        assert rel_l2(latents, io["rect.latents"]) < 1e-4


# --------------------------------------------------------------------------------------------- loading errors
def test_not_a_folder(tmp_path):
    with pytest.raises(ModelLayoutError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nope", device="cpu")
    f = tmp_path / "flux1-dev.ckpt"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLayoutError, match="is a file, not a diffusers pipeline folder.*transformer=file"):
        Pipeline.from_pretrained(f, device="cpu")
    f = tmp_path / "broken.safetensors"  # a single file goes to the single-file loader, which checks the header
    f.write_bytes(b"\0" * 16)
    with pytest.raises(SafetensorsError):
        Pipeline.from_pretrained(f, device="cpu", tokenizer_folder=FIXTURES / "tiny-sdxl")
    with pytest.raises(ModelLayoutError, match="is the index file; pass the folder that holds it"):
        Pipeline.from_pretrained(TINY / "model_index.json", device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLayoutError, match="has no model_index.json.*Pass the root"):
        Pipeline.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ModelLayoutError, match="looks like a single component"):
        Pipeline.from_pretrained(TINY / "transformer", device="cpu")
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLayoutError, match="not valid JSON"):
        read_model_index(tmp_path)


def test_unknown_pipeline_class(tmp_path):
    root = pipeline_copy(TINY, tmp_path)
    edit_index(root, _class_name="StableVideoDiffusionPipeline")
    with pytest.raises(ModelLayoutError, match="holds a StableVideoDiffusionPipeline, which fastdm does not run; "
                                               "supported pipelines: FluxPipeline"):
        Pipeline.from_pretrained(root, device="cpu")


def test_missing_component(tmp_path):
    root = pipeline_copy(TINY, tmp_path, skip="vae")
    with pytest.raises(ModelLayoutError, match="has no vae/ folder.*fetch vae/ again"):
        Pipeline.from_pretrained(root, device="cpu")
    (root / "vae").symlink_to((TINY / "vae").resolve(), target_is_directory=True)
    edit_index(root, text_encoder_2=None)
    with pytest.raises(ModelLayoutError, match="lists no 'text_encoder_2' component"):
        Pipeline.from_pretrained(root, device="cpu")
    edit_index(root, text_encoder_2=["transformers", "T5EncoderModel"],
                transformer=["diffusers", "SD3Transformer2DModel"])
    with pytest.raises(ModelLayoutError, match="'transformer' is a SD3Transformer2DModel.*FluxTransformer2DModel"):
        Pipeline.from_pretrained(root, device="cpu")


def test_missing_component_file_and_tensor(tmp_path):
    root = pipeline_copy(TINY, tmp_path, skip="transformer")
    (root / "transformer").mkdir()
    with pytest.raises(ModelLayoutError, match="config.json"):
        Pipeline.from_pretrained(root, device="cpu")
    shutil.copy(TINY / "transformer" / "config.json", root / "transformer" / "config.json")
    weights = load_file(str(TINY / "transformer" / "diffusion_pytorch_model.safetensors"))
    del weights["single_transformer_blocks.0.proj_mlp.weight"]
    save_file(weights, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLayoutError, match="missing 1 tensor.*single_transformer_blocks.0.proj_mlp.weight"):
        Pipeline.from_pretrained(root, device="cpu")


def test_device_and_dtype_choice():
    from fastdm.runtime import cuda

    assert resolve_dtype(None, cuda.CPU) == dtypes.float32
    assert resolve_dtype("bf16", cuda.CPU) == dtypes.bfloat16
    with pytest.raises(UnsupportedDtypeError, match="not a compute dtype"):
        resolve_dtype("int8", cuda.CPU)

    class FakeGpu:
        type = "cuda"

    assert resolve_dtype(None, FakeGpu()) == dtypes.bfloat16
    with pytest.raises(UnsupportedDtypeError, match="float32 does not run on the GPU"):
        resolve_dtype("float32", FakeGpu())
    assert resolve_device("cpu") is cuda.CPU
    if not gpu_ready():
        assert resolve_device(None) is cuda.CPU
        with pytest.raises(NoGpuError, match="use device='cpu'"):
            resolve_device("cuda")


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["square", "rect"])
def test_bf16_on_gpu_matches_diffusers_bf16(io, case):
    """bf16 on the GPU against diffusers' bf16 CPU run of the same folder and seed, and against the fp32 images.

    In bf16 diffusers rounds the noise, timesteps, guidance and dt to bf16; fastdm does the same, and those
    roundings alone take the result far from fp32 (square: latents rel_l2 0.098, images 0.028; rect 0.083 / 0.024).
    The rest is each kernel's own rounding: measured on the CPU, a bf16-rounded pipeline with float32 activations
    lands 0.004 (latents) / 0.003 (images) from diffusers-bf16, and diffusers-bf16 with another attention kernel
    0.004 / 0.004. Dropping the bf16 timestep rounding alone moves the latents 0.023, the guidance rounding 0.094.
    Bounds: latents 0.03, images 0.02 from diffusers-bf16, images 0.05 from fp32 (twice diffusers' own drift)."""
    p = Pipeline.from_pretrained(TINY)  # the defaults: the GPU, bfloat16
    assert p.device.type == "cuda" and p.dtype == dtypes.bfloat16
    p.noise_kernel = NOISE_KERNEL
    images, steps = _run(p, case, output_type="np")
    final = steps[-1]
    assert np.all(np.isfinite(final)) and np.all(np.isfinite(images))
    err_lat = rel_l2(final, io[f"{case}.bf16.latents"])
    err_img = rel_l2(images, io[f"{case}.bf16.images"])
    err_fp32 = rel_l2(images, io[f"{case}.images"])
    assert err_lat < 0.03, f"latents vs diffusers bf16: rel_l2 {err_lat:.3e}"
    assert err_img < 0.02, f"images vs diffusers bf16: rel_l2 {err_img:.3e}"
    assert err_fp32 < 0.05, f"images vs diffusers fp32: rel_l2 {err_fp32:.3e}"
    t = p.timings
    assert t.peak_memory_bytes is not None and t.peak_memory_bytes > 0
    assert len(t.step_s) == CASES[case]["num_inference_steps"] and t.total_s > 0
    pils = p(**CASES[case])
    assert len(pils) == len(images) and pils[0].size == (CASES[case]["width"], CASES[case]["height"])



def test_transformer_option_replaces_the_folders_transformer(tmp_path):
    """transformer= loads the denoiser from elsewhere (a folder here; single files go through the same
    FluxTransformer.from_pretrained, tested in test_flux_single_file.py) and the rest from the pipeline folder."""
    folder = tmp_path / "tiny-flux"
    shutil.copytree(FIXTURES / "tiny-flux", folder)
    moved = shutil.move(str(folder / "transformer"), str(tmp_path / "my-transformer"))
    ref = Pipeline.from_pretrained(FIXTURES / "tiny-flux", device="cpu")
    pipe = Pipeline.from_pretrained(folder, device="cpu", transformer=moved)
    kw = dict(width=32, height=32, num_inference_steps=2, seed=3, output_type="latent")
    np.testing.assert_array_equal(ref("a red cube", **kw), pipe("a red cube", **kw))
