"""Timing helpers shared by the benchmarks: device-event medians for fastdm and for torch, card ceilings, and the
GEMM shapes of bench/kernels.py for the scripts that look at GEMMs alone."""

from __future__ import annotations

import functools
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


_SPIN_HZ = 2.0e9  # torch.cuda._sleep counts GPU cycles; a little above the H100/H200 boost clock


def device_ms(fn: Callable[[], object], reps: int = 20, batches: int = 5, stream=None) -> float:
    """Median over `batches` of the device milliseconds per call of `reps` calls of fn() run back to back, queued on
    `stream` (default: torch's current stream) behind a GPU spin long enough for the host to queue them all: the
    kernels' own time, as in a model forward whose host runs ahead of the GPU (Python and launch overhead stay out).
    fn's work must run on that stream (fastdm's: `same_stream()`). A batch whose spin ended before the host finished
    queueing (a slow or busy host) is thrown away and run again with twice the spin; raises after four such tries."""
    import time

    import torch

    stream = stream if stream is not None else torch.cuda.current_stream()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    spin = int(6 * host_s * _SPIN_HZ) + 1_000_000
    times = []
    while len(times) < batches:
        for _ in range(4):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(spin)
                spun = torch.cuda.Event()
                spun.record(stream)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
            for _ in range(reps):
                fn()
            held = not spun.query()
            end.record(stream)
            end.synchronize()
            if held:
                break
            spin *= 2
        else:
            raise RuntimeError("the GPU ran out of queued work before the host finished queueing, four times with a "
                               "doubling spin: the 'device' time would include host time")
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def interleaved_ms(fns: dict, reps: int = 20, rounds: int = 9, batches: int = 1) -> dict:
    """Median device milliseconds per call of each fn over `rounds` rounds, each round timing every fn in turn
    (device_ms: `batches` batches of `reps` calls): clock and power drift over the run then hit every candidate
    alike, where timing one candidate after another lets a slow stretch land on one of them (5-10% on an H100 for
    the same GEMM within one sequential sweep, session 16)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(device_ms(fn, reps, batches))
    return {name: statistics.median(v) for name, v in samples.items()}


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


@functools.cache
def bench_kernels_module():
    """bench/kernels.py as a module (its shapes and its input helpers: fd, rotating, same_size_copy_ms), loaded by
    path: a plain `import kernels` could find fastdm's kernels/ package instead."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parent / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gemm_bench_shapes() -> dict[str, tuple[int, int, int]]:
    """GEMM_SHAPES of bench/kernels.py, name -> (M, K, N)."""
    return dict(bench_kernels_module().GEMM_SHAPES)
