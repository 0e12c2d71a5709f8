"""GEMM tuning on a Hopper GPU (runtime/ops/cuda/gemm_tuning.py, scripts/tune_gemm.py's machinery): measuring
configurations, recording a winner in the cache and in the library (fdm_gemm_sm90_set_tuned), a later process
loading it, and the library refusing a tuned configuration that cannot run the problem."""


import numpy as np
import pytest
from fastdm.runtime import cuda
from fastdm.runtime.errors import CudaError
from fastdm.runtime.ops import cpu
from gpu_ops import gpu, oc, rand
from numerics import TOL, rel_l2

from fastdm import kernels

pytestmark = pytest.mark.gpu


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The tuning module with its cache in tmp_path; the library's tuned choices forgotten before and after."""
    if cuda.Device(0).compute_capability != (9, 0) or not kernels.library().fdm_has_sm90():
        pytest.skip("needs a compute capability 9.0 GPU and a kernel library built for sm_90a")
    from fastdm.runtime.ops.cuda import gemm_tuning

    monkeypatch.setenv("FASTDM_GEMM_TUNING", str(tmp_path / "gemm.json"))
    monkeypatch.setattr(gemm_tuning, "_loaded", set())
    kernels.call("fdm_gemm_sm90_clear_tuned")
    yield gemm_tuning
    kernels.call("fdm_gemm_sm90_clear_tuned")


def auto_config(m, n, k, gated=False):
    dev = cuda.Device(0)
    return kernels.library().fdm_gemm_sm90_auto_config(m, n, k, int(gated), dev.multiprocessor_count,
                                                       dev.l2_cache_size >> 20)


def test_measure_times_the_library_choice_and_others(tuning):
    p = tuning.Problem(1024, 1536, 512)
    r = tuning.measure(p, cuda.Device(0), reps=3, batches=2, configs=[9, 12])
    assert r.auto_config == auto_config(1024, 1536, 512)
    assert 0 < r.best_ms <= r.auto_ms
    assert r.best_config in (r.auto_config, 9, 12)


def test_recorded_winner_runs_and_is_loaded_again(tuning, rng):
    m, n, k = 520, 1024, 768
    table = auto_config(m, n, k)
    other = 12 if table != 12 else 9
    fake = tuning.Measured(tuning.Problem(m, n, k), table, 1.0, other, 0.5)
    path = tuning.cache_path()
    assert tuning.record([fake], cuda.Device(0), path) == 1
    assert auto_config(m, n, k) == other
    entry = tuning.read_cache(path)["cards"][tuning.card_key(cuda.Device(0))][f"{m}x{n}x{k}"]
    assert entry["config"] == other

    x, w = rand(rng, "bfloat16", m, k), rand(rng, "bfloat16", n, k, scale=k ** -0.5)
    y = oc().linear(gpu(x), gpu(w))
    assert kernels.library().fdm_gemm_sm90_last_config() == other
    assert rel_l2(y.numpy().astype(np.float32), cpu.linear(x, w)) < TOL["bfloat16"]

    # A new process: the library knows nothing until the first linear loads the cache.
    kernels.call("fdm_gemm_sm90_clear_tuned")
    tuning._loaded.clear()
    assert auto_config(m, n, k) == table
    oc().linear(gpu(x), gpu(w))
    assert auto_config(m, n, k) == other

    # No longer faster: recording drops the entry.
    slower = tuning.Measured(tuning.Problem(m, n, k), table, 1.0, other, 0.99)
    assert tuning.record([slower], cuda.Device(0), path) == 0
    assert f"{m}x{n}x{k}" not in tuning.read_cache(path)["cards"][tuning.card_key(cuda.Device(0))]


def test_library_refuses_a_gated_choice_without_c(tuning):
    names = kernels.sm90_config_names()
    lean = next(i for i, name in enumerate(names) if "lean" in name)
    with pytest.raises(CudaError, match="cannot run a gated residual"):
        kernels.call("fdm_gemm_sm90_set_tuned", 512, 512, 512, 1, lean)
    with pytest.raises(CudaError, match="does not exist"):
        kernels.call("fdm_gemm_sm90_set_tuned", 512, 512, 512, 0, 999)
