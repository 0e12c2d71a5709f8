"""Euler ancestral sampler: diffusers' EulerAncestralDiscreteScheduler ("Euler a").

Each step goes down to sigma_down with an Euler step and adds fresh noise of standard deviation sigma_up, where
sigma_up^2 + sigma_down^2 = sigma_next^2:

    sigma_up   = sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2),   sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_next     = x + (sigma_down - sigma) * eps + sigma_up * noise           (epsilon prediction)

The noise is `randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)` in diffusers, drawn
once per step (also at the last step, where sigma_up is 0) from the pipeline's generator, after the initial latents.
`draw_noise` reproduces that call with models.noise.TorchCPUGenerator, so a seeded CPU generator gives diffusers'
noise sequence bit for bit (a list of generators draws one batch element from each, as diffusers does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...runtime import dtypes
from ...runtime.errors import InvalidArgumentError
from ...runtime.tensor import Tensor
from ..noise import TorchCPUGenerator
from .discrete_sigmas import DiscreteConfig, interp_sigmas, spaced_timesteps
from .euler_discrete import SigmaInputScheduler, _axpby, _denoised, _euler_coefficients

_f32 = np.float32
Generator = TorchCPUGenerator | Sequence[TorchCPUGenerator]


@dataclasses.dataclass
class EulerAncestralConfig(DiscreteConfig):
    """diffusers' EulerAncestralDiscreteScheduler config fields (all shared with the other DDPM samplers)."""


class EulerAncestralDiscreteScheduler(SigmaInputScheduler):
    """Euler ancestral sampler. After `set_timesteps`: `timesteps` [n] float32, `sigmas` [n + 1] float32 (last 0)."""

    config_class = EulerAncestralConfig

    def __init__(self, config: EulerAncestralConfig | Mapping[str, Any] | None = None):
        super().__init__(config)
        self._own_generator: TorchCPUGenerator | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Compute the schedule for `num_inference_steps` steps (diffusers' set_timesteps)."""
        t = spaced_timesteps(self.config, num_inference_steps)
        s = interp_sigmas(t, self.train.sigmas)
        self.num_inference_steps = num_inference_steps
        self.timesteps = t
        self.sigmas = np.concatenate([s, [0.0]]).astype(_f32)


    # ---------------------------------------------------------------------------------------------------- step
    def sigma_up_down(self, i: int) -> tuple[np.float32, np.float32]:
        """(sigma_up, sigma_down) of step i, float32 in diffusers' order of operations."""
        self._check_index(i)
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        to2, from2 = s_to * s_to, s_from * s_from
        up = np.sqrt(to2 * (from2 - to2) / from2)
        down = np.sqrt(to2 - up * up)
        return up, down

    def step_coefficients(self, i: int) -> tuple[float, float, float]:
        """(a, b, c) with x_next = a * x + b * model_output + c * noise at step i (c = sigma_up)."""
        up, down = self.sigma_up_down(i)
        sigma = self.sigmas[i]
        a, b = _euler_coefficients(self.config.prediction_type, float(sigma), float(down - sigma))
        return a, b, float(up)

    def draw_noise(self, shape: Sequence[int], dtype: dtypes.DType | str = "float32",
                   generator: Generator | None = None) -> np.ndarray:
        """The step's noise as diffusers' randn_tensor draws it: from `generator` (a TorchCPUGenerator, or a list
        with one per batch element), or without one from a randomly seeded generator of this scheduler."""
        shape = tuple(int(d) for d in shape)
        if generator is None:
            if self._own_generator is None:
                self._own_generator = TorchCPUGenerator(int(np.random.SeedSequence().generate_state(1)[0]))
            generator = self._own_generator
        if isinstance(generator, TorchCPUGenerator):
            return generator.randn(shape, dtype=dtype)
        gens = list(generator)
        if len(gens) == 1:
            return gens[0].randn(shape, dtype=dtype)
        if len(gens) != shape[0]:
            raise InvalidArgumentError(f"got {len(gens)} generators for a batch of {shape[0]}: pass one generator "
                                       "or one per batch element")
        return np.concatenate([g.randn((1,) + shape[1:], dtype=dtype) for g in gens], axis=0)

    def step(self, sample: np.ndarray, model_output: np.ndarray, i: int,
             generator: Generator | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """Step i on the host, as diffusers computes it, drawing the noise from `generator` unless `noise` is
        given. sample, model_output: [...] numpy; the result has the model output's dtype. Exact order of float32
        operations for float32 inputs; for float16 / bfloat16 ones diffusers also rounds some intermediate
        products to that dtype, which this reference does not."""
        up, down = self.sigma_up_down(i)
        sigma = self.sigmas[i]
        if noise is None:
            noise = self.draw_noise(model_output.shape, model_output.dtype, generator)
        x = sample.astype(_f32)
        denoised = _denoised(self.config.prediction_type, x, model_output.astype(_f32), sigma)
        derivative = (x - denoised) / sigma
        prev = x + derivative * (down - sigma)
        prev = prev + noise.astype(_f32) * up
        return prev.astype(model_output.dtype)

    def step_ops(self, sample: Tensor, model_output: Tensor, i: int,
                 generator: Generator | None = None) -> Tensor:
        """Step i through runtime.ops on the tensors' device; the noise is drawn on the host (as diffusers draws
        it with a CPU generator) in the model output's dtype and uploaded."""
        a, b, c = self.step_coefficients(i)
        noise = self.draw_noise(model_output.shape, model_output.dtype, generator)
        noise_t = Tensor.from_numpy(noise, device=sample.device)
        return _axpby(_axpby(sample, a, model_output, b), 1.0, noise_t, c)
