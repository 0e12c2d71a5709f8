"""Writes tests/fixtures/noise_torch_cpu.npz: torch's CPU-generator noise, for models/noise.py to match bit for bit.

Run with the reference venv (torch), from the repo root:
    .venv-ref/bin/python tests/reference/gen_noise.py

torch picks its Box-Muller kernel by CPU capability, so the script runs one worker process per kernel with
ATEN_CPU_CAPABILITY forced ("avx2": torch on x86-64; "default": torch without AVX2, e.g. on aarch64) and checks
that torch really ran that capability.

For every kernel and seed there are two programs of calls:
  fresh: a new generator (manual_seed) for each call, one call per shape;
  seq:   one generator through all calls, with a re-seed in the middle (which must drop the cached normal).
Each result is stored whole when small; the [1, 16, 128, 128] ones are stored as their sha256 plus every
997th element and the last 16 (enough to see where a mismatch is). Raw bits are stored for bf16 (uint16).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "noise_torch_cpu.npz"
SEEDS = [0, 42, 2**32 + 5]
KERNELS = {"avx2": "avx2", "default": "default"}  # fastdm kernel name -> ATEN_CPU_CAPABILITY value
BIG = [1, 16, 128, 128]
FULL_LIMIT = 4096  # results with more elements are stored sampled + hashed

FRESH = [
    ("randn", [1], "float32"), ("randn", [15], "float32"), ("randn", [16], "float32"),
    ("randn", [17], "float32"), ("randn", [1000], "float32"), ("randn", BIG, "float32"),
    ("randn", [17], "bfloat16"), ("randn", [5], "bfloat16"), ("randn", BIG, "bfloat16"),
    ("randn", [33], "float16"),
]
SEQ = [
    ("randn", [1], "float32"), ("randn", [15], "float32"), ("randn", [16], "float32"),
    ("randn", [17], "float32"), ("randn", [1000], "float32"), ("rand", [37], "float32"),
    ("randn", [3], "float32"), ("seed",), ("randn", [1], "float32"), ("randn", [2], "bfloat16"),
    ("randn", [17], "bfloat16"), ("randn", [40], "float16"), ("randn", [2, 3, 5], "float32"),
    ("randn", BIG, "float32"), ("randn", [31], "float32"),
]


def sample_index(n: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(0, n, 997), np.arange(n - 16, n)]))


def bits(t) -> np.ndarray:
    """The raw bits of a result, as a numpy array that npz can hold."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def worker(kernel: str) -> None:
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    want = {"avx2": ("AVX2",), "default": ("DEFAULT",)}[kernel]
    if cap not in want:
        raise SystemExit(f"torch ran with capability {cap}, not {want} (ATEN_CPU_CAPABILITY={kernel})")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    arrays, entries = {}, []

    def record(key: str, seed: int, mode: str, step: int, op, t) -> None:
        b = np.ascontiguousarray(bits(t))
        entry = dict(key=key, kernel=kernel, seed=seed, mode=mode, step=step, op=op[0], shape=list(op[1]),
                     dtype=op[2], sha256=hashlib.sha256(b.tobytes()).hexdigest())
        if b.size > FULL_LIMIT:
            idx = sample_index(b.size)
            arrays[key + "/index"] = idx
            arrays[key] = b.reshape(-1)[idx]
            entry["stored"] = "sampled"
        else:
            arrays[key] = b
            entry["stored"] = "full"
        entries.append(entry)

    for seed in SEEDS:
        for step, op in enumerate(FRESH):
            g = torch.Generator("cpu").manual_seed(seed)
            t = torch.randn(op[1], generator=g, dtype=dtypes[op[2]])
            record(f"{kernel}/{seed}/fresh/{step}", seed, "fresh", step, op, t)
        g = torch.Generator("cpu").manual_seed(seed)
        for step, op in enumerate(SEQ):
            if op[0] == "seed":
                g.manual_seed(seed)
                entries.append(dict(key=None, kernel=kernel, seed=seed, mode="seq", step=step, op="seed"))
                continue
            fn = torch.randn if op[0] == "randn" else torch.rand
            t = fn(op[1], generator=g, dtype=dtypes[op[2]])
            record(f"{kernel}/{seed}/seq/{step}", seed, "seq", step, op, t)

    meta = dict(torch=torch.__version__, capability=cap, libc=list(platform.libc_ver()),
                machine=platform.machine(), entries=entries)
    np.savez(os.environ["GEN_NOISE_OUT"], meta=np.array(json.dumps(meta)), **arrays)


def main() -> None:
    merged, metas = {}, {}
    for kernel, cap in KERNELS.items():
        part = OUT.with_name(f".noise_{kernel}.npz")
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, GEN_NOISE_OUT=str(part))
        subprocess.run([sys.executable, __file__, "--worker", kernel], env=env, check=True)
        with np.load(part) as z:
            for k in z.files:
                if k == "meta":
                    metas[kernel] = json.loads(str(z[k]))
                else:
                    merged[k] = z[k]
        part.unlink()
    meta = dict(generator="tests/reference/gen_noise.py", kernels=metas)
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **merged)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(merged)} arrays)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
