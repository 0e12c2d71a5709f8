"""models/noise.py against torch's CPU generator (fixtures from tests/reference/gen_noise.py), bit for bit."""

from __future__ import annotations

import hashlib
import json
import platform
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fastdm.models import noise
from fastdm.models.noise import TorchCPUGenerator
from fastdm.runtime.errors import UnsupportedDtypeError

FIXTURE = Path(__file__).parent / "fixtures" / "noise_torch_cpu.npz"


def _load():
    z = np.load(FIXTURE)
    return z, json.loads(str(z["meta"]))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def _same_libm(kmeta: dict) -> bool:
    """Results that go through the C library's log/sin/cos are exact only on the libc the fixture was made with."""
    return list(platform.libc_ver()) == kmeta["libc"] and platform.machine() == kmeta["machine"]


def _programs():
    _, meta = _load()
    out = []
    for kernel, kmeta in meta["kernels"].items():
        by_prog: dict = {}
        for e in kmeta["entries"]:
            by_prog.setdefault((e["seed"], e["mode"]), []).append(e)
        for (seed, mode), entries in by_prog.items():
            out.append(pytest.param(kernel, seed, mode, entries, id=f"{kernel}-{seed}-{mode}"))
    return out


def _check(got: np.ndarray, entry: dict, z, exact: bool) -> None:
    key = entry["key"]
    want = z[key]
    assert list(got.shape) == entry["shape"], key
    flat = _bits(got).reshape(-1)
    sampled = entry["stored"] == "sampled"
    if exact:
        if sampled:
            np.testing.assert_array_equal(flat[z[key + "/index"]], want, err_msg=key)
        else:
            np.testing.assert_array_equal(flat, want.reshape(-1), err_msg=key)
        assert hashlib.sha256(np.ascontiguousarray(flat).tobytes()).hexdigest() == entry["sha256"], key
    else:
        # another libc: its log/sin/cos may round the odd value the other way, never by more than that
        vals = got.astype(np.float32).reshape(-1)
        if sampled:
            vals = vals[z[key + "/index"]]
        dt = ml_dtypes.bfloat16 if entry["dtype"] == "bfloat16" else np.dtype(entry["dtype"])
        ref = (want.view(ml_dtypes.bfloat16) if dt == ml_dtypes.bfloat16 else want).astype(np.float32).reshape(-1)
        spacing = np.abs(np.spacing(ref.astype(dt)).astype(np.float32))
        assert np.all(np.abs(vals - ref) <= 2 * spacing + 1e-6), key
        assert np.mean(vals == ref) > 0.99, key


@pytest.mark.parametrize("kernel,seed,mode,entries", _programs())
def test_matches_torch(kernel, seed, mode, entries):
    z, meta = _load()
    same_libm = _same_libm(meta["kernels"][kernel])
    gen = TorchCPUGenerator(seed, kernel=kernel)
    for e in entries:
        if mode == "fresh":
            gen.manual_seed(seed)
        if e["op"] == "seed":
            gen.manual_seed(seed)
            continue
        if e["op"] == "rand":
            got = gen.rand(e["shape"])
        else:
            got = gen.randn(e["shape"], dtype=e["dtype"])
        numel = int(np.prod(e["shape"]))
        # the avx2 kernel is plain float32 arithmetic (exact anywhere); the rest calls the C library
        uses_libm = e["op"] == "randn" and (kernel == "default" or numel < 16)
        _check(got, e, z, exact=same_libm or not uses_libm)


def test_fixture_covers_both_kernels_and_seeds():
    _, meta = _load()
    assert set(meta["kernels"]) == {"avx2", "default"}
    seeds = {e["seed"] for e in meta["kernels"]["avx2"]["entries"]}
    assert seeds == {0, 42, 2**32 + 5}


def test_seed_is_taken_mod_2_32_like_torch():
    a = TorchCPUGenerator(5).randn([40])
    b = TorchCPUGenerator(2**32 + 5).randn([40])
    np.testing.assert_array_equal(a, b)
    assert TorchCPUGenerator(-1).initial_seed() == 2**64 - 1
    np.testing.assert_array_equal(TorchCPUGenerator(-1).randn(20), TorchCPUGenerator(2**64 - 1).randn(20))


def test_state_advances_across_calls():
    g = TorchCPUGenerator(7)
    a, b = g.randn([64]), g.randn([64])
    assert not np.array_equal(a, b)
    # 64 float32 uniforms consumed by the first call: a fresh generator that skips them gives the second result
    h = TorchCPUGenerator(7)
    h.rand([64])
    np.testing.assert_array_equal(h.randn([64]), b)


def test_small_draws_use_the_cached_pair_value():
    g = TorchCPUGenerator(3)
    one = [g.randn([1])[0] for _ in range(4)]
    np.testing.assert_array_equal(np.array(one, np.float32), TorchCPUGenerator(3).randn([4]))


def test_helper_and_empty():
    np.testing.assert_array_equal(noise.randn([2, 9], seed=11), TorchCPUGenerator(11).randn([2, 9]))
    assert noise.randn([0, 4], seed=1).shape == (0, 4)
    out = noise.randn([3, 17], seed=1, dtype="bf16")
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (3, 17)


def test_statistics_are_standard_normal():
    x = TorchCPUGenerator(1234).randn([1 << 18]).astype(np.float64)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert np.all(np.isfinite(x))


def test_user_errors():
    with pytest.raises(ValueError, match="kernel"):
        TorchCPUGenerator(0, kernel="avx512")
    with pytest.raises(ValueError, match="seed"):
        TorchCPUGenerator(2**64)
    with pytest.raises(UnsupportedDtypeError):
        TorchCPUGenerator(0).randn([4], dtype="int32")
    with pytest.raises(ValueError, match="negative"):
        TorchCPUGenerator(0).randn([2, -1])


def _round_f32(v: Fraction) -> np.float32:
    """Correctly rounded (ties to even) float32 of an exact rational."""
    c = np.float32(float(v))
    best = None
    for cand in (np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))):
        d = abs(Fraction(float(cand)) - v)
        key = (d, int(np.array(cand).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


def test_fma_is_single_rounding():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(300) * 3).astype(np.float32)
    b = (rng.standard_normal(300) * 3).astype(np.float32)
    c = (rng.standard_normal(300) * np.exp2(rng.integers(-60, 5, 300))).astype(np.float32)
    # a*b is exactly a float32 halfway point (1 + 2**-24) and c nudges it: double rounding would go wrong
    a = np.append(a, [np.float32(24929 / 2**15)] * 2)
    b = np.append(b, [np.float32(673 / 2**9)] * 2)
    c = np.append(c, [np.float32(2.0**-70), np.float32(-(2.0**-70))])
    got = noise._fma(a, b, c)
    want = np.array([_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(w)))
                     for x, y, w in zip(a, b, c, strict=True)], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[-2] == np.float32(1 + 2.0**-23) and got[-1] == np.float32(1.0)
