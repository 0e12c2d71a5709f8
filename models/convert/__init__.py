"""Checkpoint layouts other than diffusers' (original / single-file releases), converted to diffusers' names in one
place per model family."""

from .flux_single_file import bfl_to_diffusers, detect_layout, infer_config, load_flux_single_file
from .sdxl_single_file import SDXL_BASE, SDXLConfigs, build_pipeline, ldm_to_diffusers, load_sdxl_single_file

__all__ = ["SDXL_BASE", "SDXLConfigs", "bfl_to_diffusers", "build_pipeline", "detect_layout", "infer_config",
           "ldm_to_diffusers", "load_flux_single_file", "load_sdxl_single_file"]
