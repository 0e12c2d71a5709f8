"""Writes tests/fixtures/schedulers_sdxl.npz: diffusers' Euler, Euler ancestral and DPM-Solver++ (2M) schedules and
denoising loops, as an SDXL pipeline runs them.

Run with the reference venv (torch + diffusers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_sdxl_schedulers.py

Configs: SDXL base's published scheduler_config.json (EulerDiscreteScheduler: scaled_linear 0.00085..0.012, leading
spacing, steps_offset 1, epsilon) and variants, each sampler made with `Sampler.from_config(sdxl_config,
**overrides)` as diffusers users switch samplers. Stored:
  train/<schedule>/{betas,alphas_cumprod,sigmas}: the training schedule of each distinct beta setup;
  <group>/{timesteps,sigmas}: the schedules for 1, 2, 10, 25, 30 and 50 steps, concatenated (lengths and
    init_noise_sigma in meta["cases"]), and for custom timesteps / sigmas;
  loop/<case>/...: short float32 denoising loops on a [1, 4, 3, 5] latent with a fake model (fake_model below,
    repeated in the test): x [n + 1, ...] (x[i]: the latents before step i; x[0] is the initial noise times
    init_noise_sigma, x[n] the result), eps [n, ...] (the model outputs), noise [n, ...] (Euler ancestral's
    step noise).
    Initial latents and ancestral noise come from torch.Generator("cpu").manual_seed(seed) (or one per batch
    element), in the pipeline's order: latents first, then one draw per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "schedulers_sdxl.npz"

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
CONFIGS = {
    "sdxl": SDXL,
    # a zero-terminal-SNR v-prediction SDXL fine-tune's setup
    "sdxl_vpred_zsnr": {**SDXL, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                        "timestep_spacing": "trailing"},
    "linear": {"num_train_timesteps": 1000, "beta_schedule": "linear"},  # diffusers' defaults (DDPM)
    "cosine": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
}
CLASSES = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpm": DPMSolverMultistepScheduler}
# (name, class, config, overrides)
SCHEDULES = [
    ("euler/sdxl", "euler", "sdxl", {}),
    ("euler/sdxl_karras", "euler", "sdxl", {"use_karras_sigmas": True}),
    ("euler/sdxl_trailing", "euler", "sdxl", {"timestep_spacing": "trailing"}),
    ("euler/sdxl_linspace", "euler", "sdxl", {"timestep_spacing": "linspace"}),
    ("euler/sdxl_exponential", "euler", "sdxl", {"use_exponential_sigmas": True}),
    ("euler/sdxl_sigma_min", "euler", "sdxl", {"final_sigmas_type": "sigma_min"}),
    ("euler/sdxl_log_linear", "euler", "sdxl", {"interpolation_type": "log_linear"}),
    ("euler/sdxl_karras_bounds", "euler", "sdxl", {"use_karras_sigmas": True, "sigma_min": 0.05,
                                                   "sigma_max": 10.0}),
    ("euler/vpred_zsnr", "euler", "sdxl_vpred_zsnr", {}),
    ("euler/linear", "euler", "linear", {}),
    ("euler/cosine_karras", "euler", "cosine", {"use_karras_sigmas": True}),
    ("euler_a/sdxl", "euler_a", "sdxl", {}),
    ("euler_a/sdxl_trailing", "euler_a", "sdxl", {"timestep_spacing": "trailing"}),
    ("euler_a/sdxl_linspace", "euler_a", "sdxl", {"timestep_spacing": "linspace"}),
    ("euler_a/vpred_zsnr", "euler_a", "sdxl_vpred_zsnr", {}),
    ("dpm/sdxl", "dpm", "sdxl", {}),
    ("dpm/sdxl_karras", "dpm", "sdxl", {"use_karras_sigmas": True}),
    ("dpm/sdxl_trailing", "dpm", "sdxl", {"timestep_spacing": "trailing"}),
    ("dpm/sdxl_linspace", "dpm", "sdxl", {"timestep_spacing": "linspace"}),
    ("dpm/sdxl_exponential", "dpm", "sdxl", {"use_exponential_sigmas": True}),
    ("dpm/sdxl_karras_sigma_min", "dpm", "sdxl", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("dpm/vpred_zsnr_karras", "dpm", "sdxl_vpred_zsnr", {"use_karras_sigmas": True}),
    ("dpm/linear", "dpm", "linear", {}),
    ("dpm/cosine_clipped", "dpm", "cosine", {"lambda_min_clipped": -5.1}),
    ("dpm/cosine_karras", "dpm", "cosine", {"use_karras_sigmas": True}),
]
STEPS = (1, 2, 10, 25, 30, 50)
CUSTOM = [  # (name, class, config, overrides, set_timesteps kwargs)
    ("euler/sdxl/custom_timesteps", "euler", "sdxl", {}, {"timesteps": [999.0, 850.5, 601.0, 300.0, 42.0]}),
    ("euler/sdxl/custom_sigmas", "euler", "sdxl", {}, {"sigmas": [14.6, 7.25, 3.0, 1.1, 0.3, 0.0]}),
    ("dpm/sdxl/custom_timesteps", "dpm", "sdxl", {}, {"timesteps": [999, 800, 600, 350, 120, 10]}),
]
# (name, class, config, overrides, steps, seed(s))
LOOPS = [
    ("euler/sdxl", "euler", "sdxl", {}, 5, 0),
    ("euler/sdxl_karras", "euler", "sdxl", {"use_karras_sigmas": True}, 6, 0),
    ("euler/sdxl_trailing_sigma_min", "euler", "sdxl", {"timestep_spacing": "trailing",
                                                        "final_sigmas_type": "sigma_min"}, 4, 0),
    ("euler/vpred_zsnr", "euler", "sdxl_vpred_zsnr", {}, 4, 0),
    ("euler/sdxl_sample", "euler", "sdxl", {"prediction_type": "sample"}, 4, 0),
    ("euler_a/sdxl", "euler_a", "sdxl", {}, 5, 0),
    ("euler_a/sdxl_linspace", "euler_a", "sdxl", {"timestep_spacing": "linspace"}, 4, 0),
    ("euler_a/vpred_zsnr", "euler_a", "sdxl_vpred_zsnr", {}, 4, 0),
    ("euler_a/sdxl_batch2", "euler_a", "sdxl", {}, 4, [0, 1]),
    ("dpm/sdxl", "dpm", "sdxl", {}, 6, 0),
    ("dpm/sdxl_karras", "dpm", "sdxl", {"use_karras_sigmas": True}, 6, 0),
    ("dpm/sdxl_karras_heun", "dpm", "sdxl", {"use_karras_sigmas": True, "solver_type": "heun"}, 5, 0),
    ("dpm/sdxl_karras_sigma_min_15", "dpm", "sdxl", {"use_karras_sigmas": True,
                                                     "final_sigmas_type": "sigma_min"}, 15, 0),
    ("dpm/sdxl_euler_at_final_15", "dpm", "sdxl", {"final_sigmas_type": "sigma_min",
                                                   "euler_at_final": True}, 15, 0),
    ("dpm/sdxl_order1", "dpm", "sdxl", {"solver_order": 1}, 4, 0),
    ("dpm/vpred_zsnr_karras", "dpm", "sdxl_vpred_zsnr", {"use_karras_sigmas": True}, 5, 0),
    ("dpm/sdxl_sample", "dpm", "sdxl", {"prediction_type": "sample"}, 4, 0),
]
LATENT_SHAPE = (1, 4, 3, 5)  # 60 values: 3 whole blocks of torch's randn and a partial one


def fake_model(x_in: torch.Tensor, t) -> torch.Tensor:
    """A smooth nonlinear stand-in for the UNet: 0.9 tanh(x) + 0.05 t / 1000, float32 (the test repeats it)."""
    return 0.9 * torch.tanh(x_in) + 0.05 * (float(t) / 1000.0)


def make(cls: str, config: str, overrides: dict):
    return CLASSES[cls].from_config(CONFIGS[config], **overrides)


def randn(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """diffusers' randn_tensor with one generator, or a list of one per batch element."""
    return randn_tensor(shape, generator=gens if len(gens) > 1 else gens[0], dtype=torch.float32)


def main() -> None:
    arrays, cases = {}, []
    for name, cfg in CONFIGS.items():  # each config has its own training schedule
        s = EulerDiscreteScheduler.from_config(cfg)
        arrays[f"train/{name}/betas"] = s.betas.numpy()
        arrays[f"train/{name}/alphas_cumprod"] = s.alphas_cumprod.numpy()
        arrays[f"train/{name}/sigmas"] = (((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5).numpy()

    def add(name: str, sched, **case) -> tuple[np.ndarray, np.ndarray]:
        init = sched.init_noise_sigma
        cases.append(dict(name=name, timesteps_dtype=str(sched.timesteps.numpy().dtype), n=len(sched.timesteps),
                          n_sigmas=len(sched.sigmas), init_noise_sigma=float(init), **case))
        return sched.timesteps.numpy(), sched.sigmas.numpy()

    # one array pair per schedule group (all its step counts concatenated): fewer npz entries, a smaller file
    for name, cls, cfg, over in SCHEDULES:
        ts, ss = [], []
        for steps in STEPS:
            sched = make(cls, cfg, over)
            sched.set_timesteps(steps)
            t, sg = add(f"{name}/{steps}", sched, group=name, cls=cls, config=cfg, overrides=over,
                        call={"num_inference_steps": steps})
            ts.append(t)
            ss.append(sg)
        arrays[f"{name}/timesteps"] = np.concatenate(ts)
        arrays[f"{name}/sigmas"] = np.concatenate(ss)
    for name, cls, cfg, over, kw in CUSTOM:
        sched = make(cls, cfg, over)
        sched.set_timesteps(**kw)
        arrays[f"{name}/timesteps"], arrays[f"{name}/sigmas"] = add(name, sched, group=name, cls=cls, config=cfg,
                                                                    overrides=over, call=kw)

    loops = []
    for name, cls, cfg, over, steps, seed in LOOPS:
        sched = make(cls, cfg, over)
        sched.set_timesteps(steps)
        seeds = seed if isinstance(seed, list) else [seed]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (len(seeds),) + LATENT_SHAPE[1:]
        # the pipeline's order: initial latents, then (ancestral) one draw per step from the same generator(s);
        # `replay` repeats the draws to record the noise the scheduler gets
        x = randn(gens, shape) * sched.init_noise_sigma
        replay = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        randn(replay, shape)
        xs, epss, noises = [x.numpy()], [], []
        for t in sched.timesteps:
            eps = fake_model(sched.scale_model_input(x, t), t)
            kw = {"generator": gens if len(gens) > 1 else gens[0]} if cls == "euler_a" else {}
            if cls == "euler_a":
                noises.append(randn(replay, shape).numpy())
            x = sched.step(eps, t, x, return_dict=False, **kw)[0]
            epss.append(eps.numpy())
            xs.append(x.numpy())
        key = f"loop/{name}"
        arrays[f"{key}/x"] = np.stack(xs)
        arrays[f"{key}/eps"] = np.stack(epss)
        if noises:
            arrays[f"{key}/noise"] = np.stack(noises)
        loops.append(dict(name=name, cls=cls, config=cfg, overrides=over, steps=steps, seeds=seeds))

    import diffusers

    meta = dict(generator="tests/reference/gen_sdxl_schedulers.py", diffusers=diffusers.__version__,
                torch=torch.__version__, numpy=np.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                configs=CONFIGS, cases=cases, loops=loops, latent_shape=LATENT_SHAPE)
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} schedules, {len(loops)} loops)")


if __name__ == "__main__":
    main()
