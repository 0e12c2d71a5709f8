"""Denoisers: the diffusion transformers and UNets, one model file per family."""

from .flux import FluxTransformer, FluxTransformerConfig

__all__ = ["FluxTransformer", "FluxTransformerConfig"]
