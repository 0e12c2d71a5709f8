"""CUDA graphs (runtime/graphs.py): capture and replay give the eager results, fresh inputs flow through the static
buffers, new input shapes get their own graph, a function a graph cannot record fails with a clear error and
leaves the stream usable, and the SDXL UNet's graphed forward equals its eager forward."""

from pathlib import Path

import numpy as np
import pytest
from fastdm.runtime import cuda, graphs, ops
from fastdm.runtime.tensor import Tensor

pytestmark = pytest.mark.gpu

FIXTURES = Path(__file__).parent / "fixtures"


def _gpu(a: np.ndarray, dtype="bfloat16") -> Tensor:
    return ops.cast(Tensor.from_numpy(a.astype(np.float32), device="cuda"), dtype)


def _host(t: Tensor) -> np.ndarray:
    return np.asarray(t.numpy(), dtype=np.float32)


def test_capture_replays_eager_results_with_fresh_inputs():
    rng = np.random.default_rng(0)
    w = _gpu(rng.standard_normal((96, 64)) * 0.1)
    b = _gpu(rng.standard_normal(96))

    def fn(x: Tensor, r: Tensor) -> Tensor:
        h = ops.linear(x, w, b, activation="gelu_tanh")  # temporaries allocated inside the capture
        return ops.add(ops.layer_norm(h), r)

    call = graphs.CapturedCall(fn, "test")
    for i in range(5):  # eager, capture + replay, replay, replay, replay
        x, r = _gpu(rng.standard_normal((3, 40, 64))), _gpu(rng.standard_normal((3, 40, 96)))
        got = _host(call(x, r))
        want = _host(fn(x, r))
        assert np.array_equal(got, want), f"call {i}"
    assert len(call._entries) == 1
    # A new shape is a new signature: one eager call, then its own graph.
    for _ in range(3):
        x, r = _gpu(rng.standard_normal((1, 7, 64))), _gpu(rng.standard_normal((1, 7, 96)))
        assert np.array_equal(_host(call(x, r)), _host(fn(x, r)))
    assert len(call._entries) == 2


def test_least_recently_used_graphs_are_dropped():
    call = graphs.CapturedCall(lambda x: ops.mul(x, 3.0), "triple", max_graphs=2)
    for n in (2, 3, 4, 2):  # each size: an eager call, then a captured one
        for _ in range(2):
            x = _gpu(np.full((n, 8), float(n)), "float32")
            assert np.all(_host(call(x)) == 3.0 * n)
    assert len(call._entries) == 2 and [k[0][0] for k in call._entries] == [(4, 8), (2, 8)]


def test_results_are_not_overwritten_by_the_next_replay():
    call = graphs.CapturedCall(lambda x: ops.mul(x, 2.0), "double")
    outs = [call(_gpu(np.full((4, 8), float(i)), "float32")) for i in range(4)]
    for i, o in enumerate(outs):
        assert np.all(_host(o) == 2.0 * i)


def test_uncapturable_function_raises_and_stream_stays_usable():
    def uploads(x: Tensor) -> Tensor:
        return ops.add(x, Tensor.from_numpy(np.ones(x.shape, np.float32), device="cuda"))  # host upload + sync

    call = graphs.CapturedCall(uploads, "uploads")
    x = _gpu(np.zeros((2, 8)), "float32")
    assert np.all(_host(call(x)) == 1.0)  # the eager first call works
    with pytest.raises(graphs.CaptureError, match="FASTDM_CUDA_GRAPHS=0"):
        call(x)
    y = ops.add(x, 3.0)  # the stream left capture mode
    cuda.current_stream().synchronize()
    assert np.all(_host(y) == 3.0)


def test_tensor_kept_from_inside_the_capture_is_refused():
    cache = []

    def keeps(x: Tensor) -> Tensor:
        y = ops.mul(x, 3.0)
        cache.append(ops.add(x, 1.0))  # a graph allocation that outlives the graph
        return y

    call = graphs.CapturedCall(keeps, "keeps")
    x = _gpu(np.ones((2, 8)), "float32")
    call(x)
    with pytest.raises(graphs.CaptureError, match="kept 1 tensor"):
        call(x)
    assert np.all(_host(ops.mul(x, 2.0)) == 2.0)


def test_graph_memory_can_be_trimmed():
    call = graphs.CapturedCall(lambda x: ops.gelu(ops.mul(x, 1.5)), "act")
    x = _gpu(np.ones((256, 1024)))
    for _ in range(3):
        call(x)
    graphs.trim_graph_memory()
    assert np.allclose(_host(call(x)), _host(ops.gelu(ops.mul(x, 1.5))))
    assert graphs.graph_memory_used() >= 0


def test_sdxl_unet_graph_equals_eager():
    from fastdm.models.denoisers.unet2d import UNet2DCondition

    model = UNet2DCondition.from_pretrained(FIXTURES / "sdxl_unet_tiny", device="cuda", dtype="bfloat16")
    assert isinstance(model._body, graphs.CapturedCall)
    rng = np.random.default_rng(1)
    cfg = model.config
    for step, t in enumerate([900.0, 500.0, 120.0, 3.0]):
        args = dict(sample=_gpu(rng.standard_normal((2, cfg.in_channels, 16, 16))), timestep=t,
                    encoder_hidden_states=_gpu(rng.standard_normal((2, 77, cfg.cross_attention_dim))),
                    text_embeds=_gpu(rng.standard_normal((2, cfg.projection_class_embeddings_input_dim
                                                          - 6 * cfg.addition_time_embed_dim))),
                    time_ids=np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (2, 1)))
        got = _host(model(**args))
        graphed, model._body = model._body, model._denoise
        want = _host(model(**args))
        model._body = graphed
        assert np.array_equal(got, want), f"step {step}"
    assert len(model._body._entries) == 1


def test_environment_switch_makes_the_gpu_unet_eager(monkeypatch):
    from fastdm.models.denoisers.unet2d import UNet2DCondition

    monkeypatch.setenv("FASTDM_CUDA_GRAPHS", "0")
    model = UNet2DCondition.from_pretrained(FIXTURES / "sdxl_unet_tiny", device="cuda", dtype="bfloat16")
    assert not isinstance(model._body, graphs.CapturedCall)


def test_another_stream_gets_its_own_graph():
    call = graphs.CapturedCall(lambda x: ops.add(x, 1.0), "plus_one")
    x = _gpu(np.zeros((4, 8)), "float32")
    for _ in range(3):
        assert np.all(_host(call(x)) == 1.0)
    side = cuda.Stream()
    with cuda.use_stream(side):
        for i in range(3):
            y = _gpu(np.full((4, 8), float(i)), "float32")
            out = call(y)
            side.synchronize()
            assert np.all(_host(out) == i + 1.0)
    assert len(call._entries) == 2
