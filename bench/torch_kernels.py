"""Which kernels torch (cuBLAS / cuDNN) runs for each GEMM shape of bench/kernels.py, with their device time.

Run on a GPU machine with torch:  python bench/torch_kernels.py
For reading alongside ncu: the tile shape, stages and cluster are in cuBLAS's kernel names
(nvjet_sm90_tst_<tile>_<k-tile>x<stages>_<cluster>...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch  # bench/ is the baseline side: torch is allowed here
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import gemm_bench_shapes  # noqa: E402


def main() -> None:
    print("| shape (M, K, N) | torch kernel | us per call |")
    print("|---|---|---|")
    for name, (m, k, n) in gemm_bench_shapes().items():
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            F.linear(x, w, b)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                F.linear(x, w, b)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" and ev.count >= 10:
                us = ev.device_time_total / ev.count
                print(f"| {name} ({m}, {k}, {n}) | `{ev.key[:110]}` | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
