"""Timing helpers shared by the benchmarks: device-event medians for fastdm and for torch, card ceilings, and the
GEMM shapes of bench/kernels.py for the scripts that look at GEMMs alone."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def time_fastdm(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() measured with CUDA events on fastdm's current stream."""
    from fastdm.runtime import cuda

    stream = cuda.current_stream()
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(iters):
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_ms(end))
    return statistics.median(times)


def time_torch(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() measured with torch CUDA events on torch's current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def without_pdl(fn: Callable[[], object]):
    """fn() with programmatic dependent launch (kernels/pdl.cuh) switched off, the switch restored afterwards: the
    same process, card and clocks for an on/off comparison."""
    from fastdm import kernels

    lib = kernels.library()
    previous = lib.fdm_pdl_set(0)
    try:
        return fn()
    finally:
        lib.fdm_pdl_set(previous)


def device_ms(fn: Callable[[], object], reps: int = 20, batches: int = 5) -> float:
    """Median device milliseconds per call of fn(), run `reps` times back to back on torch's current stream behind a
    GPU spin long enough for the host to queue them all: the kernels' own time, as in a model forward whose host
    runs ahead of the GPU (Python and launch overhead stay out). fastdm work must be on the same stream
    (`same_stream()`)."""
    import time

    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    spin_cycles = int(max(2.0 * host_s, 1e-3) * 2.0e9)  # > the host's issue time at up to 2 GHz
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin_cycles)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def same_stream():
    """A context in which torch's current stream and fastdm's current stream are one new stream (for device_ms)."""
    import contextlib

    import torch
    from fastdm.runtime import cuda

    @contextlib.contextmanager
    def ctx():
        stream = torch.cuda.Stream()
        prev = torch.cuda.current_stream()
        torch.cuda.set_stream(stream)
        try:
            with cuda.use_stream(cuda.Stream.from_handle(stream.cuda_stream)):
                yield stream
        finally:
            torch.cuda.set_stream(prev)

    return ctx()


def card_ceilings() -> dict[str, float]:
    """Measured device-to-device copy bandwidth (GB/s, read+write) and cuBLAS bf16 rate (TFLOP/s) via torch."""
    import torch

    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_torch(lambda: b.copy_(a), warmup=3, iters=10)
    copy_gbs = 2 * n / ms / 1e6
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = time_torch(lambda: x @ y, warmup=3, iters=10)
    return {"copy_GBps": copy_gbs, "bf16_TFLOPs": 2 * m**3 / ms / 1e9}


def pipeline_table(script: str, folder: Path, steps: int, size: int, title: str) -> None:
    """Run `script _pipeline_one --impl torch|fastdm` in a process each (so each peak counts only itself; the last
    stdout line is a JSON dict of load_s, total_s, peak_gib) and print one table of both."""
    res = {}
    for impl in ("torch", "fastdm"):
        out = subprocess.run([sys.executable, script, "_pipeline_one", "--impl", impl, "--dir", str(folder),
                              "--steps", str(steps), "--size", str(size)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{impl} pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}", flush=True)
            continue
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    print(title)
    print("| what | diffusers | fastdm |")
    print("|---|---|---|")
    for key, label in (("total_s", "end to end s (after warm-up)"), ("peak_gib", "peak allocated GiB"),
                       ("load_s", "load s")):
        vals = [f"{res[i][key]:.2f}" if i in res else "failed" for i in ("torch", "fastdm")]
        print(f"| {label} | {vals[0]} | {vals[1]} |", flush=True)


def gemm_bench_shapes() -> dict[str, tuple[int, int, int]]:
    """GEMM_SHAPES of bench/kernels.py, name -> (M, K, N) (loaded by path: a plain `import kernels` could find
    fastdm's kernels/ package instead)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parent / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.GEMM_SHAPES)
