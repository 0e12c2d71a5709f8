"""Denoisers: the diffusion transformers and UNets, one model file per family."""

from .flux import FluxTransformer, FluxTransformerConfig
from .unet2d import UNet2DCondition, UNet2DConditionConfig

__all__ = ["FluxTransformer", "FluxTransformerConfig", "UNet2DCondition", "UNet2DConditionConfig"]
