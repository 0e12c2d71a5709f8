"""runtime.ops dispatch: CPU Tensors go to ops.cpu and come back as Tensors holding exactly ops.cpu's result;
split() returns views; tensors on different devices are refused."""

import inspect

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import ops
from fastdm.runtime.errors import ShapeError, UnsupportedDtypeError
from fastdm.runtime.ops import cpu
from fastdm.runtime.tensor import Tensor
from numerics import randn


def T(a: np.ndarray) -> Tensor:
    return Tensor.from_numpy(a)


def api_ops() -> list[str]:
    """Public functions of runtime/ops/__init__.py that dispatch (every one but split and
    conv_weight_channels_last, which are built on other ops)."""
    return sorted(name for name, fn in vars(ops).items()
                  if inspect.isfunction(fn) and fn.__module__ == ops.__name__ and not name.startswith("_")
                  and name not in ("split", "conv_weight_channels_last"))


def cases(rng, dtype):
    """(op name, positional args, keyword args) covering every dispatched op; arrays are numpy here."""
    def r(*shape, scale=1.0):
        return randn(rng, *shape, scale=scale).astype(dtype)

    mask = np.ones((2, 7), dtype=bool)
    mask[1, 4:] = False
    theta = rng.uniform(-3, 3, (5, 4))
    return [
        ("linear", (r(2, 3, 17), r(9, 17), r(9)), {"activation": "gelu_tanh"}),
        ("linear", (r(5, 17), r(9, 17), None), {}),
        ("linear_gated_residual", (r(2, 3, 17), r(9, 17), r(9), r(2, 9), r(2, 3, 9)), {}),
        ("matmul", (r(2, 5, 3), r(2, 3, 4)), {}),
        ("matmul", (r(2, 5, 3), r(3, 4)), {}),
        ("conv2d", (r(1, 3, 6, 5), r(4, 3, 3, 3), r(4)), {"stride": 2, "padding": 1}),
        ("conv2d", (r(1, 6, 5, 3), r(4, 3, 3, 3), r(4)), {"stride": 2, "padding": 1, "channels_last": True}),
        ("attention", (r(2, 5, 3, 8), r(2, 7, 3, 8), r(2, 7, 3, 8), mask), {"scale": 0.4}),
        ("attention", (r(2, 5, 3, 8), r(2, 7, 3, 8), r(2, 7, 3, 8), None), {}),
        ("layer_norm", (r(3, 17), r(17), r(17)), {"eps": 1e-6}),
        ("layer_norm", (r(3, 17), None, None), {}),
        ("layer_norm_modulate", (r(2, 3, 16), r(2, 16), r(2, 16)), {"eps": 1e-6}),
        ("rms_norm", (r(3, 17), r(17)), {"eps": 1e-5}),
        # by keyword: ops.group_norm takes (x, num_groups, weight, bias), ops.cpu (x, weight, bias, *, num_groups)
        ("group_norm", (r(2, 6, 3, 3),),
         {"weight": r(6), "bias": r(6), "num_groups": 3, "eps": 1e-6, "activation": "silu"}),
        ("group_norm", (r(2, 3, 3, 6),),
         {"weight": r(6), "bias": r(6), "num_groups": 3, "eps": 1e-6, "channels_last": True}),
        ("rope", (r(1, 5, 2, 8), np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)),
         {"interleaved": False}),
        ("qk_norm_rope", (r(1, 5, 3, 2, 8), r(8), r(8), np.cos(theta).astype(np.float32),
                          np.sin(theta).astype(np.float32)), {"eps": 1e-6, "interleaved": True}),
        ("timestep_embedding", (rng.uniform(0, 1000, 3).astype(np.float32),),
         {"dim": 33, "flip_sin_to_cos": True, "downscale_freq_shift": 0.0, "scale": 1.0, "max_period": 10000.0}),
        ("gelu", (r(3, 17),), {"approximate": "none"}),
        ("gelu_mul", (r(3, 18),), {"approximate": "tanh"}),
        ("quick_gelu", (r(3, 17),), {}),
        ("silu", (r(3, 17),), {}),
        ("softmax", (r(3, 17),), {"axis": 0}),
        ("add", (r(2, 3, 17), r(17)), {"alpha": -0.5}),
        ("add_group_stats", (r(2, 3, 3, 6), r(2, 1, 1, 6)), {"num_groups": 3, "alpha": 0.5}),
        ("concat_group_stats", (r(2, 3, 3, 6), r(2, 3, 3, 3)), {"num_groups": 3}),
        ("add", (r(2, 3, 17), 2.5), {}),
        ("mul", (r(2, 3, 17), r(2, 1, 17)), {}),
        ("mul", (r(4, 3), 3.0), {}),
        ("modulate", (r(2, 3, 16), r(2, 16), r(2, 16)), {}),
        ("gated_residual", (r(2, 3, 16), r(2, 16), r(2, 3, 16)), {}),
        ("contiguous", (r(3, 17),), {}),
        ("permute", (r(2, 3, 5),), {"dims": (2, 0, 1)}),
        ("concat", ([r(2, 3), r(4, 3), r(1, 3)],), {"axis": 0}),
        ("cast", (r(3, 17),), {"dtype": "bfloat16"}),
        ("embedding", (rng.integers(0, 11, (2, 5)), r(11, 6)), {}),
        ("upsample_nearest2x", (r(1, 2, 3, 5),), {}),
        ("upsample_nearest2x", (r(1, 3, 5, 2),), {"channels_last": True}),
    ]


def wrap(a):
    if isinstance(a, np.ndarray):
        return T(a)
    if isinstance(a, list):
        return [wrap(x) for x in a]
    return a


def test_every_api_op_has_a_cpu_implementation_and_a_case():
    names = api_ops()
    assert len(names) >= 25
    missing = [n for n in names if not callable(getattr(cpu, n, None))]
    assert not missing, f"ops.cpu lacks {missing}"
    covered = {c[0] for c in cases(np.random.default_rng(0), np.float32)}
    assert set(names) <= covered, f"no dispatch case for {set(names) - covered}"


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_cpu_tensors_give_ops_cpu_results(rng, dtype):
    for name, args, kwargs in cases(rng, dtype):
        want = getattr(cpu, name)(*args, **kwargs)
        got = getattr(ops, name)(*[wrap(a) for a in args], **{k: wrap(v) for k, v in kwargs.items()})
        if name.endswith("_group_stats"):  # (result, statistics): the statistics are tested in test_ops_group_stats.py
            assert isinstance(got[1], ops.GroupStats) and got[1].of is got[0], name
            want, got = want[0], got[0]
        if isinstance(want, tuple):  # qk_norm_rope: (q, k, v)
            assert isinstance(got, tuple) and len(got) == len(want), name
            pairs = list(zip(got, want, strict=True))
        else:
            pairs = [(got, want)]
        for g, w in pairs:
            assert isinstance(g, Tensor), name
            assert str(g.device) == "cpu" and not g.is_cuda, name
            assert g.shape == w.shape and g.dtype.np == w.dtype, (name, g.shape, g.dtype)
            assert np.array_equal(g.numpy(), w, equal_nan=True), name


def test_result_dtypes_follow_the_contract(rng):
    x = T(randn(rng, 3, 4).astype(ml_dtypes.bfloat16))
    assert ops.silu(x).dtype.name == "float32"  # compute ops return float32 on the CPU
    assert ops.permute(x, (1, 0)).dtype.name == "bfloat16"  # layout ops keep the dtype
    assert ops.concat([x, x], axis=1).dtype.name == "bfloat16"
    assert ops.cast(x, "float16").dtype.name == "float16"


def test_split_returns_views(rng):
    base = randn(rng, 2, 3, 9)
    x = T(base)
    parts = ops.split(x, [2, 3, 4], axis=-1)
    assert [p.shape for p in parts] == [(2, 3, 2), (2, 3, 3), (2, 3, 4)]
    for p, (lo, hi) in zip(parts, [(0, 2), (2, 5), (5, 9)], strict=True):
        assert isinstance(p, Tensor)
        arr = p.numpy()
        assert np.array_equal(arr, base[..., lo:hi])
        assert np.shares_memory(arr, base)  # a view, not a copy
    rows = ops.split(x, [1, 1], axis=0)
    assert np.array_equal(rows[1].numpy(), base[1:2])
    with pytest.raises(ShapeError, match="add up"):
        ops.split(x, [2, 3], axis=-1)


def test_split_views_feed_ops(rng):
    # a fused QKV projection cut by split(): the views go straight into attention and rope
    bsz, s, nh, d = 2, 7, 2, 8
    qkv = randn(rng, bsz, s, 3 * nh * d)
    q, k, v = (t.reshape(bsz, s, nh, d) for t in ops.split(T(qkv), [nh * d] * 3, axis=-1))
    got = ops.attention(q, k, v)
    qn, kn, vn = (qkv[..., i * nh * d:(i + 1) * nh * d].reshape(bsz, s, nh, d) for i in range(3))
    assert np.array_equal(got.numpy(), cpu.attention(qn, kn, vn))
    theta = rng.uniform(-3, 3, (s, d // 2))
    cos, sin = T(np.cos(theta).astype(np.float32)), T(np.sin(theta).astype(np.float32))
    assert np.array_equal(ops.rope(q, cos, sin).numpy(), cpu.rope(qn, cos.numpy(), sin.numpy()))


def test_errors_pass_through_dispatch(rng):
    with pytest.raises(ShapeError, match="K=8"):
        ops.linear(T(randn(rng, 2, 7)), T(randn(rng, 4, 8)))
    with pytest.raises(UnsupportedDtypeError):
        ops.silu(T(np.ones((2, 2), dtype=np.int32)))


@pytest.mark.gpu
def test_mixed_devices_are_refused(rng):
    a = randn(rng, 3, 4)
    on_cpu, on_gpu = T(a), Tensor.from_numpy(a, device="cuda")
    with pytest.raises(ShapeError, match="different devices"):
        ops.add(on_cpu, on_gpu)
    with pytest.raises(ShapeError, match="different devices"):
        ops.concat([on_gpu, on_cpu])
    with pytest.raises(ShapeError, match="different devices"):
        ops.linear(on_cpu, T(randn(rng, 5, 4)), Tensor.from_numpy(randn(rng, 5), device="cuda"))
