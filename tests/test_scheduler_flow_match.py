"""models/schedulers/flow_match_euler.py against diffusers' FlowMatchEulerDiscreteScheduler (fixtures from
tests/reference/gen_scheduler.py): sigmas and timesteps bit for bit, and whole denoising loops."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fastdm.models.schedulers import (
    FlowMatchEulerScheduler,
    calculate_shift,
    flux_timesteps,
    scheduler_from_config,
)
from fastdm.runtime.errors import ModelLayoutError

FIXTURE = Path(__file__).parent / "fixtures" / "scheduler_flow_match.npz"


def _load():
    z = np.load(FIXTURE)
    return z, json.loads(str(z["meta"]))


def _cases(kind_filter):
    _, meta = _load()
    return [pytest.param(c, id=c["name"]) for c in meta["cases"] if kind_filter(c["call"]["kind"])]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _set(sched: FlowMatchEulerScheduler, call: dict) -> None:
    if call["kind"] in ("flux", "loop") and call.get("image_seq_len") is not None:
        flux_timesteps(sched, call["steps"], call["image_seq_len"])
    elif call["kind"] in ("steps", "loop"):
        sched.set_timesteps(call["steps"])
    else:
        sched.set_timesteps(sigmas=call.get("sigmas"), timesteps=call.get("timesteps"), mu=call.get("mu"))


@pytest.mark.parametrize("case", _cases(lambda k: k != "loop"))
def test_schedule_matches_diffusers(case):
    z, meta = _load()
    sched = scheduler_from_config(meta["configs"][case["config"]])
    want_s, want_t = z[case["name"] + "/sigmas"], z[case["name"] + "/timesteps"]
    if np.isnan(want_s).any():  # diffusers divides by zero (shift_terminal with one step); fastdm says so
        with pytest.raises(ValueError, match="shift_terminal"):
            _set(sched, case["call"])
        return
    _set(sched, case["call"])
    assert _same_bits(sched.sigmas, want_s), (sched.sigmas, want_s)
    assert _same_bits(sched.timesteps, want_t), (sched.timesteps, want_t)
    assert sched.num_inference_steps == len(want_t)
    if "mu" in case:
        cfg = sched.config
        mu = calculate_shift(case["call"]["image_seq_len"], cfg.base_image_seq_len, cfg.max_image_seq_len,
                             cfg.base_shift, cfg.max_shift)
        assert mu == case["mu"]


def _arr(z, key: str, dtype: str) -> np.ndarray:
    a = z[key]
    return a.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else a


@pytest.mark.parametrize("case", _cases(lambda k: k == "loop"))
def test_denoising_loop_matches_diffusers(case):
    z, meta = _load()
    sched = scheduler_from_config(meta["configs"][case["config"]])
    _set(sched, case["call"])
    name, dtype = case["name"], case["dtype"]
    x = _arr(z, f"{name}/x0", dtype)
    for i in range(sched.num_inference_steps):
        x = sched.step(x, _arr(z, f"{name}/v{i}", dtype), i)
        want = _arr(z, f"{name}/x{i + 1}", dtype)
        assert x.dtype == want.dtype
        np.testing.assert_array_equal(x.view(np.uint8), want.view(np.uint8), err_msg=f"{name} step {i}")


def test_step_coefficient_is_the_float32_sigma_difference():
    sched = FlowMatchEulerScheduler({"shift": 3.0, "use_dynamic_shifting": True})
    flux_timesteps(sched, 28, 4096)
    dts = [sched.step_coefficient(i) for i in range(28)]
    assert all(dt < 0 for dt in dts)
    assert sum(dts) == pytest.approx(-1.0, abs=1e-6)
    assert dts[3] == float(np.float32(sched.sigmas[4]) - np.float32(sched.sigmas[3]))
    # the device step x + dt * v in float32 equals the host reference step for float32 tensors
    rng = np.random.default_rng(1)
    x, v = rng.standard_normal((3, 11)).astype(np.float32), rng.standard_normal((3, 11)).astype(np.float32)
    np.testing.assert_array_equal(sched.step(x, v, 3), x + np.float32(dts[3]) * v)
    # diffusers casts dt to the velocity's dtype before multiplying
    dt_bf16 = sched.step_coefficient(3, "bfloat16")
    assert dt_bf16 == float(np.float32(dts[3]).astype(ml_dtypes.bfloat16)) and dt_bf16 != dts[3]
    assert sched.step_coefficient(3, np.float32) == dts[3]


def test_config_from_folder(tmp_path):
    z, meta = _load()
    folder = tmp_path / "FLUX.1-dev" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(meta["configs"]["flux_dev"]))
    for src in (tmp_path / "FLUX.1-dev", folder, folder / "scheduler_config.json"):
        sched = scheduler_from_config(src)
        flux_timesteps(sched, 4, 1024)
        assert _same_bits(sched.sigmas, z["flux_dev/flux/4/1024/sigmas"])
    with pytest.raises(ModelLayoutError, match="scheduler_config.json"):
        scheduler_from_config(tmp_path)


def test_user_errors():
    with pytest.raises(ModelLayoutError, match="not one fastdm implements"):
        scheduler_from_config({"_class_name": "DDIMScheduler"})
    with pytest.raises(ModelLayoutError, match="use_beta_sigmas"):
        FlowMatchEulerScheduler({"use_beta_sigmas": True})
    with pytest.raises(ModelLayoutError, match="stochastic_sampling"):
        FlowMatchEulerScheduler({"stochastic_sampling": True})
    dyn = FlowMatchEulerScheduler({"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="mu"):
        dyn.set_timesteps(4)
    with pytest.raises(ValueError, match="set_timesteps"):
        dyn.step_coefficient(0)
    flux_timesteps(dyn, 4, 256)
    with pytest.raises(ValueError, match="outside the schedule"):
        dyn.step_coefficient(4)
    with pytest.raises(ValueError, match="same length"):
        dyn.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0], mu=1.0)
    with pytest.raises(ValueError, match="at least 1"):
        flux_timesteps(dyn, 0, 256)
