"""SDXL text-to-image (SDXL base 1.0 and fine-tunes in its layout), computing what diffusers'
StableDiffusionXLPipeline computes.

prompt -> both CLIP encoders (CLIP-L on `prompt`, OpenCLIP-bigG on `prompt_2 or prompt`): the penultimate layer's
states of each, side by side [B, 77, 768 + 1280], and bigG's pooled, projected output [B, 1280]. With classifier-free
guidance (guidance_scale > 1) the negative prompt is encoded the same way, or is all zeros when no negative prompt is
given and the folder's model_index.json sets force_zeros_for_empty_prompt (SDXL base does), and the unconditional
rows come first in ONE UNet batch of 2B. The micro-conditioning add_time_ids are (original_size, crop top-left,
target_size) = ((H, W), (0, 0), (H, W)) by default -> the torch-exact CPU noise [B, 4, H/8, W/8] of `seed` times the
scheduler's init_noise_sigma -> per step: the latents scaled for the UNet (c_in), the UNet's noise prediction,
guidance uncond + g (cond - uncond), the scheduler's step -> latents / scaling_factor decoded by the VAE -> images.

The scheduler is the folder's scheduler_config.json (EulerDiscreteScheduler for SDXL base) or one chosen by name
(`scheduler="dpmpp_2m_karras"`), configured from that file as diffusers' `OtherScheduler.from_config` would be.
The VAE never runs in float16 (SDXL's VAE overflows there; diffusers upcasts it, `force_upcast`): a float16
pipeline decodes in bfloat16 on a GPU and in float32 on the CPU. diffusers' invisible watermark (applied only where
the `invisible-watermark` package is installed) is not added.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...runtime import dtypes, ops
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError, ModelLayoutError
from ...runtime.tensor import Tensor, zeros
from ..denoisers.unet2d import UNet2DCondition
from ..loading import read_config
from ..noise import TorchCPUGenerator
from ..schedulers import (
    SCHEDULERS,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    load_config,
    scheduler_by_name,
)
from ..text_encoders.clip import CLIPTextModel, CLIPTextModelWithProjection
from ..text_encoders.tokenizers import TextTokenizer, load_clip_tokenizer
from ..vae import AutoencoderKL, AutoencoderKLConfig
from . import Pipeline, check_image_size, component_folder
from .flux import torch_noise_kernel

logger = logging.getLogger("fastdm")

OUTPUT_TYPES = ("pil", "np", "latent")
SCHEDULER_NAMES = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")  # the samplers of DDPM-trained models
DDPM_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
COMPONENT_CLASSES = {
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}
N_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)
DEFAULT_SAMPLE_SIZE = 128  # latent pixels when the UNet config has no sample_size (diffusers' fallback)
Sampler = EulerDiscreteScheduler | EulerAncestralDiscreteScheduler | DPMSolverMultistepScheduler
StepCallback = Callable[[int, float, Tensor], None]


# ------------------------------------------------------------------------------------------ argument checks
def check_size(height: Any, width: Any, multiple: int) -> None:
    """height and width: integers, multiples of the VAE's spatial factor (8); the message names the nearest."""
    check_image_size(height, width, multiple, "SDXL", f"the VAE's latents are 1/{multiple} of the image")


def check_scheduler_name(name: Any) -> str:
    if not isinstance(name, str) or name not in SCHEDULER_NAMES:
        raise InvalidArgumentError(f"unknown scheduler {name!r} for SDXL; use one of {', '.join(SCHEDULER_NAMES)} "
                                   "(or leave it out for the model's own)")
    return name


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _prompt_list(prompt: Any, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def _per_prompt(value: Any, b: int, name: str) -> list[str]:
    """A string for every prompt, or a list with one per prompt (a list of one is used for all)."""
    values = _prompt_list(value, name)
    if len(values) == 1:
        return values * b
    if len(values) != b:
        raise InvalidArgumentError(f"{name} has {len(values)} prompts for {b} prompts; give one per prompt, a single "
                                   "one for all, or none")
    return values


def _pair(value: Any, name: str) -> tuple[int, int]:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise InvalidArgumentError(f"{name} must be a pair of integers (height, width) / (top, left), got {value!r}")


def add_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int], target_size: Sequence[int],
                 rows: int, dtype: DType) -> np.ndarray:
    """SDXL's micro-conditioning [rows, 6] float32: (original h, w, crop top, left, target h, w), rounded to the
    compute dtype as diffusers makes them (`torch.tensor(..., dtype=prompt_embeds.dtype)`)."""
    ids = np.array([*original_size, *crops_coords_top_left, *target_size], dtype=np.float32)
    ids = ids.astype(dtype.np).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(ids, (rows, N_TIME_IDS)))


def vae_dtype_for(dtype: DType, device: Any) -> DType:
    """The VAE's compute dtype: the pipeline's, except float16 (SDXL's VAE overflows there): bfloat16 on a GPU,
    float32 on the CPU."""
    if dtype != dtypes.float16:
        return dtype
    return dtypes.bfloat16 if device.type == "cuda" else dtypes.float32


def _unet_sample_size(unet_folder: Path) -> int:
    """The UNet config's sample_size (latent pixels of the default image: 128 for SDXL base)."""
    try:
        raw = json.loads((unet_folder / "config.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return DEFAULT_SAMPLE_SIZE  # the UNet loader reports a bad config itself
    size = raw.get("sample_size", DEFAULT_SAMPLE_SIZE)
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return int(size) if isinstance(size, (int, float)) and size >= 1 else DEFAULT_SAMPLE_SIZE


def _scheduler_config(folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
    """The folder's scheduler_config.json (listed in model_index.json)."""
    raw = load_config(component_folder(folder, index, "scheduler"))
    if not isinstance(raw, dict):
        raise ModelLayoutError(f"{folder}/scheduler/scheduler_config.json is not a JSON object; re-download it")
    return raw


def default_scheduler(config: Mapping[str, Any]) -> tuple[Sampler | None, str | None]:
    """(the sampler the model's scheduler config names, None) or, where fastdm has no such sampler or does not
    implement the config's options, (None, why)."""
    name = config.get("_class_name")
    if name not in DDPM_SCHEDULERS:
        return None, f"the model's scheduler {name!r} has no fastdm sampler"
    try:
        return SCHEDULERS[name](config), None
    except (ModelLayoutError, InvalidArgumentError) as e:
        return None, f"the model's scheduler_config.json is not supported ({e})"


def _no_default_scheduler(why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{why}; pick a sampler by name (scheduler= / --scheduler: "
                                f"{', '.join(SCHEDULER_NAMES)}), configured from the model's scheduler_config.json")


# ------------------------------------------------------------------------------------------------ pipeline
class StableDiffusionXLPipeline(Pipeline):
    """SDXL text-to-image. Load with `StableDiffusionXLPipeline.from_pretrained(folder)` (or
    `fastdm.Pipeline.from_pretrained`), then call it with a prompt. After each call `timings` holds the seconds of
    each stage and the GPU's peak memory."""

    CLASS_NAMES = ("StableDiffusionXLPipeline",)

    def __init__(self, *, scheduler_config: Mapping[str, Any], tokenizer: TextTokenizer, tokenizer_2: TextTokenizer,
                 text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, unet: UNet2DCondition,
                 vae: AutoencoderKL, device: Any, dtype: DType, force_zeros_for_empty_prompt: bool = True,
                 default_sample_size: int = DEFAULT_SAMPLE_SIZE, folder: Path | None = None):
        """Components already loaded on `device`: encoders and UNet in `dtype`, the VAE in `vae_dtype_for(dtype)`.
        scheduler_config: the model's scheduler_config.json (its `_class_name` is the default sampler)."""
        super().__init__(device, dtype)
        self.scheduler_config = dict(scheduler_config)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.unet = unet
        self.vae = vae
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.default_sample_size = default_sample_size
        self.folder = folder
        self.noise_kernel = torch_noise_kernel()
        self.vae_scale_factor = vae.config.spatial_factor  # 8
        self.last_seed: int | None = None
        self._check_components()
        # the sampler a call without scheduler= uses (replaceable, as in diffusers); None when fastdm has no sampler
        # for the model's config, and a call must then name one
        self.scheduler: Sampler | None
        self.scheduler, self._no_scheduler_why = default_scheduler(self.scheduler_config)

    def _check_components(self) -> None:
        """The encoders, UNet and VAE fit together (what diffusers checks in _get_add_time_ids, and more)."""
        u, c1, c2 = self.unet.config, self.text_encoder.config, self.text_encoder_2.config
        problems = []
        if u.cross_attention_dim != c1.hidden_size + c2.hidden_size:
            problems.append(f"the UNet's cross_attention_dim {u.cross_attention_dim} is not text_encoder's "
                            f"hidden_size {c1.hidden_size} + text_encoder_2's {c2.hidden_size}")
        if u.addition_embed_type != "text_time":
            problems.append(f"the UNet's addition_embed_type is {u.addition_embed_type!r}, not SDXL's 'text_time'")
        elif u.projection_class_embeddings_input_dim != N_TIME_IDS * u.addition_time_embed_dim + c2.projection_dim:
            problems.append(f"the UNet's add_embedding takes {u.projection_class_embeddings_input_dim} values, not "
                            f"{N_TIME_IDS} x {u.addition_time_embed_dim} time ids + text_encoder_2's "
                            f"projection_dim {c2.projection_dim}")
        if u.in_channels != self.vae.config.latent_channels:
            problems.append(f"the UNet takes {u.in_channels} latent channels, the VAE makes "
                            f"{self.vae.config.latent_channels}")
        if problems:
            raise ModelLayoutError("the SDXL components do not fit together: " + "; ".join(problems) +
                                   ". The folder mixes parts of different models")

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def _load(cls, folder: Path, index: dict[str, Any], device: Any, dtype: DType) -> StableDiffusionXLPipeline:
        parts = {name: component_folder(folder, index, name, classes) for name, classes in COMPONENT_CLASSES.items()}
        return cls(scheduler_config=_scheduler_config(folder, index),
                   tokenizer=load_clip_tokenizer(parts["tokenizer"]),
                   tokenizer_2=load_clip_tokenizer(parts["tokenizer_2"]),
                   text_encoder=CLIPTextModel.from_pretrained(parts["text_encoder"], device=device, dtype=dtype),
                   text_encoder_2=CLIPTextModelWithProjection.from_pretrained(parts["text_encoder_2"], device=device,
                                                                              dtype=dtype),
                   unet=UNet2DCondition.from_pretrained(parts["unet"], device=device, dtype=dtype),
                   vae=AutoencoderKL.from_pretrained(parts["vae"], device=device, dtype=vae_dtype_for(dtype, device)),
                   device=device, dtype=dtype,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   default_sample_size=_unet_sample_size(parts["unet"]), folder=folder)

    @classmethod
    def _check_call(cls, folder: Path, index: dict[str, Any], height: int | None = None, width: int | None = None,
                    num_inference_steps: int = 30, num_images_per_prompt: int = 1, scheduler: str | None = None,
                    **_: Any) -> None:
        vae = read_config(AutoencoderKLConfig, component_folder(folder, index, "vae", COMPONENT_CLASSES["vae"]))
        default = _unet_sample_size(component_folder(folder, index, "unet")) * vae.spatial_factor
        check_size(default if height is None else height, default if width is None else width, vae.spatial_factor)
        _positive_int(num_inference_steps, "num_inference_steps")
        _positive_int(num_images_per_prompt, "num_images_per_prompt")
        if scheduler is not None:
            check_scheduler_name(scheduler)
        else:
            _, why = default_scheduler(_scheduler_config(folder, index))
            if why is not None:
                raise _no_default_scheduler(why)

    # --------------------------------------------------------------------------------------------- encoding
    def _warn_truncated(self, tok: TextTokenizer, prompts: list[str], what: str) -> None:
        for p in prompts:
            n = tok.num_tokens(p)
            if n > tok.max_length:
                logger.warning("%s keeps the first %d of the prompt's %d tokens: %.60r...", what, tok.max_length, n,
                               p)

    def encode_prompt(self, prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None,
                      negative_prompt: str | Sequence[str] | None = None,
                      negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True) -> tuple[Tensor, Tensor]:
        """The UNet's text inputs: (encoder_hidden_states [R, 77, D1 + D2], pooled text_embeds [R, P]) on the
        device in the pipeline's dtype. Without guidance R = B*N: each prompt's rows repeated N =
        num_images_per_prompt times in a row; with guidance R = 2*B*N, the unconditional rows first (zeros when
        `negative_prompt` is None and the model sets force_zeros_for_empty_prompt), as diffusers batches them."""
        prompts = _prompt_list(prompt, "prompt")
        b = len(prompts)
        # diffusers' `prompt_2 or prompt`: an empty prompt_2 also falls back to the prompt
        prompts_2 = _per_prompt(prompt_2, b, "prompt_2") if prompt_2 else prompts
        n = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        texts, texts_2 = list(prompts), list(prompts_2)
        zero_negative = do_classifier_free_guidance and negative_prompt is None and self.force_zeros_for_empty_prompt
        if do_classifier_free_guidance and not zero_negative:
            negative = _per_prompt(negative_prompt or "", b, "negative_prompt")
            negative_2 = _per_prompt(negative_prompt_2, b, "negative_prompt_2") if negative_prompt_2 else negative
            texts += negative
            texts_2 += negative_2

        ids, _ = self.tokenizer(texts)  # [R0, 77]: the prompts, then the negative prompts
        ids_2, _ = self.tokenizer_2(texts_2)
        self._warn_truncated(self.tokenizer, prompts, "CLIP (text_encoder)")
        self._warn_truncated(self.tokenizer_2, prompts_2, "CLIP (text_encoder_2)")
        out = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        states = ops.concat([out.hidden_states[-2], out_2.hidden_states[-2]], axis=2)  # [R0, 77, D1 + D2]
        pooled = out_2.text_embeds  # [R0, P]
        r0, s, d = states.shape

        rows = np.repeat(np.arange(b, dtype=np.int64), n)  # [p0, p0, p1, p1, ...]
        if not do_classifier_free_guidance:
            index = rows
        elif zero_negative:  # one zero row, gathered for every unconditional row
            states = ops.concat([states, zeros((1, s, d), states.dtype, self.device)], axis=0)
            pooled = ops.concat([pooled, zeros((1, pooled.shape[1]), pooled.dtype, self.device)], axis=0)
            index = np.concatenate([np.full(b * n, r0, dtype=np.int64), rows])
            r0 += 1
        else:
            index = np.concatenate([rows + b, rows])
        if np.array_equal(index, np.arange(r0)):
            return states, pooled
        gather = Tensor.from_numpy(index, device=self.device)
        states = ops.embedding(gather, states.view(r0, s * d)).view(len(index), s, d)
        return states, ops.embedding(gather, pooled)

    # --------------------------------------------------------------------------------------------- sampling
    def get_scheduler(self, scheduler: str | None = None) -> Sampler:
        """The sampler of a call: `self.scheduler` (None), or a new one of the named kind configured from the
        model's scheduler_config.json."""
        if scheduler is not None:
            return scheduler_by_name(check_scheduler_name(scheduler), self.scheduler_config)
        if self.scheduler is None:
            raise _no_default_scheduler(self._no_scheduler_why or "this pipeline has no scheduler")
        return self.scheduler

    def prepare_latents(self, batch: int, height: int, width: int, generator: TorchCPUGenerator,
                        init_noise_sigma: float) -> Tensor:
        """`torch.randn([B, C, H/8, W/8], generator=generator, dtype=dtype) * init_noise_sigma` on the device, as
        diffusers draws the initial latents."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        noise = generator.randn((batch, self.unet.config.in_channels, h, w), dtype=self.dtype)
        latents = Tensor.from_numpy(noise, device=self.device)
        return latents if init_noise_sigma == 1.0 else ops.mul(latents, init_noise_sigma)

    def __call__(self, prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None,
                 negative_prompt: str | Sequence[str] | None = None,
                 negative_prompt_2: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 seed: int | None = 0, num_images_per_prompt: int = 1, scheduler: str | None = None,
                 output_type: str = "pil", original_size: Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                 callback: StepCallback | None = None) -> list[Image.Image] | np.ndarray:
        """Generate images for `prompt` (a string or a list: one batch).

        prompt_2 / negative_prompt_2: for the second encoder (default: prompt / negative_prompt). height, width:
        multiples of 8 (default: the UNet's sample_size x 8, 1024 for SDXL base). guidance_scale <= 1 turns
        classifier-free guidance off (one UNet batch, negative prompts unused). seed: the
        `torch.Generator("cpu").manual_seed(seed)` a diffusers user would pass (None: a random one, kept in
        `last_seed`). scheduler: None (the model's), "euler", "euler_a", "dpmpp_2m" or "dpmpp_2m_karras".
        original_size / crops_coords_top_left / target_size: SDXL's micro-conditioning, (height, width), (0, 0),
        (height, width) by default. callback(step, timestep, latents) runs after every step.

        Returns B*N PIL images ("pil"), float images [B*N, H, W, 3] in [0, 1] ("np"), or the latents
        [B*N, 4, H/8, W/8] before decoding ("latent")."""
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        default = self.default_sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        check_size(height, width, self.vae_scale_factor)
        steps = _positive_int(num_inference_steps, "num_inference_steps")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
            raise InvalidArgumentError(f"guidance_scale must be a number, got {guidance_scale!r}")
        time_ids = (_pair((height, width) if original_size is None else original_size, "original_size"),
                    _pair(crops_coords_top_left, "crops_coords_top_left"),
                    _pair((height, width) if target_size is None else target_size, "target_size"))
        sched = self.get_scheduler(scheduler)
        clock = self._begin_call(seed)
        t, watch = self.timings, clock.step
        cfg = float(guidance_scale) > 1.0  # diffusers' do_classifier_free_guidance

        embeds, pooled = self.encode_prompt(prompt, prompt_2, negative_prompt, negative_prompt_2,
                                            num_images_per_prompt, cfg)  # [R, 77, D], [R, P]
        t.encode_s = watch.lap()

        rows = embeds.shape[0]
        batch = rows // 2 if cfg else rows
        ids = add_time_ids(*time_ids, rows=rows, dtype=self.dtype)  # [R, 6]
        sched.set_timesteps(steps)
        generator = TorchCPUGenerator(self.last_seed, kernel=self.noise_kernel)
        latents = self.prepare_latents(batch, height, width, generator, sched.init_noise_sigma)  # [B, 4, h, w]

        for i, step_t in enumerate(sched.timesteps):
            c_in = sched.model_input_scale(i)
            x = latents if c_in == 1.0 else ops.mul(latents, c_in)
            if cfg:
                x = ops.concat([x, x], axis=0)  # [2B, 4, h, w]: unconditional, then conditional
            eps = self.unet(x, np.float32(step_t), embeds, pooled, ids)  # [R, 4, h, w]
            if cfg:
                uncond, cond = eps.narrow(0, 0, batch), eps.narrow(0, batch, batch)
                eps = ops.add(uncond, ops.add(cond, uncond, alpha=-1.0), alpha=float(guidance_scale))
            if isinstance(sched, EulerAncestralDiscreteScheduler):
                latents = sched.step_ops(latents, eps, i, generator=generator)  # noise from the same generator
            else:
                latents = sched.step_ops(latents, eps, i)
            t.step_s.append(watch.lap())
            if callback is not None:
                callback(i, float(step_t), latents)
        return self._finish_call(clock, latents, lambda z: self.vae.decode(self.vae.unscale(z)), output_type)

    def __repr__(self) -> str:
        u = self.unet.config
        return (f"StableDiffusionXLPipeline({self.folder}, {self.device}, {self.dtype.name}, UNet channels "
                f"{list(u.block_out_channels)}, scheduler {self.scheduler_config.get('_class_name')})")

