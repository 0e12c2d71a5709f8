"""StableDiffusionXLPipeline against diffusers' StableDiffusionXLPipeline on the tiny model of tests/fixtures/tiny-sdxl:
same seed -> same latents and pixels, for the model's Euler sampler, DPM++ 2M Karras and Euler ancestral, with and
without negative prompts, and with guidance off. Fixture: tests/reference/gen_tiny_sdxl_pipeline.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from fastdm.models.pipelines import Pipeline, StableDiffusionXLPipeline
from fastdm.models.pipelines.sdxl import add_time_ids, vae_dtype_for
from fastdm.models.schedulers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    scheduler_by_name,
)
from fastdm.runtime import cuda, dtypes
from fastdm.runtime.errors import InvalidArgumentError, ModelLayoutError
from numerics import rel_l2
from pipeline_fixtures import edit_index, io_metadata, noise_kernel, pipeline_copy
from safetensors.numpy import load_file

import fastdm

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-sdxl"
IO = FIXTURES / "tiny_sdxl_pipeline_io.safetensors"
META = io_metadata(IO)
CASES = json.loads(META["cases"])
NOISE_KERNEL = noise_kernel(META)
SCHEDULER_CLASSES = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
                     "dpmpp_2m_karras": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def io() -> dict:
    return load_file(str(IO))


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    p = Pipeline.from_pretrained(TINY, device="cpu")
    p.noise_kernel = NOISE_KERNEL
    return p


class UNetRecorder:
    """Wraps the pipeline's UNet and keeps the arguments of every call."""

    def __init__(self, p: StableDiffusionXLPipeline):
        self.p, self.unet, self.calls = p, p.unet, []

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        self.calls.append(dict(batch=sample.shape[0], timestep=float(timestep),
                               encoder_hidden_states=np.array(encoder_hidden_states.numpy(), dtype=np.float32),
                               text_embeds=np.array(text_embeds.numpy(), dtype=np.float32),
                               time_ids=np.array(time_ids, dtype=np.float32)))
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

    def __enter__(self):
        self.p.unet = self
        return self

    def __exit__(self, *exc):
        self.p.unet = self.unet

    def __getattr__(self, name):  # config, ...
        return getattr(self.unet, name)


def _run(p, case: str, **kw):
    """The pipeline on a fixture case: (output, latents after every step, the UNet calls)."""
    steps = []
    with UNetRecorder(p) as rec:
        out = p(**CASES[case], callback=lambda i, t, lat: steps.append(np.array(lat.numpy(), dtype=np.float32)),
                **kw)
    return out, steps, rec.calls


_RUNS: dict = {}


def _cached(p, case: str):
    if case not in _RUNS:
        _RUNS[case] = _run(p, case, output_type="np")
    return _RUNS[case]


# ------------------------------------------------------------------------------------------------- parity
def test_from_pretrained_builds_an_sdxl_pipeline_on_the_cpu(pipe):
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe, fastdm.Pipeline)
    assert pipe.device.type == "cpu" and pipe.dtype == dtypes.float32 and pipe.vae.dtype == dtypes.float32
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # the folder's scheduler_config.json
    assert pipe.force_zeros_for_empty_prompt  # from model_index.json, as SDXL base ships it
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.default_sample_size == 8 and pipe.vae_scale_factor == 8  # the UNet's sample_size: 64 px
    assert pipe.timings.load_s > 0
    assert Pipeline.class_for(TINY) is StableDiffusionXLPipeline


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_step_by_step(pipe, io, case):
    """Every step's latents (rel_l2 < 1e-4; measured ~3e-6, float32 rounding) and the float images (max abs
    < 1e-3; measured ~3e-6) of each case: the three samplers, with zero / encoded / empty negative prompts, 2 prompts
    or 2 images per prompt, 64x64 and 48x32, and guidance off."""
    images, steps, calls = _cached(pipe, case)
    c = CASES[case]
    expected = io[f"{case}.step_latents"]
    assert len(steps) == len(expected) == c["num_inference_steps"]
    for i, (got, ref) in enumerate(zip(steps, expected, strict=True)):
        assert rel_l2(got, ref) < 1e-4, f"step {i}: rel_l2 {rel_l2(got, ref):.3e}"
    n = len(c["prompt"]) if isinstance(c["prompt"], list) else 1
    n *= c.get("num_images_per_prompt", 1)
    assert images.shape == io[f"{case}.images"].shape == (n, c["height"], c["width"], 3)
    assert images.dtype == np.float32
    assert np.abs(images - io[f"{case}.images"]).max() < 1e-3
    # the UNet saw what diffusers' saw: one call per step, at diffusers' timesteps, the batch doubled for CFG
    assert [k["timestep"] for k in calls] == pytest.approx(io[f"{case}.unet_timesteps"].tolist(), abs=1e-4)
    cfg = c["guidance_scale"] > 1
    assert all(k["batch"] == (2 * n if cfg else n) for k in calls)


@pytest.mark.parametrize("case", list(CASES))
def test_unet_conditioning_matches_diffusers(pipe, io, case):
    """The text states (unconditional rows first, zeros for no negative prompt), the pooled text embeddings and
    the micro-conditioning time ids of the first UNet call."""
    _, _, calls = _cached(pipe, case)
    first = calls[0]
    assert rel_l2(first["text_embeds"], io[f"{case}.unet_text_embeds"]) < 1e-5
    assert np.array_equal(first["time_ids"], io[f"{case}.unet_time_ids"])
    key = f"{case}.unet_encoder_hidden_states"
    if key in io:
        assert rel_l2(first["encoder_hidden_states"], io[key]) < 1e-5


def test_pil_pixels(pipe, io):
    """uint8 pixels are round(255 x) of the float image x, whose max error is ~3e-6: a pixel changes only where
    255 x lies within 255 * 3e-6 of a rounding point, a fraction of ~0.15% of values at most (measured: 0 to
    0.04% per case). Bound: every value within one level, at most 0.5% of them off by one."""
    for case in CASES:
        pils = pipe(**CASES[case])
        c = CASES[case]
        assert all(p.size == (c["width"], c["height"]) and p.mode == "RGB" for p in pils)
        pixels = np.stack([np.asarray(p) for p in pils]).astype(np.int16)
        diff = np.abs(pixels - io[f"{case}.pixels"].astype(np.int16))
        assert diff.max() <= 1, case
        assert (diff > 0).mean() <= 0.005, case
        # and the pil output is the np output rounded, as diffusers does it
        assert np.array_equal(pixels, np.round(_cached(pipe, case)[0] * 255).astype(np.int16)), case


def test_latent_output(pipe, io):
    latents = pipe(**CASES["euler_rect"], output_type="latent")
    assert latents.shape == (2, 4, 4, 6)  # 2 images of (32/8) x (48/8) latent pixels
    assert rel_l2(latents, io["euler_rect.latents"]) < 1e-4
    assert pipe.timings.decode_s == 0.0


# ------------------------------------------------------------------------------------ prompts and guidance
def test_encode_prompt_layout(pipe, io):
    """encode_prompt gives the UNet's text inputs: [2BN, 77, 48] with the unconditional rows first."""
    c = CASES["euler_rect"]  # 1 prompt, 2 images, negative prompts for both encoders
    states, pooled = pipe.encode_prompt(c["prompt"], c["prompt_2"], c["negative_prompt"], c["negative_prompt_2"],
                                        num_images_per_prompt=2)
    assert states.shape == (4, 77, 48) and pooled.shape == (4, 32)
    assert rel_l2(states.numpy(), io["euler_rect.unet_encoder_hidden_states"]) < 1e-5
    s = states.numpy()
    assert np.array_equal(s[0], s[1]) and np.array_equal(s[2], s[3]) and not np.allclose(s[0], s[2])
    # no negative prompt: zeros (force_zeros_for_empty_prompt), the conditional rows as before
    zero_states, zero_pooled = pipe.encode_prompt(c["prompt"], c["prompt_2"], None, "ignored without a negative",
                                                  num_images_per_prompt=2)
    assert not zero_states.numpy()[:2].any() and not zero_pooled.numpy()[:2].any()
    assert rel_l2(zero_states.numpy()[2:], s[2:]) < 1e-6
    # without guidance: only the conditional rows
    cond, cond_pooled = pipe.encode_prompt(c["prompt"], c["prompt_2"], "unused", None, num_images_per_prompt=2,
                                           do_classifier_free_guidance=False)
    # (the same rows in smaller batches: BLAS may round the projection's last bit differently)
    assert rel_l2(cond.numpy(), s[2:]) < 1e-6 and rel_l2(cond_pooled.numpy(), pooled.numpy()[2:]) < 1e-6


def test_second_encoder_states_sit_after_the_first(pipe):
    """The UNet's text states are [CLIP-L penultimate (32) | bigG penultimate (16)]: prompt_2 changes only the
    last 16 columns."""
    a, pa = pipe.encode_prompt("a cat", None, do_classifier_free_guidance=False)
    b, pb = pipe.encode_prompt("a cat", "a dog", do_classifier_free_guidance=False)
    a, b = a.numpy(), b.numpy()
    assert np.array_equal(a[..., :32], b[..., :32]) and not np.allclose(a[..., 32:], b[..., 32:])
    assert not np.allclose(pa.numpy(), pb.numpy())  # the pooled embedding is the second encoder's


def test_guidance_off_ignores_the_negative_prompt(pipe, io):
    """guidance_scale <= 1: one UNet batch, no negative prompt read (as diffusers' do_classifier_free_guidance)."""
    args = dict(CASES["nocfg"], output_type="latent")
    args.pop("negative_prompt")
    with UNetRecorder(pipe) as rec:
        latents = pipe(**args, negative_prompt="something else entirely")
    assert all(c["batch"] == 2 for c in rec.calls)
    assert rel_l2(latents, io["nocfg.latents"]) < 1e-4
    guided = pipe(**dict(args, guidance_scale=1.5))
    assert rel_l2(guided, io["nocfg.latents"]) > 0.01  # and just above 1 it guides


def test_empty_negative_prompt_with_force_zeros_off(tmp_path, io):
    """force_zeros_for_empty_prompt false in model_index.json: no negative prompt means the empty prompt "", which
    the euler_a_square case passes explicitly."""
    root = pipeline_copy(TINY, tmp_path)
    edit_index(root, force_zeros_for_empty_prompt=False)
    p = Pipeline.from_pretrained(root, device="cpu")
    p.noise_kernel = NOISE_KERNEL
    assert not p.force_zeros_for_empty_prompt
    args = dict(CASES["euler_a_square"], output_type="latent")
    assert args.pop("negative_prompt") == ""
    assert rel_l2(p(**args), io["euler_a_square.latents"]) < 1e-4


def test_micro_conditioning(pipe):
    with UNetRecorder(pipe) as rec:
        pipe("a cat", height=16, width=24, num_inference_steps=1, output_type="latent",
             original_size=(1024, 768), crops_coords_top_left=(64, 32), target_size=(896, 1152))
    assert rec.calls[0]["time_ids"].tolist() == [[1024, 768, 64, 32, 896, 1152]] * 2
    # diffusers makes the time ids in the compute dtype: in bfloat16 2056 rounds to 2048 (ties to even), 1032 -> 1032
    ids = add_time_ids((2056, 1032), (0, 0), (1024, 1024), rows=3, dtype=dtypes.bfloat16)
    assert ids.shape == (3, 6) and ids.dtype == np.float32 and ids[2].tolist() == [2048, 1032, 0, 0, 1024, 1024]
    assert add_time_ids((2056, 1032), (0, 0), (1024, 1024), 1, dtypes.float32)[0, 0] == 2056


# ---------------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"])
def test_schedulers_by_name_use_the_model_config(pipe, name):
    s = pipe.get_scheduler(name)
    ref = scheduler_by_name(name, TINY / "scheduler")
    assert type(s) is type(ref) and s is not pipe.scheduler
    s.set_timesteps(5)
    ref.set_timesteps(5)
    assert np.array_equal(s.timesteps, ref.timesteps) and np.array_equal(s.sigmas, ref.sigmas)
    assert s.config.steps_offset == 1 and s.config.timestep_spacing == "leading"  # SDXL base's, from the folder


def test_replaced_scheduler_is_used(io):
    """As in diffusers, `pipe.scheduler = ...` changes the sampler of calls that name none."""
    p = Pipeline.from_pretrained(TINY, device="cpu")
    p.noise_kernel = NOISE_KERNEL
    p.scheduler = EulerAncestralDiscreteScheduler(p.scheduler_config)
    args = {k: v for k, v in CASES["euler_a_rect"].items() if k != "scheduler"}
    assert rel_l2(p(**args, output_type="latent"), io["euler_a_rect.latents"]) < 1e-4


def test_model_scheduler_without_a_fastdm_sampler(tmp_path, io):
    """A folder whose scheduler fastdm does not implement still loads; a call must then name a sampler, which is
    configured from that folder's config (here SDXL base's with another class name)."""
    root = pipeline_copy(TINY, tmp_path, skip="scheduler")
    (root / "scheduler").mkdir()
    cfg = json.loads((TINY / "scheduler" / "scheduler_config.json").read_text())
    cfg["_class_name"] = "DDIMScheduler"
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    edit_index(root, scheduler=["diffusers", "DDIMScheduler"])
    with pytest.raises(InvalidArgumentError, match="'DDIMScheduler' has no fastdm sampler; pick a sampler by name"):
        Pipeline.check_call(root, height=64, width=64)
    p = Pipeline.from_pretrained(root, device="cpu")
    p.noise_kernel = NOISE_KERNEL
    assert p.scheduler is None
    args = dict(CASES["euler_square"], output_type="latent")
    with pytest.raises(InvalidArgumentError, match="has no fastdm sampler.*euler, euler_a, dpmpp_2m"):
        p(**dict(args, scheduler=None))
    assert rel_l2(p(**args), io["euler_square.latents"]) < 1e-4  # scheduler="euler"


# ------------------------------------------------------------------------------------------- call arguments
def test_default_size_is_the_unet_sample_size(pipe):
    latents = pipe("a cat", num_inference_steps=1, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)  # sample_size 8 latent pixels: 64 x 64 images


def test_sizes_must_be_multiples_of_8(pipe):
    with pytest.raises(InvalidArgumentError, match="height 60 is not a multiple of 8.*use 56 or 64"):
        pipe("a cat", height=60, width=64)
    with pytest.raises(InvalidArgumentError, match="width 1020 is not a multiple of 8.*use 1016 or 1024"):
        pipe("a cat", height=64, width=1020)
    with pytest.raises(InvalidArgumentError, match="width 4 is too small.*use 8"):
        pipe("a cat", height=64, width=4)
    with pytest.raises(InvalidArgumentError, match="height must be an integer"):
        pipe("a cat", height=64.0, width=64)
    with pytest.raises(InvalidArgumentError, match="width 50 is not a multiple of 8.*use 48 or 56"):
        Pipeline.check_call(TINY, height=64, width=50)  # the same check without loading
    Pipeline.check_call(TINY)  # the defaults are valid


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="ddim"), "unknown scheduler 'ddim' for SDXL; use one of euler, euler_a, dpmpp_2m, dpmpp_2m_karras"),
    (dict(scheduler="flow_match_euler"), "unknown scheduler 'flow_match_euler' for SDXL"),
    (dict(output_type="jpeg"), "output_type 'jpeg'"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list"),
    (dict(prompt=["a", "b"], prompt_2=["c", "d", "e"]), "prompt_2 has 3 prompts for 2 prompts"),
    (dict(prompt=["a", "b"], negative_prompt=["c", "d", "e"]), "negative_prompt has 3 prompts for 2 prompts"),
    (dict(negative_prompt=3), "negative_prompt must be a string or a non-empty list"),
    (dict(original_size=(64,)), "original_size must be a pair of integers"),
    (dict(seed="0"), "seed must be an integer"),
    (dict(guidance_scale="5"), "guidance_scale must be a number"),
])
def test_bad_arguments(pipe, kwargs, message):
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1) | kwargs
    with pytest.raises(InvalidArgumentError, match=message):
        pipe(**args)


def test_check_call_rejects_an_unknown_scheduler_without_loading():
    with pytest.raises(InvalidArgumentError, match="unknown scheduler 'heun'"):
        Pipeline.check_call(TINY, scheduler="heun")
    with pytest.raises(InvalidArgumentError, match="num_inference_steps must be a positive integer"):
        Pipeline.check_call(TINY, num_inference_steps=0)


def test_seed_none_draws_one_and_records_it(pipe):
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1, output_type="latent")
    first = pipe(**args, seed=None)
    seed = pipe.last_seed
    assert isinstance(seed, int)
    assert np.array_equal(pipe(**args, seed=seed), first)
    assert not np.array_equal(pipe(**args, seed=seed + 1), first)


def test_timings_are_recorded(pipe):
    pipe(**CASES["euler_rect"], output_type="np")
    t = pipe.timings
    assert t.encode_s > 0 and t.decode_s > 0 and len(t.step_s) == CASES["euler_rect"]["num_inference_steps"]
    assert t.total_s >= t.encode_s + sum(t.step_s) + t.decode_s
    assert t.peak_memory_bytes is None  # a CPU run


# --------------------------------------------------------------------------------------------- dtypes
def test_vae_never_runs_in_float16():
    class FakeGpu:
        type = "cuda"

    assert vae_dtype_for(dtypes.float16, FakeGpu()) == dtypes.bfloat16
    assert vae_dtype_for(dtypes.float16, cuda.CPU) == dtypes.float32
    assert vae_dtype_for(dtypes.bfloat16, FakeGpu()) == dtypes.bfloat16
    assert vae_dtype_for(dtypes.float32, cuda.CPU) == dtypes.float32


@pytest.mark.parametrize("tag, dtype, lat_fp32, img_fp32", [("bf16", "bfloat16", 0.015, 0.005),
                                                              ("fp16", "float16", 0.003, 0.001)])
def test_low_precision_noise_on_the_cpu(io, tag, dtype, lat_fp32, img_fp32):
    """A bf16 / fp16 pipeline on the CPU: the weights and the initial noise in that dtype (diffusers draws the
    noise in the compute dtype), the arithmetic in float32 (ops.cpu), the VAE in float32 for fp16. The dtype's
    noise alone moves the result from the fp32 fixture by ~6e-3 / 7e-4 (latents) and ~2e-3 / 2.4e-4 (images);
    diffusers' own bf16 / fp16 arithmetic moves it ~2.5e-2 / 2.8e-3 and ~9e-3 / 9e-4. Bounds: ~2.5x the noise's
    share from fp32, and within diffusers' drift plus that from diffusers' low-precision run."""
    p = Pipeline.from_pretrained(TINY, device="cpu", dtype=dtype)
    p.noise_kernel = NOISE_KERNEL
    assert p.dtype.name == dtype and p.vae.dtype == (dtypes.float32 if tag == "fp16" else dtypes.bfloat16)
    case = json.loads(META["low_precision"])[tag][0]
    images, steps, _ = _run(p, case, output_type="np")
    ref_lat, ref_img = io[f"{case}.{tag}.latents"], io[f"{case}.{tag}.images"]
    drift_lat, drift_img = rel_l2(ref_lat, io[f"{case}.latents"]), rel_l2(ref_img, io[f"{case}.images"])
    assert rel_l2(steps[-1], io[f"{case}.latents"]) < lat_fp32
    assert rel_l2(images, io[f"{case}.images"]) < img_fp32
    assert rel_l2(steps[-1], ref_lat) < drift_lat + lat_fp32
    assert rel_l2(images, ref_img) < drift_img + img_fp32


# --------------------------------------------------------------------------------------------- loading errors
def test_missing_or_wrong_components(tmp_path):
    root = pipeline_copy(TINY, tmp_path, skip="unet")
    with pytest.raises(ModelLayoutError, match="has no unet/ folder.*fetch unet/ again"):
        Pipeline.from_pretrained(root, device="cpu")
    (root / "unet").symlink_to((TINY / "unet").resolve(), target_is_directory=True)
    edit_index(root, text_encoder_2=["transformers", "CLIPTextModel"])
    with pytest.raises(ModelLayoutError, match="'text_encoder_2' is a CLIPTextModel.*CLIPTextModelWithProjection"):
        Pipeline.from_pretrained(root, device="cpu")
    edit_index(root, text_encoder_2=None)
    with pytest.raises(ModelLayoutError, match="lists no 'text_encoder_2' component"):
        StableDiffusionXLPipeline.from_pretrained(root, device="cpu")


def test_encoders_that_do_not_fit_the_unet(tmp_path):
    """text_encoder_2 swapped for text_encoder (CLIP-L, hidden 32, also with a projection here): the UNet's
    cross_attention_dim 48 is not 32 + 32."""
    root = pipeline_copy(TINY, tmp_path, skip="text_encoder_2")
    (root / "text_encoder_2").mkdir()
    cfg = json.loads((TINY / "text_encoder" / "config.json").read_text())
    cfg["architectures"] = ["CLIPTextModelWithProjection"]
    (root / "text_encoder_2" / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(TINY / "text_encoder" / "model.safetensors"))
    weights["text_projection.weight"] = np.ones((32, 32), dtype=np.float32)
    from safetensors.numpy import save_file

    save_file(weights, str(root / "text_encoder_2" / "model.safetensors"))
    with pytest.raises(ModelLayoutError, match="cross_attention_dim 48 is not text_encoder's hidden_size 32 \\+ "
                                               "text_encoder_2's 32"):
        Pipeline.from_pretrained(root, device="cpu")


def test_flux_class_does_not_load_sdxl():
    with pytest.raises(ModelLayoutError, match="holds a StableDiffusionXLPipeline, not a FluxPipeline"):
        fastdm.models.pipelines.FluxPipeline.from_pretrained(TINY, device="cpu")


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", json.loads(META["low_precision"])["bf16"])
def test_bf16_on_gpu_matches_diffusers_bf16(io, case):
    """bf16 on the GPU against diffusers' bf16 CPU run of the same folder and seed, and against the fp32 result.

    Unlike FLUX, little of SDXL's bf16 drift is shared rounding of inputs: the bf16 noise alone moves the latents
    ~6e-3 from fp32 (test_low_precision_noise_on_the_cpu); diffusers' bf16 arithmetic moves them 0.025-0.034 and
    the images 0.009-0.010. fastdm's bf16 kernels round differently (fp32 accumulation, fused epilogues), so its
    result is a second, independent point at about that distance from fp32. Bounds: from fp32, 1.8x / 2.5x
    diffusers' own drift (latents 0.06, images 0.025); from diffusers-bf16, about the sum of both drifts (0.08 /
    0.03). A CFG-half mix-up or a wrong sampler moves the images 0.07-0.2."""
    p = Pipeline.from_pretrained(TINY)  # the defaults: the GPU, bfloat16
    assert p.device.type == "cuda" and p.dtype == dtypes.bfloat16 and p.vae.dtype == dtypes.bfloat16
    p.noise_kernel = NOISE_KERNEL
    images, steps, calls = _run(p, case, output_type="np")
    final = steps[-1]
    assert np.all(np.isfinite(final)) and np.all(np.isfinite(images))
    assert all(c["batch"] == 2 * final.shape[0] for c in calls)  # one UNet call per step, CFG batched
    err_lat = rel_l2(final, io[f"{case}.bf16.latents"])
    err_img = rel_l2(images, io[f"{case}.bf16.images"])
    err_lat32 = rel_l2(final, io[f"{case}.latents"])
    err_img32 = rel_l2(images, io[f"{case}.images"])
    assert err_lat < 0.08, f"latents vs diffusers bf16: rel_l2 {err_lat:.3e}"
    assert err_img < 0.03, f"images vs diffusers bf16: rel_l2 {err_img:.3e}"
    assert err_lat32 < 0.06, f"latents vs diffusers fp32: rel_l2 {err_lat32:.3e}"
    assert err_img32 < 0.025, f"images vs diffusers fp32: rel_l2 {err_img32:.3e}"
    t = p.timings
    assert t.peak_memory_bytes is not None and t.peak_memory_bytes > 0
    assert len(t.step_s) == CASES[case]["num_inference_steps"] and t.total_s > 0
    pils = p(**CASES[case])
    assert len(pils) == len(images) and pils[0].size == (CASES[case]["width"], CASES[case]["height"])


@pytest.mark.gpu
def test_fp16_on_gpu_decodes_in_bf16(io):
    """A float16 pipeline on the GPU: encoders and UNet in fp16, the VAE in bf16 (never fp16). diffusers' fp16 run
    (VAE upcast to fp32) lands 2.8e-3 (latents) / 8.8e-4 (images) from fp32. Bounds: latents 0.015 (5x that drift:
    fp16 kernels that round differently), images 0.02 (adds the bf16 VAE, whose rounding is 8x coarser than fp16's;
    diffusers' whole bf16 pipeline moves the images 0.009)."""
    case = json.loads(META["low_precision"])["fp16"][0]
    p = Pipeline.from_pretrained(TINY, dtype="float16")
    assert p.dtype == dtypes.float16 and p.vae.dtype == dtypes.bfloat16
    p.noise_kernel = NOISE_KERNEL
    images, steps, _ = _run(p, case, output_type="np")
    assert np.all(np.isfinite(steps[-1])) and np.all(np.isfinite(images))
    err_lat = rel_l2(steps[-1], io[f"{case}.fp16.latents"])
    err_img = rel_l2(images, io[f"{case}.fp16.images"])
    assert err_lat < 0.015, f"latents vs diffusers fp16: rel_l2 {err_lat:.3e}"
    assert err_img < 0.02, f"images vs diffusers fp16: rel_l2 {err_img:.3e}"
