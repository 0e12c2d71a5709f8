"""Programmatic dependent launch (kernels/pdl.cuh) changes no bit: a FLUX-like block (LayerNorm + modulation, QKV
linear, q/k RMSNorm + RoPE, attention, gated-residual linears, GEGLU, RMSNorm) in which every kernel reads what the
previous one wrote, and writes memory an earlier one read (the stream-ordered pool hands freed buffers straight
back), gives the same bits with PDL on and off, eagerly and replayed from a CUDA graph, with the hand-written and
the CUTLASS sm90 GEMM kernels (stream-K with its shared workspace among them)."""

import numpy as np
import pytest
from fastdm.runtime import cuda, graphs, ops
from gpu_ops import gpu, rand

from fastdm import kernels

pytestmark = pytest.mark.gpu

B, S, H, DH = 2, 1000, 8, 128
D = H * DH
FF = 2048  # the GEGLU width: the up projection writes 2 * FF


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(7)
    bf = "bfloat16"

    def w(n, k):
        return gpu(rand(rng, bf, n, k, scale=k ** -0.5))

    def v(*shape, scale=0.3, shift=0.0):
        return gpu(rand(rng, bf, *shape, scale=scale, shift=shift))

    angles = rng.uniform(0, 2 * np.pi, (S, DH // 2)).astype(np.float32)
    return {
        "x": v(B, S, D, scale=1.0),
        "shift": v(B, D), "scale": v(B, D), "shift2": v(B, D), "scale2": v(B, D),
        "gate": v(B, D, shift=0.5), "gate2": v(B, D, shift=0.5),
        "w_qkv": w(3 * D, D), "b_qkv": v(3 * D), "q_norm": v(DH, shift=1.0), "k_norm": v(DH, shift=1.0),
        "cos": gpu(np.cos(angles)), "sin": gpu(np.sin(angles)),
        "w_o": w(D, D), "b_o": v(D), "w_up": w(2 * FF, D), "b_up": v(2 * FF), "w_down": w(D, FF), "b_down": v(D),
    }


def block(p, x):
    h = ops.layer_norm_modulate(x, p["shift"], p["scale"])
    qkv = ops.linear(h, p["w_qkv"], p["b_qkv"]).reshape(B, S, 3, H, DH)
    q, k, v = ops.qk_norm_rope(qkv, p["q_norm"], p["k_norm"], p["cos"], p["sin"])
    a = ops.attention(q, k, v).reshape(B, S, D)
    x = ops.linear_gated_residual(a, p["w_o"], p["b_o"], p["gate"], x)
    h = ops.layer_norm_modulate(x, p["shift2"], p["scale2"])
    h = ops.gelu_mul(ops.linear(h, p["w_up"], p["b_up"], activation="gelu_tanh"), approximate="tanh")
    x = ops.linear_gated_residual(h, p["w_down"], p["b_down"], p["gate2"], x)
    return ops.rms_norm(x)


def chain(p, x, blocks=3):
    for _ in range(blocks):
        x = block(p, x)
    return x


def host(t) -> np.ndarray:
    cuda.current_stream().synchronize()
    return np.asarray(t.numpy(), dtype=np.float32)


@pytest.fixture
def pdl_switch():
    lib = kernels.library()
    previous = lib.fdm_pdl_set(1)

    def set_pdl(on: bool) -> None:
        lib.fdm_pdl_set(int(on))

    yield set_pdl
    lib.fdm_pdl_set(previous)
    kernels.call("fdm_gemm_sm90_set_config", -1)


# -1: the automatic choice; 24: hand-written 128x256; 0: CUTLASS cooperative 128x256; 12: CUTLASS ping-pong;
# 6: CUTLASS cooperative stream-K (partial sums in the stream's shared workspace).
@pytest.mark.parametrize("config", [-1, 24, 0, 12, 6])
def test_same_bits_with_and_without_pdl(params, pdl_switch, config):
    if config >= 0:
        if cuda.Device(0).compute_capability < (9, 0) or not kernels.library().fdm_has_sm90():
            pytest.skip("forcing an sm90 GEMM configuration needs an sm_90a build on a compute capability 9.0 GPU")
        kernels.call("fdm_gemm_sm90_set_config", config)
    pdl_switch(False)
    want = host(chain(params, params["x"]))
    assert np.isfinite(want).all()
    pdl_switch(True)
    for attempt in range(3):
        got = host(chain(params, params["x"]))
        assert np.array_equal(got, want), f"eager run {attempt} with PDL differs (config {config})"

    call = graphs.CapturedCall(lambda x: chain(params, x), "pdl chain")
    for attempt in range(4):  # eager, capture + replay, replay, replay
        got = host(call(params["x"]))
        assert np.array_equal(got, want), f"graph call {attempt} with PDL differs (config {config})"
