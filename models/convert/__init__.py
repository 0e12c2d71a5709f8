"""Checkpoint layouts other than diffusers' (original / single-file releases), converted to diffusers' names in one
place per model family."""

from .flux_single_file import bfl_to_diffusers, detect_layout, infer_config, load_flux_single_file

__all__ = ["bfl_to_diffusers", "detect_layout", "infer_config", "load_flux_single_file"]
