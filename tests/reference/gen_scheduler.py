"""Writes tests/fixtures/scheduler_flow_match.npz: diffusers' FlowMatchEulerDiscreteScheduler schedules and steps.

Run with the reference venv (torch + diffusers), from the repo root:
    .venv-ref/bin/python tests/reference/gen_scheduler.py

Configs are the published scheduler_config.json of FLUX.1-dev, FLUX.1-schnell, SD3/SD3.5 and Qwen-Image, plus
variants for the options those leave off (karras / exponential sigmas, invert_sigmas, linear time shift).
Schedules are set the way the pipelines set them:
  flux: FluxPipeline's sigmas = linspace(1, 1/steps, steps) and mu = calculate_shift(image_seq_len, ...),
        for steps in {1, 4, 28, 50} and image_seq_len in {256, 1024, 4096};
  sd3:  set_timesteps(steps) (the scheduler's own float64 linspace), and custom sigmas / timesteps.
Steps: a few denoising loops of diffusers' scheduler.step on fixed random samples and velocities, float32 and
bfloat16 (bf16 stored as raw uint16 bits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "scheduler_flow_match.npz"

CONFIGS = {
    "flux_dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                 "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "flux_schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                     "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
            "num_train_timesteps": 1000, "shift": 3.0},
    "qwen_image": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
                   "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                   "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                   "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                   "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False},
    "sd3_karras": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_karras_sigmas": True},
    "sd3_exponential": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                        "shift": 2.5, "use_exponential_sigmas": True},
    "sd3_inverted": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                     "invert_sigmas": True},
    "dynamic_linear": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                       "shift": 1.0, "use_dynamic_shifting": True, "time_shift_type": "linear",
                       "base_shift": 0.95, "max_shift": 2.05},
}
FLUX_STYLE = ("flux_dev", "flux_schnell", "qwen_image", "dynamic_linear")
STEPS = (1, 4, 28, 50)
SEQ_LENS = (256, 1024, 4096)


def flux_schedule(sched: FlowMatchEulerDiscreteScheduler, steps: int, seq: int) -> float:
    """FluxPipeline.__call__, section 'Prepare timesteps' (the pipeline's own helpers)."""
    cfg = sched.config
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return mu


def bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def main() -> None:
    arrays, cases = {}, []

    def add(name: str, config: str, call: dict, sched: FlowMatchEulerDiscreteScheduler, **extra) -> None:
        arrays[f"{name}/sigmas"] = sched.sigmas.numpy()
        arrays[f"{name}/timesteps"] = sched.timesteps.numpy()
        cases.append(dict(name=name, config=config, call=call, **extra))

    for cname, cfg in CONFIGS.items():
        make = lambda cfg=cfg: FlowMatchEulerDiscreteScheduler.from_config(cfg)  # noqa: E731
        if cname in FLUX_STYLE:
            for steps in STEPS:
                for seq in SEQ_LENS:
                    sched = make()
                    mu = flux_schedule(sched, steps, seq)
                    add(f"{cname}/flux/{steps}/{seq}", cname, dict(kind="flux", steps=steps, image_seq_len=seq),
                        sched, mu=mu)
        else:
            for steps in STEPS:
                sched = make()
                retrieve_timesteps(sched, steps, "cpu")
                add(f"{cname}/steps/{steps}", cname, dict(kind="steps", steps=steps), sched)
    # custom sigmas / timesteps through set_timesteps
    custom_sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    for cname in ("sd3", "flux_dev"):
        sched = FlowMatchEulerDiscreteScheduler.from_config(CONFIGS[cname])
        kw = {"mu": 0.8} if CONFIGS[cname].get("use_dynamic_shifting") else {}
        sched.set_timesteps(sigmas=custom_sigmas, **kw)
        add(f"{cname}/custom_sigmas", cname, dict(kind="custom", sigmas=custom_sigmas, **kw), sched)
    custom_t = [999.0, 750.5, 500.0, 120.25]
    sched = FlowMatchEulerDiscreteScheduler.from_config(CONFIGS["sd3"])
    sched.set_timesteps(timesteps=custom_t)
    add("sd3/custom_timesteps", "sd3", dict(kind="custom", timesteps=custom_t), sched)

    # denoising loops: x <- step(v, t, x) with fixed velocities
    gen = torch.Generator("cpu").manual_seed(0)
    for cname, steps, seq, dtype in (("flux_dev", 4, 1024, torch.bfloat16), ("flux_dev", 4, 4096, torch.float32),
                                     ("flux_schnell", 4, 4096, torch.bfloat16), ("sd3", 5, None, torch.float32),
                                     ("qwen_image", 6, 1024, torch.bfloat16)):
        sched = FlowMatchEulerDiscreteScheduler.from_config(CONFIGS[cname])
        if seq is None:
            retrieve_timesteps(sched, steps, "cpu")
        else:
            flux_schedule(sched, steps, seq)
        name = f"loop/{cname}/{steps}/{seq}/{str(dtype)[6:]}"
        x = torch.randn(1, 13, 24, generator=gen).to(dtype)
        arrays[f"{name}/x0"] = bits(x)
        for i, t in enumerate(sched.timesteps):
            v = (torch.randn(1, 13, 24, generator=gen) * 1.5).to(dtype)
            x = sched.step(v, t, x, return_dict=False)[0]
            arrays[f"{name}/v{i}"] = bits(v)
            arrays[f"{name}/x{i + 1}"] = bits(x)
        cases.append(dict(name=name, config=cname, call=dict(kind="loop", steps=steps, image_seq_len=seq),
                          dtype=str(dtype)[6:]))

    import diffusers

    meta = dict(generator="tests/reference/gen_scheduler.py", diffusers=diffusers.__version__,
                torch=torch.__version__, numpy=np.__version__, configs=CONFIGS, cases=cases)
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
