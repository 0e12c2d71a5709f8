"""Flow-matching Euler sampler: diffusers' FlowMatchEulerDiscreteScheduler (FLUX.1, SD3/3.5, Qwen-Image, ...).

The model predicts a velocity v; one step is `x_next = x + (sigma_next - sigma) * v`. The schedule is computed on
the host with numpy, in the same float32 / float64 precision as diffusers at every operation, so `sigmas` and
`timesteps` are identical to diffusers' bit for bit:

- a schedule computed by the scheduler itself (no `sigmas` passed, SD3) is float64 until it is stored as float32;
- sigmas passed in (FluxPipeline passes `linspace(1, 1/steps, steps)`) are cast to float32 first, and the shift is
  then float32 arithmetic (numpy keeps float32 when a Python float meets a float32 array, as torch does);
- `timesteps = sigmas * num_train_timesteps` in float32, and a final sigma 0 (1 with `invert_sigmas`) is appended.

The denoising loop does the step on the device with `ops.add(x, v, alpha=scheduler.step_coefficient(i, x.dtype))`
(dt rounded to the latents' dtype as diffusers rounds it); `step()` here is the numpy reference of diffusers' step,
rounding where diffusers rounds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime import dtypes
from ...runtime.errors import InvalidArgumentError, ModelLayoutError

CONFIG_NAME = "scheduler_config.json"


@dataclasses.dataclass
class FlowMatchEulerConfig:
    """The fields of diffusers' FlowMatchEulerDiscreteScheduler config, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FlowMatchEulerConfig:
        """From a parsed scheduler_config.json; keys this scheduler does not have are ignored, as diffusers does."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.use_beta_sigmas:
            raise ModelLayoutError("use_beta_sigmas is not supported by fastdm (it needs scipy's beta quantiles); "
                                   "set it to false in scheduler_config.json or use karras/exponential sigmas")
        if self.stochastic_sampling:
            raise ModelLayoutError("stochastic_sampling is not supported by fastdm's flow-match Euler scheduler; "
                                   "set it to false in scheduler_config.json")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ModelLayoutError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be "
                                   "true in scheduler_config.json")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ModelLayoutError(f"time_shift_type {self.time_shift_type!r} is not 'exponential' or 'linear'")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for resolution-dependent shifting: linear in the number of image tokens (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowMatchEulerScheduler:
    """Sigmas and timesteps of a flow-matching Euler schedule, as diffusers computes them.

    After `set_timesteps`: `timesteps` [n] float32 (what the denoiser gets, in [0, num_train_timesteps]),
    `sigmas` [n + 1] float32 (the last is the terminal 0), `num_inference_steps` = n.
    """

    order = 1

    def __init__(self, config: FlowMatchEulerConfig | Mapping[str, Any] | None = None):
        if config is None:
            config = FlowMatchEulerConfig()
        elif isinstance(config, Mapping):
            config = FlowMatchEulerConfig.from_dict(config)
        else:
            config.validate()
        self.config = config
        n = config.num_train_timesteps
        # the training schedule (float32 torch ops in diffusers): it fixes sigma_max / sigma_min
        train_t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        sigmas = train_t / np.float32(n)
        if not config.use_dynamic_shifting:
            sigmas = _static_shift(config.shift, sigmas)
        self.sigma_max = float(sigmas[0])
        self.sigma_min = float(sigmas[-1])
        self.shift = config.shift
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any]) -> FlowMatchEulerScheduler:
        """From a scheduler_config.json dict, the file, its folder (`<model>/scheduler`) or the model root."""
        return cls(load_config(source))

    # ------------------------------------------------------------------------------------------------ schedule
    def set_timesteps(self, num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None, timesteps: Sequence[float] | None = None) -> None:
        """Compute the schedule (diffusers' set_timesteps, same arguments; `mu` is required with dynamic shifting)."""
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise InvalidArgumentError("this scheduler shifts by resolution (use_dynamic_shifting): pass mu, e.g. "
                             "calculate_shift(image_seq_len, ...), or use flux_timesteps()")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise InvalidArgumentError("sigmas and timesteps must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise InvalidArgumentError("sigmas / timesteps must have num_inference_steps entries")
        elif sigmas is not None:
            num_inference_steps = len(sigmas)
        elif timesteps is not None:
            num_inference_steps = len(timesteps)
        else:
            raise InvalidArgumentError("pass num_inference_steps, sigmas or timesteps")
        if num_inference_steps < 1:
            raise InvalidArgumentError(f"num_inference_steps must be at least 1, got {num_inference_steps}")

        given_t = np.array(timesteps).astype(np.float32) if timesteps is not None else None
        if sigmas is None:
            if given_t is None:
                t = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            else:
                t = given_t
            s = t / n_train  # float64 from linspace, float32 from given timesteps
        else:
            s = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(s)

        if cfg.use_dynamic_shifting:
            s = self._time_shift(mu, 1.0, s)
        else:
            s = _static_shift(self.shift, s)
        if cfg.shift_terminal:
            s = self._stretch_to_terminal(s)
        if cfg.use_karras_sigmas:
            s = _karras(s, num_inference_steps)
        elif cfg.use_exponential_sigmas:
            s = _exponential(s, num_inference_steps)

        s = s.astype(np.float32)
        t = given_t if given_t is not None else s * np.float32(n_train)
        if cfg.invert_sigmas:
            s = np.float32(1.0) - s
            t = s * np.float32(n_train)
            s = np.concatenate([s, np.ones(1, np.float32)])
        else:
            s = np.concatenate([s, np.zeros(1, np.float32)])
        self.num_inference_steps = num_inference_steps
        self.timesteps = t
        self.sigmas = s

    def _time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        # Python floats meet the array: float32 stays float32 (weak scalars), as in diffusers' numpy code
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def _stretch_to_terminal(self, t: np.ndarray) -> np.ndarray:
        one_minus_z = 1 - t
        if one_minus_z[-1] == 0:  # diffusers divides by zero here and returns NaN sigmas
            raise InvalidArgumentError(f"shift_terminal={self.config.shift_terminal} needs a schedule that ends below "
                             "sigma 1: use at least 2 inference steps")
        scale_factor = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus_z / scale_factor)

    # ---------------------------------------------------------------------------------------------------- step
    def _check_index(self, i: int) -> None:
        if self.sigmas is None:
            raise InvalidArgumentError("call set_timesteps() before stepping")
        if not 0 <= i < len(self.sigmas) - 1:
            raise InvalidArgumentError(f"step index {i} is outside the schedule of {len(self.sigmas) - 1} steps")

    def step_coefficient(self, i: int, dtype: Any = None) -> float:
        """dt = sigma[i + 1] - sigma[i] (float32, negative when denoising): step i is x + dt * v.

        With `dtype` (the dtype of the velocity, e.g. "bfloat16"), dt is rounded to it as diffusers does: its step
        multiplies the velocity by the float32 dt as a 0-dim tensor, which torch first casts to the velocity's dtype.
        """
        self._check_index(i)
        dt = np.float32(self.sigmas[i + 1] - self.sigmas[i])
        if dtype is not None:
            dt = np.asarray(dt).astype(dtypes.dtype(dtype).np).astype(np.float32)
        return float(dt)

    def step(self, sample: np.ndarray, model_output: np.ndarray, i: int) -> np.ndarray:
        """Step i on the host, rounding as diffusers does: dt and dt * v in the model output's dtype, the sum in
        float32, the result in the model output's dtype. sample, model_output: [...] numpy (float32, float16 or
        bfloat16)."""
        out_dtype = model_output.dtype
        dt = np.float32(self.step_coefficient(i, dtype=out_dtype))
        update = (model_output.astype(np.float32) * dt).astype(out_dtype)
        return (sample.astype(np.float32) + update.astype(np.float32)).astype(out_dtype)


def _static_shift(shift: float, s: np.ndarray) -> np.ndarray:
    return shift * s / (1 + (shift - 1) * s)


def _karras(s: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
    sigma_min, sigma_max = s[-1].item(), s[0].item()
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(s: np.ndarray, n: int) -> np.ndarray:
    sigma_min, sigma_max = s[-1].item(), s[0].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler_config.json as a dict, from the dict itself, the file, the scheduler folder or the model root."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    for cand in (path, path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise ModelLayoutError(f"{cand} is not valid JSON ({e}); re-download the checkpoint") from None
    raise ModelLayoutError(f"no {CONFIG_NAME} at {path} (nor in {path}/scheduler): pass the model folder or its "
                           "scheduler/ folder")


def flux_timesteps(scheduler: FlowMatchEulerScheduler, num_inference_steps: int, image_seq_len: int) -> None:
    """Set the schedule exactly as diffusers' FluxPipeline does: sigmas linspace(1, 1/steps, steps) and mu from
    the number of packed image tokens (e.g. 4096 for 1024x1024) and the scheduler config."""
    if num_inference_steps < 1:
        raise InvalidArgumentError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    cfg = scheduler.config
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len,
                         cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
