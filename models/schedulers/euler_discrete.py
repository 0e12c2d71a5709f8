"""Euler sampler for DDPM-trained models: diffusers' EulerDiscreteScheduler (SDXL base's default scheduler).

In the sigma parameterisation (k-diffusion), the latents start as noise times `init_noise_sigma`, the model sees
`x / sqrt(sigma^2 + 1)` and predicts eps (or v), and one Euler step moves from sigma to sigma_next:

    denoised = x - sigma * eps                  (epsilon)
    x_next   = x + (sigma_next - sigma) * (x - denoised) / sigma  =  x + (sigma_next - sigma) * eps

so a step is `a * x + b * model_output`; `step_coefficients(i)` gives (a, b) and `step_ops` does it on the device
through runtime.ops. `step()` is the numpy reference of diffusers' step (float32, in diffusers' order of
operations). The schedule (`timesteps`, `sigmas`) is diffusers' to the bit; see discrete_sigmas.py.

Not implemented: `s_churn` (diffusers' pipelines never pass it), beta sigmas (need scipy), and continuous
timesteps for v-prediction (EDM-style models, which ship EDM schedulers instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ...runtime import ops
from ...runtime.errors import InvalidArgumentError, ModelLayoutError
from ...runtime.tensor import Tensor
from .discrete_sigmas import (
    DiscreteConfig,
    DiscreteScheduler,
    check_sigma_options,
    exponential_sigmas,
    interp_sigmas,
    karras_sigmas,
    sigmas_to_timesteps,
    spaced_timesteps,
    torch_linspace_f32,
)

_f32 = np.float32


@dataclasses.dataclass
class EulerDiscreteConfig(DiscreteConfig):
    """diffusers' EulerDiscreteScheduler config fields, with diffusers' defaults."""

    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")

    def validate(self) -> None:
        super().validate()
        check_sigma_options(self)
        if self.interpolation_type not in ("linear", "log_linear"):
            raise ModelLayoutError(f"interpolation_type {self.interpolation_type!r} is not 'linear' or "
                                   "'log_linear'; fix scheduler_config.json")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ModelLayoutError(f"final_sigmas_type {self.final_sigmas_type!r} is not 'zero' or 'sigma_min'; "
                                   "fix scheduler_config.json")
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            raise ModelLayoutError("timestep_type 'continuous' with v_prediction (EDM-style timesteps) is not "
                                   "supported by fastdm's Euler scheduler; use timestep_type 'discrete'")
        if self.timestep_type not in ("discrete", "continuous"):
            raise ModelLayoutError(f"timestep_type {self.timestep_type!r} is not 'discrete' or 'continuous'")


class SigmaInputScheduler(DiscreteScheduler):
    """The Euler samplers' shared model-input convention: the UNet sees x / sqrt(sigma^2 + 1), and the initial
    latents are unit noise times init_noise_sigma."""

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latents (the pipeline multiplies unit noise by it)."""
        if self.sigmas is None:
            raise InvalidArgumentError("call set_timesteps() before reading init_noise_sigma")
        m = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(m)
        return float(np.sqrt(m * m + _f32(1)))

    def model_input_scale(self, i: int) -> float:
        """c_in = 1 / sqrt(sigma_i^2 + 1): the UNet gets `ops.mul(x, c_in)` at step i."""
        self._check_index(i)
        s = self.sigmas[i]
        return 1.0 / float(np.sqrt(s * s + _f32(1)))

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """Numpy reference of diffusers' scale_model_input: sample / sqrt(sigma_i^2 + 1), float32 divisor."""
        self._check_index(i)
        s = self.sigmas[i]
        return _div(sample, np.sqrt(s * s + _f32(1)))


class EulerDiscreteScheduler(SigmaInputScheduler):
    """Euler sampler (diffusers' EulerDiscreteScheduler). After `set_timesteps`: `timesteps` [n] float32 (what the
    UNet gets), `sigmas` [n + 1] float32, `num_inference_steps` = n."""

    config_class = EulerDiscreteConfig

    # ------------------------------------------------------------------------------------------------ schedule
    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Sequence[float] | None = None,
                      sigmas: Sequence[float] | None = None) -> None:
        """Compute the schedule (diffusers' set_timesteps: pass exactly one of the three; `sigmas` include the
        final sigma, so n = len(sigmas) - 1)."""
        cfg = self.config
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise InvalidArgumentError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise InvalidArgumentError("custom timesteps cannot be used with use_karras_sigmas / "
                                       "use_exponential_sigmas; pass sigmas or num_inference_steps")
        train = self.train
        log_sigmas = np.log(train.sigmas)
        if sigmas is not None:
            s = np.array(sigmas).astype(_f32)
            if s.ndim != 1 or len(s) < 2:
                raise InvalidArgumentError("sigmas must be a list of at least 2 values, the last one the final "
                                           "sigma (usually 0)")
            t = sigmas_to_timesteps(s[:-1], log_sigmas)
            n = len(s) - 1
        else:
            if timesteps is not None:
                t = np.array(timesteps).astype(_f32)
                if t.ndim != 1 or len(t) < 1:
                    raise InvalidArgumentError("timesteps must be a non-empty list")
                n = len(t)
            else:
                n = num_inference_steps
                t = spaced_timesteps(cfg, n)
            if cfg.interpolation_type == "linear":
                s = interp_sigmas(t, train.sigmas)
            else:
                # diffusers: torch.linspace(log sigma_max, log sigma_min, n + 1).exp() (n + 1 values, and the final
                # sigma is still appended); its exp is MKL's on x86, numpy's here: they may differ in the last bit
                s = np.exp(torch_linspace_f32(float(np.log(train.sigmas[-1])), float(np.log(train.sigmas[0])),
                                              n + 1))
            if cfg.use_karras_sigmas:
                s = karras_sigmas(s, n, cfg.sigma_min, cfg.sigma_max)
                t = sigmas_to_timesteps(s, log_sigmas)
            elif cfg.use_exponential_sigmas:
                s = exponential_sigmas(s, n, cfg.sigma_min, cfg.sigma_max)
                t = sigmas_to_timesteps(s, log_sigmas)
            # sigma_min: diffusers' sqrt((1 - a0) / a0), the smallest training sigma
            last = train.sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
            s = np.concatenate([s, [last]]).astype(_f32)
        self.num_inference_steps = n
        self.timesteps = np.asarray(t).astype(_f32)
        self.sigmas = s


    # ---------------------------------------------------------------------------------------------------- step
    def step_coefficients(self, i: int) -> tuple[float, float]:
        """(a, b) with x_next = a * x + b * model_output at step i (a is 1 for epsilon prediction)."""
        self._check_index(i)
        sigma, dt = self._sigma_dt(i)
        return _euler_coefficients(self.config.prediction_type, float(sigma), float(dt))

    def _sigma_dt(self, i: int) -> tuple[np.float32, np.float32]:
        sigma = self.sigmas[i]
        return sigma, self.sigmas[i + 1] - sigma

    def step(self, sample: np.ndarray, model_output: np.ndarray, i: int) -> np.ndarray:
        """Step i on the host, as diffusers computes it. sample, model_output: [...] numpy; the result has the
        model output's dtype. Exact order of float32 operations for float32 inputs; for float16 / bfloat16 ones
        diffusers also rounds sigma * model_output to that dtype, which this reference does not."""
        self._check_index(i)
        sigma, dt = self._sigma_dt(i)
        x = sample.astype(_f32)
        denoised = _denoised(self.config.prediction_type, x, model_output.astype(_f32), sigma)
        derivative = (x - denoised) / sigma
        return (x + derivative * dt).astype(model_output.dtype)

    def step_ops(self, sample: Tensor, model_output: Tensor, i: int) -> Tensor:
        """Step i through runtime.ops (on the tensors' device): a * sample + b * model_output, sample's dtype."""
        a, b = self.step_coefficients(i)
        return _axpby(sample, a, model_output, b)


# ------------------------------------------------------------------------------------------ shared Euler math
def _euler_coefficients(prediction_type: str, sigma: float, dt: float) -> tuple[float, float]:
    """x + dt * (x - denoised) / sigma written as a * x + b * model_output (float64 from the float32 sigmas)."""
    if prediction_type == "epsilon":
        return 1.0, dt
    if prediction_type == "v_prediction":
        # denoised = c_skip * x + c_out * v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
        s2p1 = sigma * sigma + 1.0
        return 1.0 + dt * sigma / s2p1, dt / s2p1 ** 0.5
    # sample prediction: denoised = model_output
    return 1.0 + dt / sigma, -dt / sigma


def _denoised(prediction_type: str, x: np.ndarray, m: np.ndarray, sigma: np.float32) -> np.ndarray:
    """diffusers' pred_original_sample in float32 (x, m float32; sigma a float32 scalar)."""
    if prediction_type == "epsilon":
        return x - sigma * m
    if prediction_type == "v_prediction":
        s2p1 = sigma * sigma + _f32(1)
        return m * (-sigma / np.sqrt(s2p1)) + x / s2p1
    return m


def _div(sample: np.ndarray, d: np.float32) -> np.ndarray:
    """sample / d as torch divides a tensor by a float32 0-dim tensor: in the sample's dtype."""
    if sample.dtype == _f32:
        return sample / d
    d = np.asarray(d).astype(sample.dtype).astype(_f32)
    return (sample.astype(_f32) / d).astype(sample.dtype)


def _axpby(x: Tensor, a: float, y: Tensor, b: float) -> Tensor:
    """a * x + b * y through runtime.ops, in x's dtype (one op when a is 1; y is cast to x's dtype if needed)."""
    if y.dtype != x.dtype:
        y = ops.cast(y, x.dtype)
    if a == 0.0:
        return ops.mul(y, b)
    if a != 1.0:
        x = ops.mul(x, a)
    return ops.add(x, y, alpha=b)
