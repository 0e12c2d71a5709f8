"""Samplers: host-side schedules (numpy) whose per-step coefficients drive runtime.ops on the device."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...runtime.errors import ModelLayoutError
from .dpmpp_2m import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from .euler_ancestral import EulerAncestralConfig, EulerAncestralDiscreteScheduler
from .euler_discrete import EulerDiscreteConfig, EulerDiscreteScheduler
from .flow_match_euler import (
    FlowMatchEulerConfig,
    FlowMatchEulerScheduler,
    calculate_shift,
    flux_timesteps,
    load_config,
)
from .registry import SCHEDULER_NAMES, scheduler_by_name

# diffusers' _class_name in scheduler_config.json -> the fastdm class that reproduces it
SCHEDULERS: dict[str, type] = {
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}


def scheduler_from_config(
    source: str | Path | Mapping[str, Any],
) -> FlowMatchEulerScheduler | EulerDiscreteScheduler | EulerAncestralDiscreteScheduler | DPMSolverMultistepScheduler:
    """The scheduler a model folder's scheduler_config.json names (the dict, the file, its folder or the model root)."""
    raw = load_config(source)
    name = raw.get("_class_name")
    if name not in SCHEDULERS:
        known = ", ".join(sorted(SCHEDULERS))
        raise ModelLayoutError(f"scheduler {name!r} is not one fastdm implements ({known}); "
                               "pick a supported scheduler in scheduler_config.json")
    return SCHEDULERS[name](raw)


__all__ = ["FlowMatchEulerConfig", "FlowMatchEulerScheduler", "SCHEDULERS", "calculate_shift", "flux_timesteps",
           "load_config", "scheduler_from_config",
           "DPMSolverMultistepConfig", "DPMSolverMultistepScheduler", "EulerAncestralConfig",
           "EulerAncestralDiscreteScheduler", "EulerDiscreteConfig", "EulerDiscreteScheduler", "SCHEDULER_NAMES",
           "scheduler_by_name"]
