"""VAEs: the 2-D AutoencoderKL (FLUX.1, SDXL, SD3) and the image conversions around it."""

from .autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from .image import from_pil, to_pil

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "from_pil", "to_pil"]
