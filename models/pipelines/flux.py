"""FLUX.1 text-to-image (dev, schnell, Krea), computing what diffusers' FluxPipeline computes.

prompt -> CLIP-L pooled output [B, 768] (from `prompt`) and T5 embeddings [B, L, 4096] (from `prompt_2 or prompt`,
padded to L = max_sequence_length) -> the torch-exact CPU noise [B, 16, H/8, W/8] of `seed`, packed into 2x2
patches [B, H/16 * W/16, 64] -> `num_inference_steps` Euler steps of the FLUX transformer's velocity on the
FlowMatchEuler schedule (sigmas linspace(1, 1/steps, steps), shifted by resolution) -> unpacked, unscaled and decoded
by the VAE -> images.

Where diffusers rounds to the compute dtype, so does this pipeline: the noise is drawn in that dtype, the timestep
and guidance the transformer embeds are rounded as diffusers rounds them (see `embedded_scale`), and the Euler step
uses dt rounded to the latents' dtype. In float32 on the CPU the result equals diffusers' float32 CPU run to float32
rounding.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...runtime import dtypes, ops
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError
from ...runtime.tensor import Tensor
from ..denoisers.flux import FluxTransformer
from ..loading import read_config
from ..noise import TorchCPUGenerator
from ..schedulers import FlowMatchEulerScheduler, flux_timesteps, scheduler_from_config
from ..text_encoders.clip import CLIPTextModel
from ..text_encoders.t5 import T5EncoderModel
from ..text_encoders.tokenizers import TextTokenizer, load_clip_tokenizer, load_t5_tokenizer
from ..vae import AutoencoderKL, AutoencoderKLConfig
from . import Pipeline, check_image_size, component_folder

logger = logging.getLogger("fastdm")

PATCH = 2  # FLUX packs 2x2 latent pixels into one token
MAX_SEQUENCE_LENGTH = 512  # what FLUX was trained with; diffusers refuses more
DEFAULT_SEQUENCE_LENGTH = {True: 512, False: 256}  # guidance-distilled (dev, Krea) : 512, schnell: 256
OUTPUT_TYPES = ("pil", "np", "latent")
COMPONENT_CLASSES = {
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("T5EncoderModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("T5Tokenizer", "T5TokenizerFast"),
    "transformer": ("FluxTransformer2DModel",),
    "vae": ("AutoencoderKL",),
}
StepCallback = Callable[[int, float, Tensor], None]


# ------------------------------------------------------------------------------------------ host-side maths
def torch_noise_kernel() -> str:
    """The Box-Muller kernel torch's CPU generator uses on this host: AVX2 on x86-64, the scalar one elsewhere."""
    return "avx2" if platform.machine().lower() in ("x86_64", "amd64") else "default"


def pack_latents(x: np.ndarray) -> np.ndarray:
    """[B, C, h, w] -> [B, h/2 * w/2, C * 4]: each 2x2 patch becomes one token (diffusers' _pack_latents)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH))


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """[B, h/2 * w/2, C * 4] -> [B, C, h, w], the inverse of pack_latents (diffusers' _unpack_latents)."""
    b, _, ch = x.shape
    c = ch // (PATCH * PATCH)
    x = x.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH)
    return ops.permute(x, (0, 3, 1, 4, 2, 5)).view(b, c, h, w)


def latent_image_ids(h: int, w: int) -> np.ndarray:
    """[h/2 * w/2, 3] float32 position ids (0, row, column) of the packed tokens (_prepare_latent_image_ids)."""
    ids = np.zeros((h // PATCH, w // PATCH, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h // PATCH, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // PATCH, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def _round(x: np.ndarray, dt: DType) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(dt.np).astype(np.float32)


def embedded_scale(x: np.ndarray, dtype: DType) -> np.ndarray:
    """What to pass as the transformer's `timestep` / `guidance` so that its embedding sees what diffusers' sees.

    diffusers' FluxTransformer2DModel computes `x.to(dtype) * 1000` in the compute dtype (in bf16: both the cast and
    the product round to bf16), while fastdm's transformer computes `1000 * x` in float32. Returns float32 values v
    with float32(1000 v) equal to diffusers' rounded product; in float32 that is x itself."""
    x = np.asarray(x, dtype=np.float32)
    thousand = np.float32(1000)
    target = _round(_round(x, dtype) * thousand, dtype)  # diffusers' embedded value
    v = (target / thousand).astype(np.float32)
    for _ in range(4):  # 1000 v is within an ulp or two of target: nudge v until it lands exactly
        low, high = v * thousand < target, v * thousand > target
        if not (low.any() or high.any()):
            break
        v = np.where(low, np.nextafter(v, np.float32(np.inf)), np.where(high, np.nextafter(v, np.float32(-np.inf)), v))
    return v.astype(np.float32)


def model_timestep(t: float, batch: int, dtype: DType) -> np.ndarray:
    """[B] transformer timestep for schedule timestep t in [0, 1000]: diffusers casts t to the latents' dtype and
    divides by 1000 there, then the transformer multiplies by 1000 (see embedded_scale)."""
    sigma = _round(_round(np.float32(t), dtype) / np.float32(1000), dtype)
    return np.full(batch, embedded_scale(sigma, dtype), dtype=np.float32)


def check_size(height: Any, width: Any, multiple: int) -> None:
    check_image_size(height, width, multiple, "FLUX", "FLUX packs 2x2 patches of the VAE's latents")


def check_sequence_length(length: Any) -> int:
    length = _positive_int(length, "max_sequence_length")
    if not 2 <= length <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgumentError(f"max_sequence_length must be between 2 and {MAX_SEQUENCE_LENGTH} (FLUX's T5 "
                                   f"context), got {length}")
    return length


def _prompt_list(prompt: Any, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------ pipeline
class FluxPipeline(Pipeline):
    """FLUX.1 text-to-image. Load with `FluxPipeline.from_pretrained(folder)` (or `fastdm.Pipeline.from_pretrained`),
    then call it with a prompt. After each call `timings` holds the seconds of each stage and the GPU's peak
    memory."""

    CLASS_NAMES = ("FluxPipeline",)

    def __init__(self, *, scheduler: FlowMatchEulerScheduler, tokenizer: TextTokenizer, tokenizer_2: TextTokenizer,
                 text_encoder: CLIPTextModel | None, text_encoder_2: T5EncoderModel | None,
                 transformer: FluxTransformer, vae: AutoencoderKL, device: Any, dtype: DType,
                 folder: Path | None = None, free_text_encoders: bool = False):
        """Components already loaded on `device` in `dtype` (T5 in bfloat16 when dtype is float16). With
        `free_text_encoders` the text encoders are dropped after encoding and reloaded from `folder` when needed."""
        super().__init__(device, dtype)
        self.scheduler = scheduler
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.transformer = transformer
        self.vae = vae
        self.folder = folder
        self.free_text_encoders = free_text_encoders
        if free_text_encoders and folder is None:
            raise InvalidArgumentError("free_text_encoders needs the model folder to reload the encoders from")
        self.noise_kernel = torch_noise_kernel()
        self.vae_scale_factor = vae.config.spatial_factor  # 8
        self.last_seed: int | None = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def _load(cls, folder: Path, index: dict[str, Any], device: Any, dtype: DType,
              free_text_encoders: bool = False, transformer: str | Path | None = None) -> FluxPipeline:
        """`transformer` replaces the folder's transformer/ with another folder or a single-file checkpoint
        (flux1-dev.safetensors in the original BFL layout, a ComfyUI file, or diffusers names)."""
        parts = {name: component_folder(folder, index, name, classes) for name, classes in COMPONENT_CLASSES.items()
                 if not (name == "transformer" and transformer is not None)}
        transformer = FluxTransformer.from_pretrained(transformer if transformer is not None else parts["transformer"],
                                                      device=device, dtype=dtype)
        pipe = cls(scheduler=scheduler_from_config(parts["scheduler"]),
                   tokenizer=load_clip_tokenizer(parts["tokenizer"]),
                   tokenizer_2=load_t5_tokenizer(parts["tokenizer_2"]),
                   text_encoder=None, text_encoder_2=None, transformer=transformer,
                   vae=AutoencoderKL.from_pretrained(parts["vae"], device=device, dtype=dtype),
                   device=device, dtype=dtype, folder=folder, free_text_encoders=free_text_encoders)
        if not free_text_encoders:
            pipe._text_encoders()
        return pipe

    @classmethod
    def _check_call(cls, folder: Path, index: dict[str, Any], height: int = 1024, width: int = 1024,
                    num_inference_steps: int = 28, num_images_per_prompt: int = 1,
                    max_sequence_length: int | None = None, **_: Any) -> None:
        vae = read_config(AutoencoderKLConfig, component_folder(folder, index, "vae", COMPONENT_CLASSES["vae"]))
        check_size(height, width, vae.spatial_factor * PATCH)
        _positive_int(num_inference_steps, "num_inference_steps")
        _positive_int(num_images_per_prompt, "num_images_per_prompt")
        if max_sequence_length is not None:
            check_sequence_length(max_sequence_length)

    def _text_encoders(self) -> tuple[CLIPTextModel, T5EncoderModel]:
        """The CLIP and T5 encoders, loaded from the folder if they were freed (or never loaded)."""
        if self.text_encoder is None:
            self.text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", device=self.device,
                                                              dtype=self.dtype)
        if self.text_encoder_2 is None:
            t5_dtype = dtypes.bfloat16 if self.dtype == dtypes.float16 else self.dtype  # T5 overflows fp16
            self.text_encoder_2 = T5EncoderModel.from_pretrained(self.folder / "text_encoder_2", device=self.device,
                                                                 dtype=t5_dtype)
        return self.text_encoder, self.text_encoder_2

    @property
    def default_max_sequence_length(self) -> int:
        """T5 tokens per prompt when the call does not say: 512 for guidance-distilled checkpoints (FLUX.1-dev,
        Krea), 256 for FLUX.1-schnell (no guidance embedder), as their model cards use."""
        return DEFAULT_SEQUENCE_LENGTH[bool(self.transformer.config.guidance_embeds)]

    # --------------------------------------------------------------------------------------------- encoding
    def _warn_truncated(self, tok: TextTokenizer, prompts: list[str], length: int, what: str) -> None:
        for p in prompts:
            n = tok.num_tokens(p)
            if n > length:
                logger.warning("%s keeps the first %d of the prompt's %d tokens: %.60r...", what, length, n, p)

    def encode_prompt(self, prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None,
                      num_images_per_prompt: int = 1, max_sequence_length: int | None = None) -> tuple[Tensor, Tensor]:
        """(prompt_embeds [B*N, L, joint_dim] from T5 on `prompt_2 or prompt`, pooled [B*N, pooled_dim] from CLIP on
        `prompt`), on the pipeline's device in its dtype; each prompt's rows repeated N = num_images_per_prompt
        times in a row, as diffusers orders them."""
        prompts = _prompt_list(prompt, "prompt")
        prompts_2 = prompts if prompt_2 is None else _prompt_list(prompt_2, "prompt_2")
        if len(prompts_2) == 1 and len(prompts) > 1:
            prompts_2 = prompts_2 * len(prompts)
        if len(prompts_2) != len(prompts):
            raise InvalidArgumentError(f"prompt_2 has {len(prompts_2)} prompts for {len(prompts)} prompts; give one "
                                       "per prompt, a single one for all, or none")
        n = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        length = self._sequence_length(max_sequence_length)
        clip, t5 = self._text_encoders()

        ids, _ = self.tokenizer(prompts)  # [B, 77]
        self._warn_truncated(self.tokenizer, prompts, ids.shape[1], "CLIP")
        pooled = clip(ids).pooler_output  # [B, pooled_dim]
        ids_2, _ = self.tokenizer_2(prompts_2, max_length=length)  # [B, L]
        self._warn_truncated(self.tokenizer_2, prompts_2, length, "T5")
        embeds = t5(ids_2)  # [B, L, joint_dim]
        if embeds.dtype != self.dtype:
            embeds = ops.cast(embeds, self.dtype)
        if self.free_text_encoders:
            self.text_encoder = self.text_encoder_2 = None

        if n > 1:  # [p0, p0, p1, p1, ...]: a row gather, one op per tensor
            b, s, d = embeds.shape
            rows = Tensor.from_numpy(np.repeat(np.arange(b, dtype=np.int64), n), device=self.device)
            pooled = ops.embedding(rows, pooled)
            embeds = ops.embedding(rows, embeds.view(b, s * d)).view(b * n, s, d)
        return embeds, pooled

    def _sequence_length(self, max_sequence_length: int | None) -> int:
        if max_sequence_length is None:
            return self.default_max_sequence_length
        return check_sequence_length(max_sequence_length)

    # --------------------------------------------------------------------------------------------- sampling
    def prepare_latents(self, batch: int, height: int, width: int, seed: int) -> Tensor:
        """Packed noise [B, h/2 * w/2, 64] on the device: `torch.randn([B, 16, h, w], generator=
        torch.Generator("cpu").manual_seed(seed), dtype=dtype)` packed, as diffusers draws it."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = self.transformer.config.in_channels // (PATCH * PATCH)
        noise = TorchCPUGenerator(seed, kernel=self.noise_kernel).randn((batch, channels, h, w), dtype=self.dtype)
        return Tensor.from_numpy(pack_latents(noise), device=self.device)

    def __call__(self, prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None,
                 height: int = 1024, width: int = 1024, num_inference_steps: int = 28, guidance_scale: float = 3.5,
                 seed: int | None = 0, num_images_per_prompt: int = 1, max_sequence_length: int | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None) -> list[Image.Image] | np.ndarray:
        """Generate images for `prompt` (a string or a list: one batch).

        height, width: multiples of 16. guidance_scale: the embedded guidance of FLUX.1-dev (ignored by schnell,
        which has no guidance embedder). seed: the `torch.Generator("cpu").manual_seed(seed)` a diffusers user would
        pass (None: a random one, kept in `last_seed`). max_sequence_length: T5 tokens (None: 512 for dev, 256 for
        schnell). callback(step, timestep, latents) runs after every step.

        Returns B*N PIL images ("pil"), float images [B*N, H, W, 3] in [0, 1] ("np"), or the packed latents
        [B*N, H/16 * W/16, 64] before decoding ("latent")."""
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        multiple = self.vae_scale_factor * PATCH
        check_size(height, width, multiple)
        steps = _positive_int(num_inference_steps, "num_inference_steps")
        clock = self._begin_call(seed)
        t, watch = self.timings, clock.step

        embeds, pooled = self.encode_prompt(prompt, prompt_2, num_images_per_prompt, max_sequence_length)
        t.encode_s = watch.lap()

        batch = embeds.shape[0]
        latents = self.prepare_latents(batch, height, width, self.last_seed)  # [B, S_img, 64]
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        img_ids = latent_image_ids(h, w)
        txt_ids = np.zeros((embeds.shape[1], 3), dtype=np.float32)
        flux_timesteps(self.scheduler, steps, image_seq_len=latents.shape[1])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = np.full(batch, embedded_scale(np.float32(guidance_scale), self.dtype), dtype=np.float32)

        for i, step_t in enumerate(self.scheduler.timesteps):
            v = self.transformer(latents, embeds, pooled, model_timestep(step_t, batch, self.dtype), img_ids, txt_ids,
                                 guidance)  # [B, S_img, 64]
            latents = ops.add(latents, v, alpha=self.scheduler.step_coefficient(i, self.dtype))
            t.step_s.append(watch.lap())
            if callback is not None:
                callback(i, float(step_t), latents)

        return self._finish_call(clock, latents, lambda z: self.vae.decode(self.vae.unscale(unpack_latents(z, h, w))),
                                 output_type)

    def __repr__(self) -> str:
        cfg = self.transformer.config
        return (f"FluxPipeline({self.folder}, {self.device}, {self.dtype.name}, {cfg.num_layers}+"
                f"{cfg.num_single_layers} blocks, guidance_embeds={cfg.guidance_embeds})")
