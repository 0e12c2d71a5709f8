"""Kernel benchmark: fastdm vs torch on the same card in one run (GEMM, attention, fused memory-bound ops).

Run on a GPU machine with torch installed:  python bench/kernels.py [--quick]
Prints one table. "kernel ms" is device time per call with calls queued back to back behind a GPU spin on one
stream (timing.device_ms: the kernels' own time, as in a model forward whose host runs ahead), the median of
ROUNDS rounds that time torch and fastdm in turn (timing.interleaved_ms); "call ms" is one
call from an idle GPU (host overhead included: Python, ctypes, torch's dispatcher). The ratio torch/fastdm (> 1
means fastdm is faster) and the fraction of the card's measured ceiling (cuBLAS bf16 TFLOP/s for matrix work,
device copy GB/s for memory-bound work) use kernel time.
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
from timing import card_ceilings, device_ms, interleaved_ms, same_stream, time_fastdm, time_torch  # noqa: E402

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
ROUNDS = 9  # kernel time: median of this many rounds, torch and fastdm timed in turn each round (interleaved_ms)
ATTN_SHAPES = {  # name: (B, S, H, D)
    "flux 1024^2 S=4608 D=128": (1, 4608, 24, 128),
    "flux 1024x2048 S=8704 D=128": (1, 8704, 24, 128),
    "wan5b S=27280 D=128": (1, 27280, 24, 128),
    "sd3.5m S=4429 D=64": (1, 4429, 24, 64),
}


def fd(t: torch.Tensor):
    """The same memory as a fastdm Tensor (DLPack, no copy)."""
    return from_dlpack(t)


def row(name, torch_fn, ours_fn, work, unit, ceiling, iters=20, copy_ms=None):
    """Time both sides (call time, then kernel time on one stream) and print the table row. copy_ms: device time of
    a plain copy moving the same bytes (memory-bound rows), shown beside the fraction of the ceiling."""
    call_torch, call_ours = time_torch(torch_fn, iters=iters), time_fastdm(ours_fn, iters=iters)
    with same_stream():
        ms = interleaved_ms({"torch": torch_fn, "fastdm": ours_fn}, reps=iters, rounds=ROUNDS)
    ms_torch, ms_ours = ms["torch"], ms["fastdm"]
    rate = work / ms_ours / 1e9 if unit == "TFLOP/s" else work / ms_ours / 1e6
    of = f"{rate / ceiling:.0%}" + (f" ({copy_ms / ms_ours:.0%} of same-size copy)" if copy_ms else "")
    print(f"| {name} | {ms_torch:.3f} | {ms_ours:.3f} | {ms_torch / ms_ours:.2f}x | {rate:.0f} {unit} "
          f"| {of} | {call_torch:.3f} / {call_ours:.3f} |", flush=True)


def same_size_copy_ms(moved_bytes: int) -> float:
    """Device time of a device-to-device copy moving `moved_bytes` (half read, half written), from DRAM as the
    memory-bound rows are (rotating buffers over 3x the L2). At tens of MB a copy reaches only ~80% of the 1 GiB
    copy ceiling (launch ramp and tail), so this is the practical bound for a one-pass kernel of that size."""
    import itertools

    n = max(moved_bytes // 2, 1)
    cycle = itertools.cycle(rotating_sets(
        lambda: (torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")),
        n))

    def copy():
        a, b = next(cycle)
        b.copy_(a)

    with same_stream():
        return device_ms(copy, reps=20)


def gemm_case(name, m, k, n, ceil):
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    xf, wf, bf = fd(x), fd(w), fd(b)
    torch.cuda.synchronize()
    row(f"linear+bias {name}", lambda: F.linear(x, w, b), lambda: ops.linear(xf, wf, bf), 2 * m * k * n, "TFLOP/s",
        ceil["bf16_TFLOPs"])
    if name.startswith("flux mlp 3072"):
        row(f"linear+gelu_tanh {name}", lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
            lambda: ops.linear(xf, wf, bf, activation="gelu_tanh"), 2 * m * k * n, "TFLOP/s", ceil["bf16_TFLOPs"])


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

    row(f"attention {name}", torch_sdpa, lambda: ops.attention(qf, kf, vf), 4 * b * h * s * s * d, "TFLOP/s",
        ceil["bf16_TFLOPs"], iters=10)


def bench_attention(ceil, quick):
    for name, shape in list(ATTN_SHAPES.items())[: 2 if quick else None]:
        attention_case(name, *shape, ceil)


def rotating_sets(make, nbytes_in: int) -> list:
    """Enough input sets (make() -> tuple of torch tensors, nbytes_in bytes read from each) to exceed 3x the L2
    cache, so back-to-back calls cycling over them read from DRAM as in a model, not from L2."""
    import math

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return [make() for _ in range(min(16, max(2, math.ceil(3 * l2 / max(nbytes_in, 1)))))]


def rotating(make, nbytes_in: int):
    """(next_torch, next_fastdm): calls that cycle over rotating_sets(make, nbytes_in)."""
    import itertools

    sets = rotating_sets(make, nbytes_in)
    ours = [tuple(fd(t) for t in ts) for ts in sets]
    t_cycle, o_cycle = itertools.cycle(sets), itertools.cycle(ours)
    return (lambda: next(t_cycle)), (lambda: next(o_cycle))


def bench_fused(ceil):
    def bf16(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16, device="cuda")

    b, s, dim = 1, 4608, 3072
    tx, ox = rotating(lambda: (bf16(b, s, dim), bf16(b, dim), bf16(b, dim)), b * s * dim * 2)

    def torch_ln_mod():
        x, shift, scale = tx()
        return F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def ours_ln_mod():
        x, shift, scale = ox()
        return ops.layer_norm_modulate(x, shift, scale, eps=1e-6)

    row("layer_norm+modulate [1,4608,3072]", torch_ln_mod, ours_ln_mod, 2 * b * s * dim * 2, "GB/s",
        ceil["copy_GBps"], copy_ms=same_size_copy_ms(2 * b * s * dim * 2))

    n = 5120
    tg, og = rotating(lambda: (bf16(b, s, 2 * n),), b * s * 2 * n * 2)

    def torch_geglu():
        h, gate = tg()[0].chunk(2, dim=-1)
        return h * F.gelu(gate)

    row("gelu_mul (GEGLU) [1,4608,10240]", torch_geglu, lambda: ops.gelu_mul(og()[0]), b * s * 3 * n * 2, "GB/s",
        ceil["copy_GBps"], copy_ms=same_size_copy_ms(b * s * 3 * n * 2))

    shape = (2, 512, 128, 128)
    numel = 2 * 512 * 128 * 128
    wgt, bias = bf16(512), bf16(512)
    wf, bf = fd(wgt), fd(bias)
    tc, oc = rotating(lambda: (bf16(*shape),), numel * 2)
    row("group_norm+silu [2,512,128,128]", lambda: F.silu(F.group_norm(tc()[0], 32, wgt, bias, eps=1e-6)),
        lambda: ops.group_norm(oc()[0], 32, wf, bf, eps=1e-6, activation="silu"), 2 * numel * 2, "GB/s",
        ceil["copy_GBps"], copy_ms=same_size_copy_ms(2 * numel * 2))
    # channels-last, as the SDXL UNet and VAE keep activations: torch sees NCHW sizes with channels_last strides
    tl, ol = rotating(lambda: (bf16(2, 128, 128, 512),), numel * 2)
    row("group_norm+silu channels-last [2,128,128,512]",
        lambda: F.silu(F.group_norm(tl()[0].permute(0, 3, 1, 2), 32, wgt, bias, eps=1e-6)),
        lambda: ops.group_norm(ol()[0], 32, wf, bf, eps=1e-6, activation="silu", channels_last=True),
        2 * numel * 2, "GB/s", ceil["copy_GBps"], copy_ms=same_size_copy_ms(2 * numel * 2))

    bench_add_group_norm(ceil, wgt, bias)

    rw = bf16(128)
    rwf = fd(rw)
    tr, orr = rotating(lambda: (bf16(b, s, 24, 128),), b * s * 24 * 128 * 2)
    row("rms_norm heads [1,4608,24,128]", lambda: F.rms_norm(tr()[0], (128,), rw, eps=1e-6),
        lambda: ops.rms_norm(orr()[0], rwf, eps=1e-6), 2 * b * s * 24 * 128 * 2, "GB/s", ceil["copy_GBps"],
        copy_ms=same_size_copy_ms(2 * b * s * 24 * 128 * 2))


def bench_add_group_norm(ceil, wgt, bias):
    """The op that writes a GroupNorm's input, then the GroupNorm + SiLU, as the SDXL UNet and VAE run them: the
    residual add of a resnet or attention block (b of a's shape), the UNet's time-embedding add (b one row a sample)
    and an up block's concatenation of its input and skip (the GroupNorm over all 960 channels). fastdm takes the
    statistics in that op (ops.add_group_stats / ops.concat_group_stats), so the GroupNorm reads its input once;
    torch runs the same two steps. Bytes: the first op's reads and write, then the GroupNorm's read and write."""
    shape, numel = (2, 128, 128, 512), 2 * 128 * 128 * 512
    wf, bf = fd(wgt), fd(bias)
    w960, b960 = torch.randn(960, dtype=torch.bfloat16, device="cuda"), torch.randn(960, dtype=torch.bfloat16,
                                                                                      device="cuda")
    w960f, b960f = fd(w960), fd(b960)

    def bf16(*dims):
        return torch.randn(*dims, dtype=torch.bfloat16, device="cuda")

    def torch_gn(s, w, b):
        return s, F.silu(F.group_norm(s.permute(0, 3, 1, 2), 32, w, b, eps=1e-6))

    def ours_gn(s, w, b, stats=None):
        return s, ops.group_norm(s, 32, w, b, eps=1e-6, activation="silu", channels_last=True, stats=stats)

    def with_stats(result, w=wf, b=bf):
        s, stats = result
        return ours_gn(s, w, b, stats)

    cases = [  # (what, input shapes, moved bytes, torch, fastdm with statistics, fastdm without)
        ("residual add", [shape, shape], 5 * numel * 2, lambda a, b: torch_gn(a + b, wgt, bias),
         lambda a, b: with_stats(ops.add_group_stats(a, b, 32)), lambda a, b: ours_gn(ops.add(a, b), wf, bf)),
        ("time-embedding add", [shape, (2, 1, 1, 512)], 4 * numel * 2, lambda a, b: torch_gn(a + b, wgt, bias),
         lambda a, b: with_stats(ops.add_group_stats(a, b, 32)), lambda a, b: ours_gn(ops.add(a, b), wf, bf)),
        ("up-block concat 640+320", [(2, 128, 128, 640), (2, 128, 128, 320)], 4 * 2 * 128 * 128 * 960 * 2,
         lambda a, b: torch_gn(torch.cat([a, b], dim=3), w960, b960),
         lambda a, b: with_stats(ops.concat_group_stats(a, b, 32), w960f, b960f),
         lambda a, b: ours_gn(ops.concat([a, b], axis=3), w960f, b960f)),
    ]
    for what, shapes, moved, torch_fn, ours_fn, unfused_fn in cases:
        ta, oa = rotating(lambda shapes=shapes: tuple(bf16(*s) for s in shapes), moved // 4)
        copy = same_size_copy_ms(moved)
        size = ",".join(map(str, shapes[0]))
        row(f"{what} + group_norm+silu channels-last [{size}]", lambda ta=ta, f=torch_fn: f(*ta()),
            lambda oa=oa, f=ours_fn: f(*oa()), moved, "GB/s", ceil["copy_GBps"], copy_ms=copy)
        row(f"{what}, then group_norm+silu (no statistics from it)", lambda ta=ta, f=torch_fn: f(*ta()),
            lambda oa=oa, f=unfused_fn: f(*oa()), moved, "GB/s", ceil["copy_GBps"], copy_ms=copy)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--only", choices=["gemm", "attention", "fused"], default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ceil = card_ceilings()
    print(f"card: {torch.cuda.get_device_name()}  measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"cuBLAS bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s  (torch {torch.__version__})")
    print("| what | torch kernel ms | fastdm kernel ms | torch/fastdm | fastdm rate | of ceiling | call ms torch / "
          "fastdm |")
    print("|---|---|---|---|---|---|---|")
    if args.only in (None, "gemm"):
        bench_gemm(ceil, args.quick)
    if args.only in (None, "attention"):
        bench_attention(ceil, args.quick)
    if args.only in (None, "fused"):
        bench_fused(ceil)


if __name__ == "__main__":
    main()
