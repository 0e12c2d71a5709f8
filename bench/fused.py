"""Fused memory-bound kernels: fastdm vs the torch op sequence each replaces, on the same card in one run.

Run on a GPU machine with torch installed:  . bench/device_env.sh && python bench/fused.py [--iters N]

Two timings per case, both medians of device events:
- "call": bench/timing.py's time_fastdm / time_torch. Each call starts on an idle GPU, so the Python work before the
  kernel reaches the GPU (argument checks, allocation, ctypes; torch's dispatcher) is inside the measurement. This
  is what bench/kernels.py reports and what a lone op costs in a host-bound loop.
- "GPU": the stream is first held by a spin kernel (torch.cuda._sleep) long enough for the host to queue all N
  calls; the events then time N calls that run back to back. That is the kernels' own time, as in a model forward
  where the host runs ahead of the GPU (timing.device_ms, which checks the spin was still running when the last call
  was queued).
Inputs rotate over enough copies to exceed 3x the L2 cache, so every call reads from DRAM as it would in a model.
Rates count the bytes each op must move (read + write once); "copy" is a device-to-device copy of the same number
of bytes timed the same way, the ceiling a single pass of that size can reach.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402  (bench/ is the baseline side: torch is allowed here)
import torch.nn.functional as F  # noqa: E402
from fastdm.runtime import cuda, ops  # noqa: E402
from fastdm.runtime.dlpack import from_dlpack  # noqa: E402
from fastdm.runtime.errors import CudaError  # noqa: E402
from timing import card_ceilings, device_ms, time_fastdm, time_torch  # noqa: E402


def fd(t: torch.Tensor):
    """The same memory as a fastdm Tensor (DLPack, no copy)."""
    return from_dlpack(t)


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs fns[0], fns[1], ... in turn (each over its own copy of the inputs)."""
    state = {"i": 0}

    def run():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return run


def copies(make: Callable[[], tuple], nbytes_in: int) -> list[tuple]:
    """Enough independent input sets (make() each) that together they exceed 3x the L2 cache, at most 16."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n = min(16, max(2, math.ceil(3 * l2 / max(nbytes_in, 1))))
    return [make() for _ in range(n)]


class Bench:
    def __init__(self, iters: int):
        self.iters = iters
        self.ceil = card_ceilings()
        self.fd_stream = torch.cuda.ExternalStream(cuda.current_stream().handle)
        props = torch.cuda.get_device_properties(0)
        print(f"card: {torch.cuda.get_device_name()}  L2 {props.L2_cache_size >> 20} MiB  measured copy ceiling "
              f"{self.ceil['copy_GBps']:.0f} GB/s (1 GiB)  torch {torch.__version__}")
        print("| what | MB moved | torch call ms | fastdm call ms | torch GPU ms | fastdm GPU ms | torch/fastdm (GPU) "
              "| fastdm GPU GB/s | of copy ceiling | same-size copy GB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")

    def copy_gbs(self, nbytes: int) -> float:
        half = nbytes // 2  # a copy of n bytes moves 2n
        srcs = copies(lambda: (torch.empty(half, dtype=torch.uint8, device="cuda"),
                               torch.empty(half, dtype=torch.uint8, device="cuda")), half)
        fn = rotating([lambda s=s, d=d: d.copy_(s) for s, d in srcs])
        return 2 * half / device_ms(fn, self.iters, stream=torch.cuda.current_stream()) / 1e6

    def case(self, name: str, nbytes: int, torch_fns: list, fastdm_fns: list, baseline_is_fastdm: bool = False):
        """One table row. The baseline ("torch" columns) is a torch op sequence, or fastdm calls when
        baseline_is_fastdm (then it runs on fastdm's stream)."""
        t_fn, o_fn = rotating(torch_fns), rotating(fastdm_fns)
        torch.cuda.synchronize()
        t_call = time_fastdm(t_fn) if baseline_is_fastdm else time_torch(t_fn)
        o_call = time_fastdm(o_fn)
        t_stream = self.fd_stream if baseline_is_fastdm else torch.cuda.current_stream()
        t_gpu = device_ms(t_fn, self.iters, stream=t_stream)
        o_gpu = device_ms(o_fn, self.iters, stream=self.fd_stream)
        rate = nbytes / o_gpu / 1e6
        print(f"| {name} | {nbytes / 1e6:.1f} | {t_call:.3f} | {o_call:.3f} | {t_gpu:.3f} | {o_gpu:.3f} "
              f"| {t_gpu / o_gpu:.2f}x | {rate:.0f} | {rate / self.ceil['copy_GBps']:.0%} "
              f"| {self.copy_gbs(nbytes):.0f} |", flush=True)


def bf16(*shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.bfloat16, device="cuda") * scale


def layer_norm_modulate(bench: Bench) -> None:
    b, s, d = 1, 4608, 3072
    sets = copies(lambda: (bf16(b, s, d), bf16(b, d, scale=0.5), bf16(b, d, scale=0.5)), b * s * d * 2)
    bench.case("layer_norm+modulate [1,4608,3072]", 2 * b * s * d * 2,
               [lambda x=x, sh=sh, sc=sc: F.layer_norm(x, (d,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None]
                for x, sh, sc in sets],
               [lambda x=x, sh=sh, sc=sc: ops.layer_norm_modulate(x, sh, sc, eps=1e-6)
                for x, sh, sc in ([fd(t) for t in ts] for ts in sets)])


def gelu_mul(bench: Bench) -> None:
    rows, n = 4608, 5120
    sets = copies(lambda: bf16(1, rows, 2 * n), rows * 2 * n * 2)

    def torch_geglu(g):
        h, gate = g.chunk(2, dim=-1)
        return h * F.gelu(gate)

    bench.case("gelu_mul (GEGLU) [1,4608,10240]", rows * 3 * n * 2, [lambda g=g: torch_geglu(g) for g in sets],
               [lambda g=g: ops.gelu_mul(g) for g in map(fd, sets)])


def group_norm_path(path: int) -> None:
    """fastdm's GroupNorm kernel choice (0 automatic, 1 the one-pass Hopper cluster kernel, 2 the multi-pass kernels,
    3 the channels-last whole-tensor-on-chip kernel)."""
    from fastdm import kernels

    kernels.call("fdm_group_norm_set_path", path)


def group_norm_silu(bench: Bench) -> None:
    """NCHW GroupNorm + SiLU at SDXL's shapes (UNet, and the VAE decoder's 512 channels at 128x128) vs torch; on
    Hopper also the two-pass kernels against the one-pass kernel the automatic choice takes there."""
    for shape in ((2, 512, 128, 128), (2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)):
        group_norm_silu_case(bench, shape)


def group_norm_silu_case(bench: Bench, shape: tuple[int, ...]) -> None:
    numel, c = math.prod(shape), shape[1]
    w, b = bf16(c), bf16(c)
    fw, fb = fd(w), fd(b)
    sets = copies(lambda: bf16(*shape), numel * 2)
    fsets = [fd(x) for x in sets]
    # Counted as one read + one write (as bench/kernels.py); the two-pass form reads x twice, the second time partly
    # from L2.
    bench.case(f"group_norm+silu {list(shape)}", 2 * numel * 2,
               [lambda x=x: F.silu(F.group_norm(x, 32, w, b, eps=1e-6)) for x in sets],
               [lambda x=x: ops.group_norm(x, 32, fw, fb, eps=1e-6, activation="silu") for x in fsets])
    if torch.cuda.get_device_capability() != (9, 0):
        return

    def with_path(path, x):
        group_norm_path(path)
        return ops.group_norm(x, 32, fw, fb, eps=1e-6, activation="silu")

    bench.case(f"group_norm+silu {list(shape)} one-pass vs fastdm two-pass (baseline)", 2 * numel * 2,
               [lambda x=x: with_path(2, x) for x in fsets], [lambda x=x: with_path(1, x) for x in fsets],
               baseline_is_fastdm=True)
    group_norm_path(0)


def group_norm_silu_nhwc(bench: Bench) -> None:
    """Channels-last GroupNorm + SiLU at SDXL UNet and VAE sizes, vs torch's channels_last group_norm + silu; on
    Hopper also the three-kernel path (kernels/group_norm_nhwc.cu) against each one-pass kernel that takes the
    shape: the whole-tensor-on-chip kernel (x up to ~36 MB) and the cluster kernel (wide group rows)."""
    for shape in [(2, 128, 128, 512), (2, 128, 128, 320), (2, 64, 64, 640), (2, 32, 32, 1280), (2, 32, 32, 2560),
                  (2, 64, 64, 1920), (1, 128, 128, 512), (2, 128, 128, 640), (1, 256, 256, 512)]:
        group_norm_silu_nhwc_case(bench, shape)


def group_norm_silu_nhwc_case(bench: Bench, shape: tuple[int, ...]) -> None:
    numel, c = math.prod(shape), shape[-1]  # [N, H, W, C]
    w, b = bf16(c), bf16(c)
    fw, fb = fd(w), fd(b)
    sets = copies(lambda: bf16(*shape), numel * 2)
    fsets = [fd(x) for x in sets]
    as_cl = [x.permute(0, 3, 1, 2) for x in sets]  # torch sees NCHW sizes with channels_last strides
    bench.case(f"group_norm+silu channels-last {list(shape)}", 2 * numel * 2,
               [lambda x=x: F.silu(F.group_norm(x, 32, w, b, eps=1e-5)) for x in as_cl],
               [lambda x=x: ops.group_norm(x, 32, fw, fb, eps=1e-5, activation="silu", channels_last=True)
                for x in fsets])
    if torch.cuda.get_device_capability() != (9, 0):
        return

    def with_path(path, x):
        group_norm_path(path)
        return ops.group_norm(x, 32, fw, fb, eps=1e-5, activation="silu", channels_last=True)

    for path, name in ((3, "whole-tensor one-pass"), (1, "cluster one-pass")):
        try:
            with_path(path, fsets[0])
        except CudaError:  # a shape this kernel declines (too large for the chips; narrow rows, big groups)
            continue
        bench.case(f"group_norm+silu channels-last {list(shape)} {name} vs fastdm three-kernel (baseline)",
                   2 * numel * 2, [lambda x=x: with_path(2, x) for x in fsets],
                   [lambda x=x, p=path: with_path(p, x) for x in fsets], baseline_is_fastdm=True)
    group_norm_path(0)


def rms_norm_heads(bench: Bench) -> None:
    shape = (1, 4608, 24, 128)
    numel = math.prod(shape)
    w = bf16(128)
    fw = fd(w)
    sets = copies(lambda: bf16(*shape), numel * 2)
    bench.case("rms_norm heads [1,4608,24,128]", 2 * numel * 2,
               [lambda x=x: F.rms_norm(x, (128,), w, eps=1e-6) for x in sets],
               [lambda x=x: ops.rms_norm(x, fw, eps=1e-6) for x in map(fd, sets)])


def torch_rope(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (use_real, unbind_dim=-1) on x [B, S, H, D]; cos_full, sin_full [S, 1, D]."""
    xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-xi, xr], dim=-1).flatten(3)
    return (x.float() * cos_full + rot.float() * sin_full).to(x.dtype)


def qk_norm_rope(bench: Bench) -> None:
    b, s, h, d = 1, 4608, 24, 128
    numel = b * s * 3 * h * d
    wq, wk = bf16(d), bf16(d)
    theta = torch.rand(s, d // 2, device="cuda") * 100
    cos, sin = torch.cos(theta), torch.sin(theta)
    cos_full = cos.repeat_interleave(2, dim=-1)[:, None, :]
    sin_full = sin.repeat_interleave(2, dim=-1)[:, None, :]
    sets = copies(lambda: bf16(b, s, 3, h, d), numel * 2)
    fc, fs, fwq, fwk = fd(cos), fd(sin), fd(wq), fd(wk)

    def torch_seq(qkv):  # diffusers FluxAttention: norm_q, norm_k, then the rotary embedding on q and k
        q = F.rms_norm(qkv[:, :, 0], (d,), wq, eps=1e-6)
        k = F.rms_norm(qkv[:, :, 1], (d,), wk, eps=1e-6)
        return torch_rope(q, cos_full, sin_full), torch_rope(k, cos_full, sin_full), qkv[:, :, 2]

    def fastdm_unfused(qkv):  # what models/denoisers/flux.py does today: four kernels
        q = ops.rope(ops.rms_norm(qkv[:, :, 0], fwq, eps=1e-6), fc, fs)
        k = ops.rope(ops.rms_norm(qkv[:, :, 1], fwk, eps=1e-6), fc, fs)
        return q, k, qkv[:, :, 2]

    fsets = [fd(x) for x in sets]
    bench.case("qk_norm_rope [1,4608,3,24,128] new out (torch: 2 rms_norm + 2 rope)", 2 * numel * 2,
               [lambda x=x: torch_seq(x) for x in sets],
               [lambda x=x: ops.qk_norm_rope(x, fwq, fwk, fc, fs, eps=1e-6) for x in fsets])
    bench.case("qk_norm_rope in place (q, k only)", 2 * (2 * numel // 3) * 2,
               [lambda x=x: torch_seq(x) for x in sets],
               [lambda x=x: ops.qk_norm_rope(x, fwq, fwk, fc, fs, eps=1e-6, out=x) for x in fsets])
    bench.case("qk_norm_rope in place vs fastdm unfused (baseline: 2 rms_norm + 2 rope kernels)",
               2 * (2 * numel // 3) * 2, [lambda x=x: fastdm_unfused(x) for x in fsets],
               [lambda x=x: ops.qk_norm_rope(x, fwq, fwk, fc, fs, eps=1e-6, out=x) for x in fsets],
               baseline_is_fastdm=True)


CASES = {"ln_mod": layer_norm_modulate, "geglu": gelu_mul, "group_norm": group_norm_silu,
         "group_norm_nhwc": group_norm_silu_nhwc, "rms_norm": rms_norm_heads, "qk_norm_rope": qk_norm_rope}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30, help="calls per 'GPU' timing (default 30)")
    p.add_argument("--only", choices=list(CASES), action="append", help="run only these cases (repeatable)")
    args = p.parse_args()
    torch.manual_seed(0)
    bench = Bench(args.iters)
    for name in args.only or list(CASES):
        CASES[name](bench)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
