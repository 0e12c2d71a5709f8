"""Samplers by user-facing name ("euler", "dpmpp_2m_karras", ...), configured from a model's scheduler config.

As with diffusers' `OtherScheduler.from_config(pipe.scheduler.config, **overrides)`, the model's config supplies
the training schedule (betas, spacing, prediction type) and the keys the chosen sampler does not know are ignored;
each name then fixes the options that define it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...runtime.errors import InvalidArgumentError
from .dpmpp_2m import DPMSolverMultistepScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .euler_discrete import EulerDiscreteScheduler
from .flow_match_euler import FlowMatchEulerScheduler, load_config

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": False,
             "use_beta_sigmas": False}
# name -> (class, config keys the name forces)
_NAMES: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
    "flow_match_euler": (FlowMatchEulerScheduler, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_NAMES)


def scheduler_by_name(name: str, config: str | Path | Mapping[str, Any] | None = None):
    """A new scheduler of the named kind, configured from `config` (a scheduler_config.json dict, the file, its
    folder or the model root; None: the sampler's own defaults). Names: euler, euler_a, dpmpp_2m,
    dpmpp_2m_karras, flow_match_euler."""
    if name not in _NAMES:
        raise InvalidArgumentError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SCHEDULER_NAMES)}")
    cls, forced = _NAMES[name]
    raw = {} if config is None else load_config(config)
    return cls({**raw, **forced})
