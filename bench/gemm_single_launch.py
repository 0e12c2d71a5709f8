"""GEMM kernel time one launch at a time on an idle GPU: fastdm's automatic choice against torch F.linear (cuBLAS)
at bench/kernels.py's GEMM shapes, on fixed buffers.

    . bench/device_env.sh && python bench/gemm_single_launch.py

Each measurement (timing.device_ms) is one launch queued behind a GPU spin (so the GPU is idle and the host has
issued it before it starts), writing the same output buffer every time; the median of --launches. A second column
times ten launches back to back. Sweeps (bench/gemm_sweep.py) and bench/kernels.py time long back-to-back runs into
freshly allocated outputs: on the H100 the same kernel's time there moves with the output buffer's address and, on
the multi-ms Wan GEMMs, with sustained power draw (docs/benchmarks.md session 13); this script holds both fixed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch  # bench/ is the baseline side: torch is allowed here
import torch.nn.functional as F
from fastdm.runtime import cuda
from fastdm.runtime.dlpack import from_dlpack
from fastdm.runtime.ops import cuda as ops

from fastdm import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_ms, gemm_bench_shapes  # noqa: E402


def time_shape(name: str, m: int, k: int, n: int, launches: int, lib) -> str:
    """One table row: torch and fastdm on the same inputs, each writing one fixed output buffer."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    xf, wf, bf, of = from_dlpack(x), from_dlpack(w), from_dlpack(b), from_dlpack(out)

    def ours():
        ops.linear(xf, wf, bf, out=of)

    def theirs():  # torch's caching allocator hands back the same block every call
        return F.linear(x, w, b)

    ours()
    theirs()
    torch.cuda.synchronize()
    config = lib.fdm_gemm_sm90_last_config() if lib.fdm_gemm_last_path() == 1 else "-"
    ref = theirs().float()
    err = float((out.float() - ref).norm() / ref.norm())
    if m * n * k >= 5e11:  # the multi-ms Wan shapes
        launches = max(6, launches // 3)
    # device_ms: `reps` launches back to back behind a GPU spin, the median over `batches`
    t1, o1 = device_ms(theirs, reps=1, batches=launches), device_ms(ours, reps=1, batches=launches)
    t10, o10 = device_ms(theirs, reps=10, batches=6), device_ms(ours, reps=10, batches=6)
    flag = "" if err < 2e-2 else f" (rel L2 vs torch {err:.1e}: WRONG)"
    return (f"| {name} | {t1:.4f} | {o1:.4f} ({config}){flag} | {t1 / o1:.3f}x | {t10:.4f} / {o10:.4f}, "
            f"{t10 / o10:.3f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=30, help="measurements per shape (a third for the Wan shapes)")
    args = p.parse_args()
    lib = kernels.library()
    print(f"card: {torch.cuda.get_device_name(0)}  (torch {torch.__version__})")
    print("| shape | torch ms | fastdm ms (sm90 config) | torch/fastdm, single launch | ten back to back: torch / "
          "fastdm ms, ratio |")
    print("|---|---|---|---|---|")
    stream = torch.cuda.Stream()
    torch.cuda.set_stream(stream)  # both libraries on one stream, behind the same spin
    with cuda.use_stream(cuda.Stream.from_handle(stream.cuda_stream)):
        for name, (m, k, n) in gemm_bench_shapes().items():
            print(time_shape(name, m, k, n, args.launches, lib), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
