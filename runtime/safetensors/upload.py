"""Checkpoint bytes -> GPU memory at disk / PCIe speed.

The pipeline: the tensors to load are cut into chunks of at most `chunk_bytes` (small tensors packed together,
big ones split). Reader threads fill a ring of pinned staging buffers with os.preadv (a plain read from the page
cache or disk, which releases the GIL; no page faults as with touching an mmap). The calling thread takes the
chunks in order, enqueues one async host-to-device copy per tensor piece on a dedicated copy stream and records an
event per staging buffer; a reader reuses a buffer only after that event has completed. Chunk i always uses
buffer i % buffers, so readers and the submitter never deadlock: chunk i waits only on chunk i - buffers.

Each tensor gets its own allocation from the caching allocator by default (a stream-ordered pool allocation is
cheap, and each weight stays freeable on its own); `one_allocation=True` instead carves all tensors that keep their
dtype out of one buffer (256-byte aligned), for bench/load.py to compare. Dtype conversion happens on the device:
a tensor to convert is uploaded in its file dtype into a temporary, then ops.cast runs on the current stream as
soon as its last piece is enqueued, so at most a few temporaries are alive at once.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import SafetensorsError
from .loader import LoadItem


@dataclass
class UploadConfig:
    """Knobs of the staging pipeline (bench/load.py sweeps them)."""

    threads: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    chunk_bytes: int = 32 << 20
    buffers: int = 12  # staging buffers; more than threads so readers rarely wait on copies still in flight
    one_allocation: bool = False  # one device buffer for all tensors instead of one per tensor


CONFIG = UploadConfig()
_ALIGN = 256  # byte alignment of tensors carved out of one allocation (what cudaMalloc guarantees)


# --------------------------------------------------------------------------------------------------- plan
@dataclass
class Chunk:
    reads: list[list[int]]  # [item index, file offset, staging offset, nbytes]; file-contiguous runs merged
    copies: list[tuple[int, int, int, int]]  # (item index, offset in the tensor, staging offset, nbytes)
    starts: list[int]  # items whose first byte is in this chunk
    ends: list[int]  # items whose last byte is in this chunk


def plan_chunks(items: list[LoadItem], chunk_bytes: int) -> list[Chunk]:
    """Pack the items' bytes, in order, into chunks of at most chunk_bytes."""
    chunks: list[Chunk] = []
    cur = Chunk([], [], [], [])
    used = 0
    for i, it in enumerate(items):
        done, total = 0, it.entry.nbytes
        while done < total:
            if used == chunk_bytes:
                chunks.append(cur)
                cur, used = Chunk([], [], [], []), 0
            n = min(total - done, chunk_bytes - used)
            src = it.entry.begin + done
            last = cur.reads[-1] if cur.reads else None
            if last is not None and items[last[0]].file is it.file and last[1] + last[3] == src:
                last[3] += n  # staging is packed densely, so file-contiguous means staging-contiguous
            else:
                cur.reads.append([i, src, used, n])
            cur.copies.append((i, done, used, n))
            if done == 0:
                cur.starts.append(i)
            done += n
            used += n
            if done == total:
                cur.ends.append(i)
    if cur.copies:
        chunks.append(cur)
    return chunks


# ------------------------------------------------------------------------------------------ staging ring
_ring_lock = threading.Lock()
_ring: list = []  # cached PinnedBuffers: pinning memory is slow, and a model loads in several calls


def _take_ring(count: int, nbytes: int) -> tuple[list, bool]:
    """Staging buffers for one upload and whether they are the shared cached set (to give back)."""
    from ..memory import PinnedBuffer

    if _ring_lock.acquire(blocking=False):
        try:
            if len(_ring) != count or any(b.nbytes != nbytes for b in _ring):
                free_staging_buffers(locked=True)
                _ring.extend(PinnedBuffer(nbytes) for _ in range(count))
            return list(_ring), True
        except BaseException:
            _ring_lock.release()
            raise
    return [PinnedBuffer(nbytes) for _ in range(count)], False  # another upload holds the cached set


def _give_back(ring: list, cached: bool) -> None:
    if cached:
        _ring_lock.release()
    else:
        for b in ring:
            b.free()


def free_staging_buffers(locked: bool = False) -> None:
    """Release the cached pinned staging buffers (they are allocated again by the next GPU load)."""
    if not locked:
        _ring_lock.acquire()
    try:
        for b in _ring:
            b.free()
        _ring.clear()
    finally:
        if not locked:
            _ring_lock.release()


# ------------------------------------------------------------------------------------------------ reading
def _read_exact(fd: int, offset: int, view: memoryview, path: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise SafetensorsError(f"{path}: the file ended at byte {offset + got} while loading; it was truncated "
                                   "or replaced after it was opened. Open it again.")
        got += n


# ------------------------------------------------------------------------------------------------- upload
def upload(items: list[LoadItem], device) -> dict:
    """Load `items` onto a GPU; returns name -> Tensor, in the order of `items`."""
    from .. import cuda
    from ..memory import allocator
    from ..tensor import Tensor, contiguous_strides, empty

    dev = cuda.device(device)
    dev.set_current()
    cfg = CONFIG
    order = sorted(range(len(items)), key=lambda i: (items[i].file.path, items[i].entry.begin))
    seq = [items[i] for i in order]
    chunks = plan_chunks(seq, cfg.chunk_bytes)
    cur_stream = cuda.current_stream(dev)

    # Destinations of tensors that keep their dtype: allocated before any byte is read, so an out-of-memory
    # error comes first. Tensors to convert get a temporary when their first piece is enqueued.
    dst: list = [None] * len(seq)
    plain = [k for k, it in enumerate(seq) if it.out == it.src]
    if cfg.one_allocation:
        offsets, pos = {}, 0
        for k in plain:
            offsets[k] = pos
            pos += -(-seq[k].entry.nbytes // _ALIGN) * _ALIGN
        whole = allocator(dev).alloc(pos, cur_stream)
        for k in plain:
            it = seq[k]
            dst[k] = Tensor(whole, it.entry.shape, contiguous_strides(it.entry.shape),
                            offsets[k] // it.src.itemsize, it.src, dev)
    else:
        for k in plain:
            dst[k] = empty(seq[k].entry.shape, seq[k].src, dev)
    out: dict = {}
    for k, it in enumerate(seq):
        if dst[k] is not None:
            out[it.name] = dst[k]
    if not chunks:
        return {it.name: out[it.name] for it in items}

    copy_stream = cuda.Stream(dev)
    copy_stream.wait(cur_stream.record())  # allocations are ordered on the current stream
    nslots = max(2, cfg.buffers)
    ring, cached = _take_ring(nslots, cfg.chunk_bytes)
    views = [memoryview(b.array(dtype=np.uint8)).cast("B") for b in ring]
    slot_done = [cuda.Event(timing=False) for _ in range(nslots)]
    filled = [threading.Event() for _ in chunks]
    submitted = [threading.Event() for _ in chunks]
    state = {"next": 0, "error": None, "abort": False}
    lock = threading.Lock()

    def reader() -> None:
        try:
            while True:
                with lock:
                    ci = state["next"]
                    state["next"] += 1
                if ci >= len(chunks) or state["abort"]:
                    return
                slot = ci % nslots
                if ci >= nslots:
                    submitted[ci - nslots].wait()
                    if state["abort"]:
                        return
                    slot_done[slot].synchronize()  # the copies out of this buffer have finished
                for k, off, stage, n in chunks[ci].reads:
                    f = seq[k].file
                    _read_exact(f.fileno(), off, views[slot][stage:stage + n], f.path)
                filled[ci].set()
        except BaseException as e:  # handed to the submitting thread, which raises it
            with lock:
                if state["error"] is None:
                    state["error"] = e
                state["abort"] = True
            for ev in filled:
                ev.set()

    threads = [threading.Thread(target=reader, name=f"fastdm-load-{t}", daemon=True)
               for t in range(max(1, min(cfg.threads, len(chunks))))]
    for t in threads:
        t.start()
    try:
        from .. import ops

        for ci, chunk in enumerate(chunks):
            filled[ci].wait()
            if state["error"] is not None:
                raise state["error"]
            slot = ci % nslots
            new = [k for k in chunk.starts if dst[k] is None]
            for k in new:
                dst[k] = empty(seq[k].entry.shape, seq[k].src, dev)
            if new:
                copy_stream.wait(cur_stream.record())
            base = ring[slot].ptr
            for k, toff, stage, n in chunk.copies:
                cuda.memcpy_htod(dst[k].data_ptr + toff, base + stage, n, stream=copy_stream)
            slot_done[slot].record(copy_stream)
            submitted[ci].set()
            casts = [k for k in chunk.ends if seq[k].out != seq[k].src]
            if casts:
                cur_stream.wait(slot_done[slot])
                for k in casts:
                    out[seq[k].name] = ops.cast(dst[k], seq[k].out)
                    dst[k] = None  # the temporary is freed in stream order, after the cast
        # Zero-byte tensors to convert never appear in a chunk.
        for it in seq:
            if it.name not in out:
                out[it.name] = empty(it.entry.shape, it.out, dev)
        cur_stream.wait(copy_stream.record())
    finally:
        state["abort"] = True
        for ev in submitted:
            ev.set()
        for t in threads:
            t.join()
        try:
            copy_stream.synchronize()  # staging buffers are reused by the next load
        finally:
            _give_back(ring, cached)
    return {it.name: out[it.name] for it in items}
