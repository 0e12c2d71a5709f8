"""Kernel benchmark: fastdm vs torch on the same card in one run (GEMM, attention, fused memory-bound ops).

Run on a GPU machine with torch installed:  python bench/kernels.py [--quick]
Prints one table: time of each, the ratio torch/fastdm (>1 means fastdm is faster), and the fraction of the
card's measured ceiling (cuBLAS bf16 TFLOP/s for matrix work, device copy GB/s for memory-bound work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402  (bench/ is the baseline side: torch is allowed here)
import torch.nn.functional as F  # noqa: E402
from fastdm.runtime import ops  # noqa: E402
from fastdm.runtime.dlpack import from_dlpack  # noqa: E402
from timing import card_ceilings, time_fastdm, time_torch  # noqa: E402

GEMM_SHAPES = {  # name: (M, K, N)
    "flux qkv 3072->9216": (4608, 3072, 9216),
    "flux mlp 3072->12288": (4608, 3072, 12288),
    "flux mlp 12288->3072": (4608, 12288, 3072),
    "flux single out 15360->3072": (4608, 15360, 3072),
    "sdxl 64x64 ff 640->5120": (8192, 640, 5120),
    "sdxl 32x32 ff 1280->10240": (2048, 1280, 10240),
    "sdxl 32x32 ff 5120->1280": (2048, 5120, 1280),
    "wan5b ff 3072->14336": (27280, 3072, 14336),
    "wan5b ff 14336->3072": (27280, 14336, 3072),
}
ATTN_SHAPES = {  # name: (B, S, H, D)
    "flux 1024^2 S=4608 D=128": (1, 4608, 24, 128),
    "flux 1024x2048 S=8704 D=128": (1, 8704, 24, 128),
    "wan5b S=27280 D=128": (1, 27280, 24, 128),
    "sd3.5m S=4429 D=64": (1, 4429, 24, 64),
}


def fd(t: torch.Tensor):
    """The same memory as a fastdm Tensor (DLPack, no copy)."""
    return from_dlpack(t)


def row(name, ms_torch, ms_ours, work, unit, ceiling):
    rate = work / ms_ours / 1e9 if unit == "TFLOP/s" else work / ms_ours / 1e6
    print(f"| {name} | {ms_torch:.3f} | {ms_ours:.3f} | {ms_torch / ms_ours:.2f}x | {rate:.0f} {unit} "
          f"| {rate / ceiling:.0%} |", flush=True)


def gemm_case(name, m, k, n, ceil):
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    xf, wf, bf = fd(x), fd(w), fd(b)
    torch.cuda.synchronize()
    t_ms = time_torch(lambda: F.linear(x, w, b))
    o_ms = time_fastdm(lambda: ops.linear(xf, wf, bf))
    row(f"linear+bias {name}", t_ms, o_ms, 2 * m * k * n, "TFLOP/s", ceil["bf16_TFLOPs"])
    if name.startswith("flux mlp 3072"):
        t_ms = time_torch(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))
        o_ms = time_fastdm(lambda: ops.linear(xf, wf, bf, activation="gelu_tanh"))
        row(f"linear+gelu_tanh {name}", t_ms, o_ms, 2 * m * k * n, "TFLOP/s", ceil["bf16_TFLOPs"])


def bench_gemm(ceil, quick):
    for name, (m, k, n) in list(GEMM_SHAPES.items())[: 3 if quick else None]:
        gemm_case(name, m, k, n, ceil)


def attention_case(name, b, s, h, d, ceil):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # torch wants [B, H, S, D]
    qf, kf, vf = fd(q), fd(k), fd(v)
    torch.cuda.synchronize()

    def torch_sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt)

    t_ms = time_torch(torch_sdpa, iters=10)
    o_ms = time_fastdm(lambda: ops.attention(qf, kf, vf), iters=10)
    row(f"attention {name}", t_ms, o_ms, 4 * b * h * s * s * d, "TFLOP/s", ceil["bf16_TFLOPs"])


def bench_attention(ceil, quick):
    for name, shape in list(ATTN_SHAPES.items())[: 2 if quick else None]:
        attention_case(name, *shape, ceil)


def bench_fused(ceil):
    b, s, dim = 1, 4608, 3072
    x = torch.randn(b, s, dim, dtype=torch.bfloat16, device="cuda")
    shift, scale = (torch.randn(b, dim, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    xf, shf, scf = fd(x), fd(shift), fd(scale)
    nbytes = 2 * x.numel() * 2  # read x, write out
    t_ms = time_torch(lambda: F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    o_ms = time_fastdm(lambda: ops.layer_norm_modulate(xf, shf, scf, eps=1e-6))
    row("layer_norm+modulate [1,4608,3072]", t_ms, o_ms, nbytes, "GB/s", ceil["copy_GBps"])

    g = torch.randn(b, s, 2 * 5120, dtype=torch.bfloat16, device="cuda")
    gf = fd(g)
    nbytes = g.numel() * 2 + g.numel()  # read 2N, write N (bf16)

    def torch_geglu():
        h, gate = g.chunk(2, dim=-1)
        return h * F.gelu(gate)

    t_ms = time_torch(torch_geglu)
    o_ms = time_fastdm(lambda: ops.gelu_mul(gf))
    row("gelu_mul (GEGLU) [1,4608,10240]", t_ms, o_ms, nbytes, "GB/s", ceil["copy_GBps"])

    c = torch.randn(2, 512, 128, 128, dtype=torch.bfloat16, device="cuda")
    cf = fd(c)
    wgt, bias = torch.randn(512, dtype=torch.bfloat16, device="cuda"), torch.randn(512, dtype=torch.bfloat16,
                                                                                   device="cuda")
    wf, bf = fd(wgt), fd(bias)
    nbytes = 2 * c.numel() * 2
    t_ms = time_torch(lambda: F.silu(F.group_norm(c, 32, wgt, bias, eps=1e-6)))
    o_ms = time_fastdm(lambda: ops.group_norm(cf, 32, wf, bf, eps=1e-6, activation="silu"))
    row("group_norm+silu [2,512,128,128]", t_ms, o_ms, nbytes, "GB/s", ceil["copy_GBps"])

    r = torch.randn(b, s, 24, 128, dtype=torch.bfloat16, device="cuda")
    rw = torch.randn(128, dtype=torch.bfloat16, device="cuda")
    rf, rwf = fd(r), fd(rw)
    nbytes = 2 * r.numel() * 2
    t_ms = time_torch(lambda: F.rms_norm(r, (128,), rw, eps=1e-6))
    o_ms = time_fastdm(lambda: ops.rms_norm(rf, rwf, eps=1e-6))
    row("rms_norm heads [1,4608,24,128]", t_ms, o_ms, nbytes, "GB/s", ceil["copy_GBps"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--only", choices=["gemm", "attention", "fused"], default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ceil = card_ceilings()
    print(f"card: {torch.cuda.get_device_name()}  measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"cuBLAS bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s  (torch {torch.__version__})")
    print("| what | torch ms | fastdm ms | torch/fastdm | fastdm rate | of ceiling |")
    print("|---|---|---|---|---|---|")
    if args.only in (None, "gemm"):
        bench_gemm(ceil, args.quick)
    if args.only in (None, "attention"):
        bench_attention(ceil, args.quick)
    if args.only in (None, "fused"):
        bench_fused(ceil)


if __name__ == "__main__":
    main()
