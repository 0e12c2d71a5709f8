"""Two (or more) builds of the kernel library timed against each other: each build in its own processes
(FASTDM_KERNELS_LIB), the builds alternated, every case timed the same way in each.

Run on the GPU machine, with the libraries built elsewhere (e.g. main's and a change's):
    . bench/device_env.sh && python bench/ab_libraries.py /tmp/lib_main.so /tmp/lib_new.so --cases producers

Cases (--cases, comma-separated):
  groupnorm  GroupNorm + SiLU alone, channels-last at the SDXL UNet / VAE shapes the one-pass kernels take, the NCHW
             bench shape, and channels-last on the three-kernel path (forced)
  producers  the channels-last GroupNorm's statistics producers: add / add with statistics / add + GroupNorm, and
             concatenation with statistics / concatenation + GroupNorm
  gemm       ops.linear (+ bias) at bench/kernels.py's GEMM shapes, with torch's linear (cuBLAS) timed in turn in the
             same process and fastdm's time as a percentage of it ("linear/cublas %"): GEMM times drift 3-5% between
             processes, and the cuBLAS row shows how much
  attention  ops.attention at bench/kernels.py's shapes and SDXL's, with cuDNN SDPA timed in turn in the same process
             ("attention/cudnn %", as for gemm)
Times are device microseconds a call (timing.interleaved_ms: the case's calls timed in turn, --rounds rounds, inputs
rotating over 3x the L2 for the memory-bound cases). Within one process the same clocks hit every call of a case;
between builds, --alternations runs each build that many times in turn (A B A B), and the table shows every run, so
drift between processes is visible next to the difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASE_SETS = ("groupnorm", "producers", "gemm", "attention")
# name: (B, Sq, Sk, H, D), timed after bench/kernels.py's ATTN_SHAPES (self-attention): SDXL's (batch 2 for CFG,
# head dim 64).
SDXL_ATTENTION_SHAPES = {
    "sdxl 64x64 self S=4096 H=10 D=64": (2, 4096, 4096, 10, 64),
    "sdxl 32x32 self S=1024 H=20 D=64": (2, 1024, 1024, 20, 64),
    "sdxl 64x64 cross Sk=77 H=10 D=64": (2, 4096, 77, 10, 64),
}


def measure(case_sets: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """In this process (the library FASTDM_KERNELS_LIB names): {case: {call: us}}."""
    sys.path.insert(0, str(HERE))
    import torch  # bench/ is the baseline side: torch is allowed here
    import torch.nn.functional as F
    from fastdm.runtime import ops
    from timing import bench_kernels_module, interleaved_ms, same_stream

    from fastdm import kernels

    bk = bench_kernels_module()
    torch.manual_seed(0)
    out: dict[str, dict[str, float]] = {}

    def bf16(*dims):
        return torch.randn(*dims, dtype=torch.bfloat16, device="cuda")

    def timed(name, fns, path=0):
        kernels.call("fdm_group_norm_set_path", path)
        try:
            with same_stream():
                ms = interleaved_ms(fns, reps=20, rounds=rounds)
        finally:
            kernels.call("fdm_group_norm_set_path", 0)
        out[name] = {k: round(v * 1e3, 2) for k, v in ms.items()}

    def gn(x, w, b, channels_last=True, stats=None):
        return ops.group_norm(x, 32, w, b, eps=1e-6, activation="silu", channels_last=channels_last, stats=stats)

    def affine(c):
        return bk.fd(bf16(c)), bk.fd(bf16(c))

    if "groupnorm" in case_sets:
        for shape in [(2, 128, 128, 512), (1, 128, 128, 512), (2, 64, 64, 1280), (2, 64, 64, 640),
                      (2, 128, 128, 320), (2, 32, 32, 1280)]:
            w, b = affine(shape[-1])
            _, ox = bk.rotating(lambda shape=shape: (bf16(*shape),), math.prod(shape) * 2)
            timed(f"group_norm channels-last {list(shape)}", {"gn": lambda ox=ox, w=w, b=b: gn(ox()[0], w, b)})
        for shape in [(2, 512, 128, 128)]:
            w, b = affine(shape[1])
            _, ox = bk.rotating(lambda shape=shape: (bf16(*shape),), math.prod(shape) * 2)
            timed(f"group_norm NCHW {list(shape)}", {"gn": lambda ox=ox, w=w, b=b: gn(ox()[0], w, b, False)})
        for shape in [(2, 128, 128, 512), (1, 256, 256, 512), (2, 128, 128, 960)]:
            w, b = affine(shape[-1])
            _, ox = bk.rotating(lambda shape=shape: (bf16(*shape),), math.prod(shape) * 2)
            timed(f"group_norm channels-last three-kernel {list(shape)}",
                  {"gn": lambda ox=ox, w=w, b=b: gn(ox()[0], w, b)}, path=2)

    if "producers" in case_sets:
        for shape, bshape in [((2, 128, 128, 512), (2, 128, 128, 512)), ((2, 128, 128, 320), (2, 1, 1, 320)),
                              ((2, 64, 64, 640), (2, 1, 1, 640)), ((2, 32, 32, 1280), (2, 32, 32, 1280)),
                              ((1, 256, 256, 512), (1, 256, 256, 512)), ((1, 512, 512, 256), (1, 512, 512, 256))]:
            w, b = affine(shape[-1])
            _, oa = bk.rotating(lambda shape=shape, bshape=bshape: (bf16(*shape), bf16(*bshape)), math.prod(shape) * 2)

            def pair(oa=oa, w=w, b=b):
                s, stats = ops.add_group_stats(*oa(), 32)
                return gn(s, w, b, stats=stats)

            timed(f"add {list(shape)} + {list(bshape)}", {
                "add": lambda oa=oa: ops.add(*oa()),
                "add_stats": lambda oa=oa: ops.add_group_stats(*oa(), 32),
                "add + gn": pair,
            })
        for sa, sb in [((2, 128, 128, 640), (2, 128, 128, 320)), ((2, 64, 64, 1280), (2, 64, 64, 640))]:
            w, b = affine(sa[-1] + sb[-1])
            _, oa = bk.rotating(lambda sa=sa, sb=sb: (bf16(*sa), bf16(*sb)), (math.prod(sa) + math.prod(sb)) * 2)

            def cpair(oa=oa, w=w, b=b):
                s, stats = ops.concat_group_stats(*oa(), 32)
                return gn(s, w, b, stats=stats)

            timed(f"concat {list(sa)} + {sb[-1]}", {
                "concat_stats": lambda oa=oa: ops.concat_group_stats(*oa(), 32),
                "concat + gn": cpair,
            })

    if "gemm" in case_sets:
        for name, (m, k, n) in bk.GEMM_SHAPES.items():
            tx, tw, tb = bf16(m, k), bf16(n, k) * k**-0.5, bf16(n)
            x, wt, bias = bk.fd(tx), bk.fd(tw), bk.fd(tb)
            case = f"linear {name}"
            timed(case, {"linear": lambda x=x, wt=wt, bias=bias: ops.linear(x, wt, bias),
                         "cublas": lambda tx=tx, tw=tw, tb=tb: F.linear(tx, tw, tb)})
            # GEMM times drift between processes by as much as the differences an A/B looks for: identical GEMM
            # code measured 0.89-1.10x of itself at 3 rounds and one alternation, 0.97-1.05x at 5 rounds and two
            # (H100); cuBLAS timed in turn in the same process drifts about as much (0.96-1.04x), so its row shows
            # how much of a difference is drift. Only a change well outside that spread reads as one.
            out[case]["linear/cublas %"] = round(100 * out[case]["linear"] / out[case]["cublas"], 2)
            if name == "flux mlp 3072->12288":  # the activation epilogue, against torch's linear then gelu
                case = f"linear+gelu_tanh {name}"
                timed(case, {
                    "linear+gelu_tanh": lambda x=x, wt=wt, bias=bias: ops.linear(x, wt, bias, activation="gelu_tanh"),
                    "torch": lambda tx=tx, tw=tw, tb=tb: F.gelu(F.linear(tx, tw, tb), approximate="tanh")})
    if "attention" in case_sets:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        bench_rows = {name: (b, s, s, h, d) for name, (b, s, h, d) in bk.ATTN_SHAPES.items()}
        for name, (b, sq, sk, h, d) in {**bench_rows, **SDXL_ATTENTION_SHAPES}.items():
            q, k, v = bf16(b, sq, h, d), bf16(b, sk, h, d), bf16(b, sk, h, d)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # torch wants [B, H, S, D]
            qf, kf, vf = bk.fd(q), bk.fd(k), bk.fd(v)

            def cudnn(qt=qt, kt=kt, vt=vt):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt)

            case = f"attention {name}"
            fns = {"attention": lambda qf=qf, kf=kf, vf=vf: ops.attention(qf, kf, vf), "cudnn": cudnn}
            try:
                cudnn()
            except RuntimeError:  # cuDNN declines the shape on this build: fastdm's time alone
                del fns["cudnn"]
            timed(case, fns)
            if "cudnn" in fns:
                out[case]["attention/cudnn %"] = round(100 * out[case]["attention"] / out[case]["cudnn"], 2)
    return out


def run_child(lib: str, case_sets: list[str], rounds: int) -> dict:
    """One process measuring with `lib`: its JSON line."""
    env = dict(os.environ, FASTDM_KERNELS_LIB=str(Path(lib).resolve()), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--cases", ",".join(case_sets),
           "--rounds", str(rounds)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ab_libraries: the run with {lib} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(libs: list[str], runs: list[tuple[int, dict]]) -> str:
    """Markdown: a row per (case, call), a column per library with every run's time, then each library's mean
    against the first's."""
    per_lib: list[list[dict]] = [[r for i, r in runs if i == j] for j in range(len(libs))]
    names = [f"{chr(ord('A') + j)}" for j in range(len(libs))]
    head = "| case | call (us unless named) | " + " | ".join(names) + " | " + " | ".join(
        f"{n}/A" for n in names[1:]) + " |"
    lines = [", ".join(f"{n} = {lib}" for n, lib in zip(names, libs, strict=True)), "", head,
             "|" + "---|" * (2 + 2 * len(libs) - 1)]
    first = per_lib[0][0]
    for case, calls in first.items():
        for call in calls:
            cols, means = [], []
            for results in per_lib:
                vals = [r.get(case, {}).get(call) for r in results]
                vals = [v for v in vals if v is not None]
                cols.append(" / ".join(f"{v:.2f}" for v in vals) if vals else "-")
                means.append(sum(vals) / len(vals) if vals else None)
            ratios = [f"{m / means[0]:.3f}" if m is not None and means[0] else "-" for m in means[1:]]
            lines.append(f"| {case} | {call} | " + " | ".join(cols) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("libs", nargs="*", help="kernel library builds (.so); the first is the reference")
    p.add_argument("--cases", default="groupnorm,producers", help=f"comma-separated, of {', '.join(CASE_SETS)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds a case within one process")
    p.add_argument("--alternations", type=int, default=2, help="processes a library, run in turn")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    case_sets = [c for c in args.cases.split(",") if c]
    unknown = [c for c in case_sets if c not in CASE_SETS]
    if unknown:
        p.error(f"unknown case set(s) {unknown}; choose from {', '.join(CASE_SETS)}")
    if args.child:
        print(json.dumps(measure(case_sets, args.rounds)))
        return
    if len(args.libs) < 2:
        p.error("give at least two library builds")
    missing = [lib for lib in args.libs if not Path(lib).is_file()]
    if missing:
        p.error(f"no such library file: {', '.join(missing)}")
    runs = []
    for _ in range(args.alternations):
        for j, lib in enumerate(args.libs):
            runs.append((j, run_child(lib, case_sets, args.rounds)))
            print(f"ab_libraries: run {len(runs)} of {args.alternations * len(args.libs)} done ({lib})",
                  file=sys.stderr, flush=True)
    print(table(args.libs, runs))


if __name__ == "__main__":
    main()
