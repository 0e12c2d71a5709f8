"""safetensors -> GPU: the staged upload gives the same bytes as the CPU load, also with a tiny staging ring that
recycles every buffer many times, and converts dtypes on the device exactly as numpy does."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import dtypes
from fastdm.runtime.errors import SafetensorsError
from fastdm.runtime.safetensors import load, open_checkpoint, save, save_sharded
from fastdm.runtime.safetensors import upload as upload_mod

pytestmark = pytest.mark.gpu

MB = 1 << 20


def random_bits(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Every bit pattern (NaNs included): the upload must move bytes, not values."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    flat = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(*flat)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """About 300 MB in 3 shards: bf16 matrices of odd shapes, fp32 biases, fp8, ints, bools, a 0-d and an empty
    tensor, and one 41 MB tensor bigger than a staging chunk."""
    rng = np.random.default_rng(0)
    t = {}
    for i in range(24):
        t[f"blocks.{i}.ff.weight"] = random_bits(rng, ml_dtypes.bfloat16, (3072 + i, 1531))
        t[f"blocks.{i}.ff.bias"] = random_bits(rng, np.float32, (3072 + i,))
        t[f"blocks.{i}.norm.weight"] = random_bits(rng, np.float16, (129,))
        t[f"blocks.{i}.q.scale"] = random_bits(rng, ml_dtypes.float8_e4m3fn, (7, 3))
    t["embed.weight"] = random_bits(rng, np.float32, (10007, 1031))  # 41 MB
    t["position_ids"] = np.arange(77, dtype=np.int64)[None]
    t["mask"] = rng.integers(0, 2, (5, 9)).astype(np.bool_)
    t["logit_scale"] = np.array(4.6052, dtype=np.float32)
    t["empty"] = np.zeros((0, 64), ml_dtypes.bfloat16)
    t["bytes"] = random_bits(rng, np.uint8, (1001,))
    folder = tmp_path_factory.mktemp("big")
    save_sharded(t, folder, max_shard_bytes=120 * MB)
    return folder, t


def check_equal(out: dict, ref: dict) -> None:
    assert set(out) == set(ref)
    for name, arr in ref.items():
        got = out[name]
        assert got.is_cuda, name
        assert got.shape == arr.shape and got.dtype == dtypes.dtype(arr.dtype), name
        assert same_bytes(got.numpy(), arr), name


def test_cuda_load_equals_cpu_load(big_checkpoint):
    folder, ref = big_checkpoint
    assert len(open_checkpoint(folder).files) == 3
    gpu = load(folder, device="cuda")
    cpu = load(folder, device="cpu")
    assert list(gpu) == list(cpu)
    check_equal(gpu, ref)
    for name in ref:
        assert same_bytes(gpu[name].numpy(), cpu[name].numpy()), name


@pytest.mark.parametrize("one_allocation", [False, True])
def test_cuda_load_with_tiny_staging_ring(big_checkpoint, one_allocation):
    folder, ref = big_checkpoint
    cfg = upload_mod.CONFIG
    saved = (cfg.chunk_bytes, cfg.buffers, cfg.threads, cfg.one_allocation)
    try:
        # 1 MB chunks, 3 buffers, 5 readers: every buffer is reused ~90 times and readers wait on copies.
        cfg.chunk_bytes, cfg.buffers, cfg.threads, cfg.one_allocation = MB + 4097, 3, 5, one_allocation
        names = ["mask", "embed.weight", "blocks.5.ff.weight", "empty", "logit_scale", "blocks.23.q.scale"]
        out = load(folder, device="cuda", names=names)
        assert list(out) == names
        check_equal(out, {n: ref[n] for n in names})
        check_equal(load(folder, device="cuda:0"), ref)
    finally:
        cfg.chunk_bytes, cfg.buffers, cfg.threads, cfg.one_allocation = saved
        upload_mod.free_staging_buffers()


def test_cuda_dtype_conversion_on_load(tmp_path):
    from fastdm.runtime import cuda, memory

    rng = np.random.default_rng(1)
    src = {
        "w32": (rng.standard_normal((515, 259)) * 3).astype(np.float32),
        "w16": rng.standard_normal((33, 65)).astype(np.float16),
        "wbf": rng.standard_normal((1025,)).astype(ml_dtypes.bfloat16),
        "big32": rng.standard_normal((3000, 2001)).astype(np.float32),  # 24 MB: several chunks
        "ids": rng.integers(-5, 5, (11,)).astype(np.int64),
        "mask": rng.integers(0, 2, (13,)).astype(np.bool_),
        "s": np.array(-0.3, np.float32),
        "e": np.zeros((0, 3), np.float32),
    }
    save(src, tmp_path / "m.safetensors")
    saved = upload_mod.CONFIG.chunk_bytes
    try:
        upload_mod.CONFIG.chunk_bytes = 4 * MB + 3
        load(tmp_path / "m.safetensors", device="cuda", dtype=dtypes.bfloat16)  # lazy one-time allocations
        for target in (dtypes.bfloat16, dtypes.float16, dtypes.float32):
            cuda.current_stream().synchronize()
            base = memory.memory_stats().current
            out = load(tmp_path / "m.safetensors", device="cuda", dtype=target)
            cuda.current_stream().synchronize()
            for name, arr in src.items():
                want = arr.astype(target.np) if dtypes.dtype(arr.dtype).is_floating else arr
                got = out[name]
                assert got.is_cuda and got.shape == arr.shape and got.dtype == dtypes.dtype(want.dtype), name
                assert same_bytes(got.numpy(), want), (target, name)
            # The file-dtype temporaries are gone: only the outputs are held.
            assert memory.memory_stats().current - base == sum(t.nbytes for t in out.values())
            del out
    finally:
        upload_mod.CONFIG.chunk_bytes = saved


def test_cuda_load_error_midway_then_recovers(tmp_path):
    rng = np.random.default_rng(2)
    t = {f"w{i}": random_bits(rng, ml_dtypes.bfloat16, (1024, 1023)) for i in range(12)}
    save_sharded(t, tmp_path, max_shard_bytes=8 * MB)
    ck = open_checkpoint(tmp_path)
    victim = ck.files[-1]
    with open(victim, "r+b") as f:  # truncated after the header was validated
        f.truncate(os.path.getsize(victim) - 4096)
    with pytest.raises(SafetensorsError, match=os.path.basename(victim)):
        load(ck, device="cuda")
    ck.close()
    # The staging ring and reader threads were released: the next load works.
    save(t, tmp_path / "whole.safetensors")
    check_equal(load(tmp_path / "whole.safetensors", device="cuda"), t)
