"""ops.add_group_stats and group_norm(stats=) on the CPU backend: the reference the GPU kernels are tested against,
and the checks that keep the statistics tied to the one tensor they describe (tests/test_ops_cuda_add_group_stats.py
runs the kernels)."""


import numpy as np
import pytest
from fastdm.runtime import ops
from fastdm.runtime.errors import ShapeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import randn


@pytest.mark.parametrize("shape,groups,b_shape", [((2, 5, 7, 24), 6, (2, 5, 7, 24)), ((2, 5, 7, 24), 6, (2, 1, 1, 24)),
                                                  ((3, 40, 12), 4, (3, 1, 12))])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_stats_give_group_norm_of_the_sum(rng, shape, groups, b_shape, activation):
    a, b = randn(rng, *shape, scale=2.0) + 0.5, randn(rng, *b_shape)
    w, bias = randn(rng, shape[-1]) + 1.0, randn(rng, shape[-1])
    out, stats = cpu.add_group_stats(a, b, num_groups=groups, alpha=0.5)
    assert np.array_equal(out, cpu.add(a, b, 0.5))
    y = cpu.group_norm(out, w, bias, num_groups=groups, activation=activation, channels_last=True, stats=stats)
    ref = cpu.group_norm(out, w, bias, num_groups=groups, activation=activation, channels_last=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_stats_are_used(rng):
    """group_norm normalizes with the moments it is given, not with x's own: the stats of one tensor applied to
    another shift and scale it by those."""
    a = randn(rng, 2, 4, 4, 8)
    _, stats = cpu.add_group_stats(a, np.zeros_like(a), num_groups=2)
    y = cpu.group_norm(2.0 * a + 1.0, num_groups=2, eps=0.0, channels_last=True, stats=stats)
    # (2a + 1 - mean) / std = 2 (a - mean) / std + (1 + mean) / std, per (sample, group); channels 0-3 group 0
    mean = np.repeat(stats.mean, 4, axis=1)[:, None, None, :]
    std = np.sqrt(np.repeat(stats.var, 4, axis=1))[:, None, None, :]
    ref = 2.0 * cpu.group_norm(a, num_groups=2, eps=0.0, channels_last=True) + (1.0 + mean) / std
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_through_ops(rng):
    a = Tensor.from_numpy(randn(rng, 2, 3, 3, 16))
    t = Tensor.from_numpy(randn(rng, 2, 1, 1, 16))
    out, stats = ops.add_group_stats(a, t, 4)
    assert stats.of is out and stats.num_groups == 4
    y = ops.group_norm(out, 4, activation="silu", channels_last=True, stats=stats)
    ref = ops.group_norm(ops.add(a, t), 4, activation="silu", channels_last=True)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_rejects_bad_input(rng):
    a = Tensor.from_numpy(randn(rng, 2, 3, 3, 16))
    with pytest.raises(ShapeError, match="one row a sample"):
        ops.add_group_stats(a, Tensor.from_numpy(randn(rng, 16)), 4)
    with pytest.raises(ShapeError, match="groups"):
        ops.add_group_stats(a, a, 5)
    out, stats = ops.add_group_stats(a, a, 4)
    with pytest.raises(ShapeError, match="another tensor"):
        ops.group_norm(a, 4, channels_last=True, stats=stats)
    with pytest.raises(ShapeError, match="4 groups"):
        ops.group_norm(out, 8, channels_last=True, stats=stats)
    with pytest.raises(ShapeError, match="channels_last"):
        ops.group_norm(out, 4, stats=stats)
    with pytest.raises(ShapeError, match="GroupStats"):
        ops.group_norm(out, 4, channels_last=True, stats=stats.payload)


@pytest.mark.parametrize("ca,cb,groups", [(6, 18, 6), (5, 3, 4), (8, 0, 2)])
def test_concat_stats_give_group_norm_of_the_concatenation(rng, ca, cb, groups):
    a, b = randn(rng, 2, 4, 5, ca) + 0.5, randn(rng, 2, 4, 5, cb, scale=3.0)
    out, stats = cpu.concat_group_stats(a, b, num_groups=groups)
    assert np.array_equal(out, np.concatenate([a, b], axis=-1))
    y = cpu.group_norm(out, num_groups=groups, activation="silu", channels_last=True, stats=stats)
    ref = cpu.group_norm(out, num_groups=groups, activation="silu", channels_last=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_concat_rejects_bad_input(rng):
    a = Tensor.from_numpy(randn(rng, 2, 3, 3, 8))
    with pytest.raises(ShapeError, match="same N and spatial"):
        ops.concat_group_stats(a, Tensor.from_numpy(randn(rng, 2, 3, 4, 8)), 4)
    with pytest.raises(ShapeError, match="groups"):
        ops.concat_group_stats(a, a, 5)
