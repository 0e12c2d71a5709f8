"""Checkpoint loading benchmark: fastdm's safetensors loader vs safetensors.torch.load_file, both to the GPU.

Run on a GPU machine with torch and safetensors installed:  python bench/load.py [--size-gb 12] [--dir DIR]
Writes (or reuses) a sharded bf16 checkpoint of FLUX-like tensors, warms the page cache, then alternates timed
loads of all shards: fastdm (`load(dir, device="cuda")`, then a stream synchronize) and the safetensors package
(`load_file(shard, device="cuda")` for every shard, then torch.cuda.synchronize()). Prints one line per run and a
final table (best and median GB/s of each, ratio torch time / fastdm time, fraction of the measured pinned
host-to-device bandwidth), and checks a few tensors are bit-identical between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.torch as st_torch
import torch  # bench/ is the baseline side: torch is allowed here
from fastdm.runtime import cuda, memory
from fastdm.runtime.safetensors import load, open_checkpoint, save_sharded
from fastdm.runtime.safetensors import upload as upload_mod

GB = 1e9
D, MLP = 3072, 12288  # FLUX.1 hidden size and MLP width


def flux_like_shapes(target_bytes: int) -> dict[str, tuple[int, ...]]:
    """FLUX transformer tensor names and shapes (double-stream blocks, weights and norms), as many blocks as fit
    target_bytes in bf16 (at least one; 16 tensors / 680 MB per block: 12 GB is 17 blocks, 278 tensors)."""
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.weight": (D, 64), "context_embedder.weight": (D, 4096),
        "time_text_embed.timestep_embedder.linear_1.weight": (D, 256),
        "time_text_embed.timestep_embedder.linear_2.weight": (D, D),
        "norm_out.linear.weight": (2 * D, D), "proj_out.weight": (64, D),
    }
    size = sum(int(np.prod(s)) * 2 for s in shapes.values())
    i = 0
    while True:
        p = f"transformer_blocks.{i}."
        block = {
            p + "norm1.linear.weight": (6 * D, D), p + "norm1_context.linear.weight": (6 * D, D),
            p + "attn.to_q.weight": (D, D), p + "attn.to_k.weight": (D, D), p + "attn.to_v.weight": (D, D),
            p + "attn.add_q_proj.weight": (D, D), p + "attn.add_k_proj.weight": (D, D),
            p + "attn.add_v_proj.weight": (D, D), p + "attn.to_out.0.weight": (D, D),
            p + "attn.to_add_out.weight": (D, D), p + "attn.norm_q.weight": (128,), p + "attn.norm_k.weight": (128,),
            p + "ff.net.0.proj.weight": (MLP, D), p + "ff.net.2.weight": (D, MLP),
            p + "ff_context.net.0.proj.weight": (MLP, D), p + "ff_context.net.2.weight": (D, MLP),
        }
        block_bytes = sum(int(np.prod(s)) * 2 for s in block.values())
        if i > 0 and size + block_bytes > target_bytes:
            return shapes
        shapes.update(block)
        size += block_bytes
        i += 1


def ensure_checkpoint(folder: Path, size_gb: float, shard_gb: float, rewrite: bool) -> Path:
    """The benchmark checkpoint in `folder`, written unless an identical one is already there."""
    stamp = {"size_gb": size_gb, "shard_gb": shard_gb, "version": 1}
    stamp_file = folder / "bench_stamp.json"
    index = folder / "model.safetensors.index.json"
    if not rewrite and index.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        try:
            open_checkpoint(folder).close()
            print(f"reusing {folder}", flush=True)
            return index
        except Exception as e:  # noqa: BLE001  (a broken leftover is rewritten)
            print(f"rewriting {folder}: {e}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    t0 = time.perf_counter()
    shapes = flux_like_shapes(int(size_gb * GB))
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=512 << 20, dtype=np.uint8)  # random bytes; tensors are slices at random offsets
    tensors = {}
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        start = int(rng.integers(0, (pool.size - nbytes) // 2)) * 2
        tensors[name] = pool[start:start + nbytes].view(ml_dtypes.bfloat16).reshape(shape)
    save_sharded(tensors, folder, max_shard_bytes=int(shard_gb * GB), metadata={"format": "pt"})
    stamp_file.write_text(json.dumps(stamp))
    total = sum(t.nbytes for t in tensors.values())
    print(f"wrote {len(tensors)} tensors, {total / GB:.2f} GB in {time.perf_counter() - t0:.1f} s to {folder}",
          flush=True)
    return index


def warm_page_cache(files: list[str]) -> None:
    """Read every file once so both loaders read from memory, not disk."""
    def read_all(path: str) -> int:
        buf = bytearray(64 << 20)
        n = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                got = f.readinto(buf)
                if not got:
                    return n
                n += got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as ex:
        total = sum(ex.map(read_all, files))
    dt = time.perf_counter() - t0
    print(f"page cache warmed: {total / GB:.2f} GB in {dt:.1f} s ({total / GB / dt:.1f} GB/s)", flush=True)


def h2d_ceiling() -> float:
    """Pinned host -> device copy bandwidth (GB/s) measured with torch, the upper bound of any loader."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return n / GB / best


def load_fastdm(folder: Path) -> dict:
    out = load(folder, device="cuda")
    cuda.current_stream().synchronize()
    return out


def load_torch(files: list[str]) -> dict:
    out = {}
    for f in files:
        out.update(st_torch.load_file(f, device="cuda"))
    torch.cuda.synchronize()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=12.0, help="checkpoint size (default 12)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="max shard size (default 5, as transformers)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/fastdm_load_bench"), help="checkpoint folder")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each loader (default 3)")
    p.add_argument("--rewrite", action="store_true", help="write the checkpoint again even if it exists")
    p.add_argument("--threads", type=int, default=None, help="fastdm reader threads")
    p.add_argument("--chunk-mb", type=int, default=None, help="fastdm staging chunk size in MiB")
    p.add_argument("--buffers", type=int, default=None, help="fastdm staging buffers in the ring")
    p.add_argument("--one-allocation", action="store_true", help="fastdm: one device buffer for all tensors")
    p.add_argument("--sweep", action="store_true", help="also time fastdm over a grid of threads x chunk sizes")
    args = p.parse_args()

    cfg = upload_mod.CONFIG
    if args.threads:
        cfg.threads = args.threads
    if args.chunk_mb:
        cfg.chunk_bytes = args.chunk_mb << 20
    if args.buffers:
        cfg.buffers = args.buffers
    cfg.one_allocation = args.one_allocation

    t_start = time.perf_counter()
    index = ensure_checkpoint(args.dir, args.size_gb, args.shard_gb, args.rewrite)
    ck = open_checkpoint(index)
    files, names = ck.files, ck.keys()
    numel = {n: int(np.prod(ck.shape(n))) for n in names}
    total = sum(ck.file_of(n).entry(n).nbytes for n in names)
    ck.close()
    warm_page_cache(files)

    dev = cuda.Device(0)
    ceiling = h2d_ceiling()
    print(f"card: {dev.name} ({torch.cuda.get_device_name()}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"safetensors {safetensors.__version__}; pinned H2D ceiling {ceiling:.1f} GB/s", flush=True)
    print(f"checkpoint: {len(names)} tensors, {total / GB:.2f} GB in {len(files)} shards; fastdm staging: "
          f"{cfg.threads} threads, {cfg.buffers} x {cfg.chunk_bytes >> 20} MiB"
          f"{', one allocation' if cfg.one_allocation else ''}", flush=True)

    # Warm-up: CUDA contexts, allocator pools, fastdm's pinned staging ring (allocated once per process).
    small = [n for n in names if n.endswith("norm_q.weight")][:2] + ["proj_out.weight"]
    t0 = time.perf_counter()
    load(index, device="cuda", names=small)
    print(f"fastdm warm-up (context, staging ring): {time.perf_counter() - t0:.2f} s", flush=True)
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()

    times: dict[str, list[float]] = {"fastdm": [], "safetensors.torch": []}
    check = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1], max(names, key=numel.get)]))
    keep: dict[str, dict] = {}
    for r in range(args.runs):
        for who, fn in (("fastdm", lambda: load_fastdm(index.parent)), ("safetensors.torch",
                                                                         lambda: load_torch(files))):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            times[who].append(dt)
            print(f"run {r + 1} {who:>17}: {dt:6.3f} s  {total / GB / dt:6.1f} GB/s", flush=True)
            if r == 0:
                if who == "fastdm":
                    keep[who] = {n: out[n].numpy().view(np.uint16) for n in check}
                else:
                    keep[who] = {n: out[n].view(torch.int16).cpu().numpy().view(np.uint16) for n in check}
                assert len(out) == len(names), f"{who} loaded {len(out)} tensors, expected {len(names)}"
            del out
        # Each run starts with empty allocator caches, as a fresh process loading a model would.
        memory.empty_cache()
        torch.cuda.empty_cache()

    for n in check:
        a, b = keep["fastdm"][n], keep["safetensors.torch"][n]
        if a.shape != b.shape or not np.array_equal(a, b):
            sys.exit(f"MISMATCH: tensor {n!r} differs between fastdm and safetensors.torch")
    print(f"verified: {len(check)} tensors bit-identical between the two loaders ({', '.join(check)})")

    if args.sweep:
        print("\nfastdm sweep (best of 2 runs each) -> GB/s")
        saved = (cfg.threads, cfg.chunk_bytes, cfg.buffers, cfg.one_allocation)
        grid = [(t, c, t + 4, False) for t in (4, 8, 12, 16) for c in (16, 32, 64)]
        grid += [(saved[0], saved[1] >> 20, saved[2], one) for one in (False, True)]
        for threads, chunk_mb, buffers, one in grid:
            cfg.threads, cfg.chunk_bytes, cfg.buffers, cfg.one_allocation = threads, chunk_mb << 20, buffers, one
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                out = load_fastdm(index.parent)
                best = min(best, time.perf_counter() - t0)
                del out
                memory.empty_cache()
            print(f"  threads {threads:2d}, chunk {chunk_mb:3d} MiB, buffers {buffers:2d}, one allocation "
                  f"{'yes' if one else 'no '}: {total / GB / best:6.1f} GB/s", flush=True)
        upload_mod.free_staging_buffers()
        cfg.threads, cfg.chunk_bytes, cfg.buffers, cfg.one_allocation = saved

    print(f"\n{dev.name}, {total / GB:.2f} GB bf16 checkpoint ({len(names)} tensors, {len(files)} shards), page cache "
          f"warm, {args.runs} runs each; pinned H2D ceiling {ceiling:.1f} GB/s")
    print("| loader | best s | median s | best GB/s | median GB/s | of H2D ceiling (best) |")
    print("|---|---|---|---|---|---|")
    for who, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        print(f"| {who} | {best:.3f} | {med:.3f} | {total / GB / best:.1f} | {total / GB / med:.1f} "
              f"| {total / GB / best / ceiling:.0%} |")
    ratio_best = min(times["safetensors.torch"]) / min(times["fastdm"])
    ratio_med = statistics.median(times["safetensors.torch"]) / statistics.median(times["fastdm"])
    print(f"| torch time / fastdm time | {ratio_best:.2f}x (best) | {ratio_med:.2f}x (median) | | | |")
    print(f"total bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
