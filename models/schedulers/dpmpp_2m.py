"""DPM-Solver++ (2M): diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" ("DPM++ 2M", and
"DPM++ 2M Karras" with use_karras_sigmas).

The model output is first turned into a prediction of the clean latents x0 (for epsilon prediction,
`x0 = (x - sigma_t * eps) / alpha_t` with alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t). With
lambda = log(alpha_t / sigma_t) and h = lambda_next - lambda:

    first order  (DDIM):  x_next = (sigma_t' / sigma_t) x - alpha_t' (e^-h - 1) x0
    second order (2M):    adds the difference D1 = (x0 - x0_prev) / r0, r0 = h_prev / h, with weight
                          -0.5 alpha_t' (e^-h - 1) ("midpoint") or alpha_t' ((e^-h - 1) / h + 1) ("heun")

The first step is first order (no history yet); so is the last with final_sigmas_type "zero" (or
lower_order_final with fewer than 15 steps, or euler_at_final), diffusers' rule. Both stages are linear:
`x0_coefficients(i)` and `update_coefficients(i, order)` give them as coefficient tuples, `step_ops` runs them
through runtime.ops and keeps the previous x0 (a device tensor) in a one-entry history; `step()` is the numpy
reference, float32 in diffusers' order of operations (its scalar log / exp / sqrt are numpy's where torch uses
MKL's, which can differ in the last bit).

Not implemented (rejected with a message): the SDE and noise-prediction variants, solver_order 3, thresholding,
learned variance, lu-lambdas, flow sigmas, beta sigmas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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
    spaced_timesteps_int,
)
from .euler_discrete import _axpby

_f32 = np.float32


@dataclasses.dataclass
class DPMSolverMultistepConfig(DiscreteConfig):
    """diffusers' DPMSolverMultistepScheduler config fields, with diffusers' defaults.

    sigma_min / sigma_max are not DPMSolverMultistepScheduler arguments, but diffusers' Karras / exponential
    sigmas read them from the config when it has them (a config converted from an Euler one), so they are kept.
    """

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    use_dynamic_shifting: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    thresholding: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def validate(self) -> None:
        # diffusers maps the multistep solvers' other names onto these
        if self.algorithm_type == "deis":
            self.algorithm_type = "dpmsolver++"
        if self.solver_type in ("logrho", "bh1", "bh2"):
            self.solver_type = "midpoint"
        super().validate()
        check_sigma_options(self)
        if self.algorithm_type != "dpmsolver++":
            raise ModelLayoutError(f"algorithm_type {self.algorithm_type!r} is not supported by fastdm's DPM-Solver "
                                   "(only 'dpmsolver++', i.e. DPM++ 2M); set it in scheduler_config.json")
        if self.solver_order not in (1, 2):
            raise ModelLayoutError(f"solver_order {self.solver_order} is not supported by fastdm's DPM-Solver "
                                   "(1 or 2); set solver_order to 2 in scheduler_config.json")
        if self.solver_type not in ("midpoint", "heun"):
            raise ModelLayoutError(f"solver_type {self.solver_type!r} is not 'midpoint' or 'heun'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ModelLayoutError(f"final_sigmas_type {self.final_sigmas_type!r} is not 'zero' or 'sigma_min'")
        for name in ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting", "thresholding"):
            if getattr(self, name):
                raise ModelLayoutError(f"{name} is not supported by fastdm's DPM-Solver; set it to false in "
                                       "scheduler_config.json")
        if self.variance_type in ("learned", "learned_range"):
            raise ModelLayoutError("learned variance (variance_type) is not supported by fastdm's DPM-Solver; "
                                   "use a model that predicts epsilon / v only")


def _alpha_sigma_f32(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of a k-diffusion sigma, float32 as diffusers' _sigma_to_alpha_sigma_t."""
    alpha = _f32(1) / np.sqrt(sigma * sigma + _f32(1))
    return alpha, sigma * alpha


def _lambda_f32(sigma: np.float32) -> np.float32:
    alpha, sig = _alpha_sigma_f32(sigma)
    with np.errstate(divide="ignore"):  # sigma 0 (the end): lambda = +inf, as in torch
        return np.log(alpha) - np.log(sig)


def _alpha_sigma_lambda_f64(sigma: float) -> tuple[float, float, float]:
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    lam = math.inf if sigma == 0 else -math.log(sigma)  # log(alpha / (sigma * alpha))
    return alpha, sigma * alpha, lam


class DPMSolverMultistepScheduler(DiscreteScheduler):
    """DPM-Solver++ multistep sampler. After `set_timesteps`: `timesteps` [n] int64, `sigmas` [n + 1] float32.

    Stateful like diffusers': steps must be taken in order (the history holds the previous step's x0);
    `set_timesteps` clears it. A loop may start at any index (img2img); its first step is then first order.
    """

    config_class = DPMSolverMultistepConfig
    init_noise_sigma = 1.0

    def __init__(self, config: DPMSolverMultistepConfig | Mapping[str, Any] | None = None):
        super().__init__(config)
        self._last_index: int | None = None  # the previous step taken since set_timesteps
        self._prev_x0 = None  # its x0 prediction (numpy array or Tensor), kept for second-order steps

    # ------------------------------------------------------------------------------------------------ schedule
    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None) -> None:
        """Compute the schedule (diffusers' set_timesteps: pass num_inference_steps or custom integer timesteps)."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise InvalidArgumentError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise InvalidArgumentError("custom timesteps cannot be used with use_karras_sigmas / "
                                       "use_exponential_sigmas; pass num_inference_steps")
        train = self.train
        if timesteps is not None:
            t = np.array(timesteps).astype(np.int64)
            if t.ndim != 1 or len(t) < 1:
                raise InvalidArgumentError("timesteps must be a non-empty list of integers")
            n = len(t)
        else:
            n = num_inference_steps
            t = spaced_timesteps_int(cfg, n, self._last_timestep())
        log_sigmas = np.log(train.sigmas)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            flipped = np.flip(train.sigmas).copy()
            if cfg.use_karras_sigmas:
                s = karras_sigmas(flipped, n, cfg.sigma_min, cfg.sigma_max)
            else:
                s = exponential_sigmas(flipped, n, cfg.sigma_min, cfg.sigma_max)
            t = sigmas_to_timesteps(s, log_sigmas)
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
        else:
            s = interp_sigmas(t, train.sigmas)
        # sigma_min: diffusers' sqrt((1 - a0) / a0), the smallest training sigma
        last = train.sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([s, [last]]).astype(_f32)
        self.timesteps = np.asarray(t).astype(np.int64)  # torch's .to(int64) truncates, as astype does
        self.num_inference_steps = len(self.timesteps)
        self._last_index, self._prev_x0 = None, None

    def _last_timestep(self) -> int:
        """num_train_timesteps less the timesteps whose lambda is below lambda_min_clipped (none by default)."""
        cfg = self.config
        if cfg.lambda_min_clipped == -math.inf:
            return cfg.num_train_timesteps
        ac = self.train.alphas_cumprod
        # diffusers computes lambda_t with torch (MKL's log / sqrt on x86): a timestep right at the clip can differ
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(_f32(1) - ac))
        return cfg.num_train_timesteps - int(np.searchsorted(np.flip(lam), cfg.lambda_min_clipped, side="left"))

    # ------------------------------------------------------------------------------------------- model input
    def model_input_scale(self, i: int) -> float:
        """DPM-Solver feeds the latents to the model unscaled."""
        self._check_index(i)
        return 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The model input at step i: the latents themselves."""
        self._check_index(i)
        return sample

    # ---------------------------------------------------------------------------------------------- stepping
    def step_order(self, i: int) -> int:
        """1 or 2: the solver order diffusers uses at step i, given the history (call before the step)."""
        self._check_index(i)
        cfg = self.config
        n = len(self.timesteps)
        final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        if self._last_index is not None and self._last_index != i - 1:
            raise InvalidArgumentError(f"DPM-Solver steps must be taken in order: step {i} after step "
                                       f"{self._last_index}; call set_timesteps() to restart")
        if cfg.solver_order == 1 or self._last_index is None or final:
            return 1
        return 2

    def x0_coefficients(self, i: int) -> tuple[float, float]:
        """(a, b) with x0 = a * sample + b * model_output at step i (the data prediction DPM-Solver++ integrates)."""
        self._check_index(i)
        alpha, sig, _ = _alpha_sigma_lambda_f64(float(self.sigmas[i]))
        pt = self.config.prediction_type
        if pt == "epsilon":
            return 1.0 / alpha, -sig / alpha
        if pt == "v_prediction":
            return alpha, -sig
        return 0.0, 1.0

    def update_coefficients(self, i: int, order: int) -> tuple[float, float, float]:
        """(c_sample, c_x0, c_prev_x0) with x_next = c_sample * sample + c_x0 * x0 + c_prev_x0 * x0_prev at step i
        (c_prev_x0 is 0 for order 1). float64 from the float32 sigmas, with expm1 where diffusers has e^-h - 1."""
        self._check_index(i)
        a_t, s_t, l_t = _alpha_sigma_lambda_f64(float(self.sigmas[i + 1]))
        _, s_s0, l_s0 = _alpha_sigma_lambda_f64(float(self.sigmas[i]))
        h = l_t - l_s0
        em1 = -1.0 if math.isinf(h) else math.expm1(-h)  # e^-h - 1
        c_sample = s_t / s_s0
        if order == 1:
            return c_sample, -a_t * em1, 0.0
        if i < 1:
            raise InvalidArgumentError("a second-order step needs the previous step's x0: step 0 is first order")
        _, _, l_s1 = _alpha_sigma_lambda_f64(float(self.sigmas[i - 1]))
        if l_s0 == l_s1:
            raise InvalidArgumentError(f"sigmas {i - 1} and {i} are equal, so the second-order step {i} is undefined "
                                       "(diffusers returns NaN): remove the repeated timestep")
        inv_r0 = h / (l_s0 - l_s1)
        if self.config.solver_type == "midpoint":
            w1 = -0.5 * a_t * em1  # weight of D1 = (x0 - x0_prev) / r0
        else:
            # h = 0 (a repeated final sigma_min): the weight's limit is 0, where diffusers computes 0 / 0 = NaN
            w1 = 0.0 if h == 0 else a_t * (em1 / h + 1.0)
        return c_sample, -a_t * em1 + w1 * inv_r0, -w1 * inv_r0

    def _remember(self, i: int, x0) -> None:
        self._last_index = i
        self._prev_x0 = x0 if self.config.solver_order > 1 else None

    def step(self, sample: np.ndarray, model_output: np.ndarray, i: int) -> np.ndarray:
        """Step i on the host, as diffusers computes it (float32). sample, model_output: [...] numpy; the result
        has the model output's dtype. Keeps this step's x0 for the next."""
        order = self.step_order(i)
        cfg = self.config
        x = sample.astype(_f32)
        m = model_output.astype(_f32)
        alpha, sig = _alpha_sigma_f32(self.sigmas[i])
        if cfg.prediction_type == "epsilon":
            x0 = (x - sig * m) / alpha
        elif cfg.prediction_type == "v_prediction":
            x0 = alpha * x - sig * m
        else:
            x0 = m
        x0 = x0.astype(model_output.dtype).astype(_f32)  # diffusers keeps x0 in the model output's dtype

        s_t, s_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t, sigma_t = _alpha_sigma_f32(s_t)
        _, sigma_s0 = _alpha_sigma_f32(s_s0)
        h = _lambda_f32(s_t) - _lambda_f32(s_s0)
        em1 = np.exp(-h) - _f32(1)
        if order == 1:
            out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0
        else:
            self.update_coefficients(i, order)  # the argument checks
            x0_prev = np.asarray(self._prev_x0).astype(_f32)
            with np.errstate(divide="ignore"):  # h = 0 (repeated final sigma): 1 / r0 = 0, as in torch
                r0 = (_lambda_f32(s_s0) - _lambda_f32(self.sigmas[i - 1])) / h
            d1 = (_f32(1) / r0) * (x0 - x0_prev)
            if cfg.solver_type == "midpoint":
                out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0 - (_f32(0.5) * (alpha_t * em1)) * d1
            else:
                w1 = _f32(0) if h == 0 else alpha_t * (em1 / h + _f32(1))  # the limit where diffusers has NaN
                out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0 + w1 * d1
        self._remember(i, x0)
        return out.astype(model_output.dtype)

    def step_ops(self, sample: Tensor, model_output: Tensor, i: int) -> Tensor:
        """Step i through runtime.ops on the tensors' device (result in sample's dtype). Keeps this step's x0
        (a tensor in sample's dtype, as diffusers keeps it in the model's dtype) for the next step."""
        order = self.step_order(i)
        a, b = self.x0_coefficients(i)
        x0 = _axpby(sample, a, model_output, b)
        c_s, c_x0, c_prev = self.update_coefficients(i, order)
        out = _axpby(sample, c_s, x0, c_x0)
        if order == 2:
            out = _axpby(out, 1.0, self._prev_x0, c_prev)
        self._remember(i, x0)
        return out
