"""The noise schedule shared by the discrete-time (DDPM-trained) samplers: Euler, Euler ancestral, DPM-Solver++.

Everything here repeats diffusers' operations in diffusers' dtypes, so the timesteps and sigmas fastdm feeds the
UNet are the ones diffusers feeds it, bit for bit except where torch's math library rounds differently (sqrt,
below). Where diffusers computes with torch, the same float32 operations are done here in numpy:

- betas: `torch.linspace(..., dtype=float32)` is a scalar loop that evaluates `start + step * i` (first half) and
  `end - step * (n - 1 - i)` (second half), and torch's x86-64 AVX2 / AVX-512 kernels compile both into fused
  multiply-adds, which `torch_linspace_f32` reproduces (torch's non-AVX2 x86 kernel rounds the products
  separately and its betas differ in the last bit; aarch64 builds, which contract to FMA by default, are expected
  to match but were not checked);
- `** 2` is `x * x`; `torch.cumprod` of float32 multiplies in float64 and rounds each partial product to float32;
- training sigmas `sqrt((1 - a) / a)` are float32, with numpy's correctly rounded sqrt. torch on x86 computes
  float32 sqrt (and exp, log) with MKL's VML, within 1 ulp but not correctly rounded, so ~20% of diffusers'
  training sigmas are one ulp off numpy's, and so are the inference sigmas taken from them (rel <= 1.2e-7; the
  zero-terminal-SNR rescale amplifies that to ~1e-5). MKL's code is not public and may take other paths on other
  CPUs, so it is not emulated; given diffusers' training arrays, everything here is bit-identical to diffusers;
- the inference-time helpers (np.interp, Karras, the sigma -> t inversion) are numpy in diffusers too: they are
  called here with the same dtypes, element by element where diffusers loops, so they agree on any machine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime.errors import InvalidArgumentError, ModelLayoutError
from .flow_match_euler import load_config

_f32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class DiscreteConfig:
    """The config fields every DDPM-trained sampler shares, with diffusers' defaults (SDXL's scheduler_config.json
    overrides most of them: scaled_linear 0.00085..0.012, leading spacing, steps_offset 1)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    PREDICTION_TYPES = ("epsilon", "v_prediction")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DiscreteConfig:
        """From a parsed scheduler_config.json; keys this scheduler does not have are ignored, as diffusers does
        (so SDXL's Euler config can configure a DPM-Solver, as `DPMSolverMultistepScheduler.from_config` allows)."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ModelLayoutError(f"beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES} "
                                   "(scheduler_config.json); fix the config or pass trained_betas")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ModelLayoutError(f"timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}; "
                                   "fix scheduler_config.json")
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ModelLayoutError(f"prediction_type {self.prediction_type!r} is not supported by "
                                   f"{type(self).__name__} (it takes {', '.join(self.PREDICTION_TYPES)}); "
                                   "fix scheduler_config.json")
        if self.num_train_timesteps < 2:
            raise ModelLayoutError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")


def check_sigma_options(cfg: Any) -> None:
    """Reject sigma-spacing options fastdm does not implement, and conflicting ones (diffusers' own check)."""
    if getattr(cfg, "use_beta_sigmas", False):
        raise ModelLayoutError("use_beta_sigmas is not supported by fastdm (it needs scipy's beta quantiles); "
                               "set it to false in scheduler_config.json or use karras / exponential sigmas")
    if bool(cfg.use_karras_sigmas) + bool(cfg.use_exponential_sigmas) > 1:
        raise ModelLayoutError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be true "
                               "in scheduler_config.json")


# ------------------------------------------------------------------------------------------ float32 helpers
def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32, for float32 a, b, c (what a compiled fused multiply-add gives).

    The float32 product is exact in float64; the float64 sum is then off the exact sum by `err` (Knuth's TwoSum).
    Rounding that sum to float32 is right unless it fell exactly on a float32 tie, where `err` picks the side.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    # a float32 tie in a float64 (normal range): the 29 fraction bits float32 drops are exactly 1 followed by 0s
    tie = ((s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)) & (err != 0)
    if np.any(tie):
        s = np.where(tie, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_f32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit (see the module doc)."""
    if steps == 1:
        return np.array([start], _f32)
    s, e = _f32(start), _f32(end)
    step = _f32((e - s) / _f32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    out = np.empty(steps, _f32)
    out[:half] = _fma_f32(np.full(half, step), idx[:half].astype(_f32), np.full(half, s))
    rest = (steps - 1 - idx[half:]).astype(_f32)
    out[half:] = _fma_f32(np.full(len(rest), -step), rest, np.full(len(rest), e))
    return out


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 vector on the CPU: accumulated in float64, each prefix rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(_f32)


# --------------------------------------------------------------------------------------- training schedule
def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (Glide's cosine schedule): Python floats, then one float32 rounding."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float64
                    ).astype(_f32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, algorithm 1), in diffusers' float32 operations."""
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(_f32(1.0) - betas))
    a0, at = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * _f32(a0 / _f32(a0 - at))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return _f32(1.0) - alphas


def make_betas(cfg: DiscreteConfig) -> np.ndarray:
    """The training betas [num_train_timesteps] float32, as the diffusers scheduler's __init__ makes them."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float64).astype(_f32)
        if betas.shape != (n,):
            raise ModelLayoutError(f"trained_betas has shape {betas.shape}, expected ({n},) for "
                                   f"num_train_timesteps={n}; fix scheduler_config.json")
    elif cfg.beta_schedule == "linear":
        betas = torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        b = torch_linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n)
        betas = b * b
    else:
        betas = _betas_for_alpha_bar(n)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


@dataclasses.dataclass
class TrainSchedule:
    """The training-time schedule: betas, alphas_cumprod and sigmas, all [num_train_timesteps] float32, indexed
    by the training timestep t (sigmas rise with t)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sigmas: np.ndarray

    @property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)


def train_schedule(cfg: DiscreteConfig) -> TrainSchedule:
    """betas -> alphas_cumprod -> sigmas = sqrt((1 - a) / a), in diffusers' dtypes."""
    betas = make_betas(cfg)
    alphas_cumprod = _cumprod_f32(_f32(1.0) - betas)
    if cfg.rescale_betas_zero_snr:
        alphas_cumprod[-1] = _f32(2.0 ** -24)  # diffusers: close to 0 so the first sigma stays finite
    sigmas = np.sqrt((_f32(1.0) - alphas_cumprod) / alphas_cumprod)
    return TrainSchedule(betas, alphas_cumprod, sigmas)


# --------------------------------------------------------------------------------------- inference schedule
def _check_steps(num_inference_steps: int) -> None:
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise InvalidArgumentError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")


def spaced_timesteps(cfg: DiscreteConfig, num_inference_steps: int) -> np.ndarray:
    """Timesteps [n] float32, descending, as Euler / Euler ancestral space them (`timestep_spacing`, Table 2 of
    "Common Diffusion Noise Schedules and Sample Steps are Flawed")."""
    _check_steps(num_inference_steps)
    n, n_train = num_inference_steps, cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=_f32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ratio = n_train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy().astype(_f32)
        return t + _f32(cfg.steps_offset)
    ratio = n_train / n  # trailing
    return np.arange(n_train, 0, -ratio).round().copy().astype(_f32) - _f32(1)


def spaced_timesteps_int(cfg: DiscreteConfig, num_inference_steps: int, last_timestep: int) -> np.ndarray:
    """Timesteps [n] int64, descending, as DPM-Solver spaces them: linspace / leading space n + 1 points below
    `last_timestep` and drop the last (so t = 0 is never a model input)."""
    _check_steps(num_inference_steps)
    n = num_inference_steps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = last_timestep // (n + 1)
        t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return t + cfg.steps_offset
    ratio = cfg.num_train_timesteps / n  # trailing
    return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (fractional) timesteps by linear interpolation of the training sigmas: float64, as np.interp."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None,
                  sigma_max: float | None = None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas [n] float64 between the ends of `in_sigmas` (descending), or the given ends."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None,
                       sigma_max: float | None = None) -> np.ndarray:
    """Sigmas [n] float64 evenly spaced in log sigma between the ends of `in_sigmas` (descending)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma: np.floating | np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of one sigma: linear interpolation in log sigma between the two
    neighbouring training sigmas. Keeps diffusers' dtypes (a float64 sigma gives float64, a float32 one mixes)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def sigmas_to_timesteps(sigmas: Sequence[Any] | np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """sigma_to_t of each sigma, one at a time as diffusers calls it (so numpy takes the same code paths)."""
    return np.array([sigma_to_t(s, log_sigmas) for s in sigmas])


# ------------------------------------------------------------------------------------------ scheduler base
class DiscreteScheduler:
    """What the DDPM-trained samplers share: the config, the training schedule, and the inference schedule's
    arrays, set by the subclass's `set_timesteps`: `timesteps` [n], `sigmas` [n + 1] float32 (last: the final
    sigma, 0 by default), `num_inference_steps` = n. Steps are addressed by their index i in `timesteps`."""

    config_class: type[DiscreteConfig] = DiscreteConfig
    order = 1

    def __init__(self, config: DiscreteConfig | Mapping[str, Any] | None = None):
        if config is None:
            config = self.config_class()
        elif isinstance(config, Mapping):
            config = self.config_class.from_dict(config)
        else:
            config.validate()
        self.config = config
        self.train = train_schedule(config)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any]) -> DiscreteScheduler:
        """From a scheduler_config.json dict, the file, its folder (`<model>/scheduler`) or the model root."""
        return cls(load_config(source))

    def _check_index(self, i: int) -> None:
        if self.sigmas is None:
            raise InvalidArgumentError("call set_timesteps() before stepping")
        if not 0 <= i < len(self.timesteps):
            raise InvalidArgumentError(f"step index {i} is outside the schedule of {len(self.timesteps)} steps")
