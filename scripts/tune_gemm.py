"""Measure the kernel library's sm90 GEMM configurations on the exact problems a model runs, on this machine's GPU,
and keep each one that beats the library's own choice in the tuning cache (runtime/ops/cuda/gemm_tuning.py), which
every later fastdm process on this card loads.

    python scripts/tune_gemm.py 4608x9216x3072 4608x3072x15360-gated [--reps 10 --batches 5 --margin 0.03]
    python scripts/tune_gemm.py --list

A problem is MxNxK (x [M, K] times weight [N, K]^T) or MxNxK-gated (linear_gated_residual over one sequence of M
rows). Hopper (compute capability 9.0) only; bf16; each problem takes a few seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

if not __package__:  # run as `python scripts/tune_gemm.py` from a checkout: make the checkout importable as fastdm
    _root = Path(__file__).resolve().parents[1]
    if (_root / "fastdm" / "__init__.py").is_file():
        sys.path.insert(0, str(_root))


def config_name(config: int) -> str:
    from fastdm import kernels

    buf = ctypes.create_string_buffer(128)
    kernels.call("fdm_gemm_sm90_config_name", config, buf, len(buf))
    return buf.value.decode()


def main() -> int:
    from fastdm.runtime.errors import FastdmError

    try:
        return run()
    except FastdmError as e:  # no GPU, not Hopper, a bad problem, a broken cache: say so, no traceback
        print(f"tune_gemm: {e}", file=sys.stderr)
        return 2


def run() -> int:
    from fastdm.runtime import cuda
    from fastdm.runtime.ops.cuda import gemm_tuning

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("problems", nargs="*", help="MxNxK or MxNxK-gated")
    p.add_argument("--reps", type=int, default=10, help="calls per timed graph (default 10)")
    p.add_argument("--batches", type=int, default=5, help="rounds, each replaying every configuration's graph once "
                   "(interleaved, so clock drift hits all alike); median taken (default 5)")
    p.add_argument("--margin", type=float, default=0.03,
                   help="keep a configuration only if it is this much faster than the library's choice (0.03)")
    p.add_argument("--list", action="store_true", help="print this card's cache entries and exit")
    args = p.parse_args()
    problems = [gemm_tuning.Problem.parse(t) for t in args.problems]
    if not problems and not args.list:
        p.error("name at least one problem (MxNxK or MxNxK-gated), or --list")
    path = gemm_tuning.cache_path()
    if path is None:
        print("tune_gemm: FASTDM_GEMM_TUNING=off: there is no tuning cache to use", file=sys.stderr)
        return 2
    device = cuda.current_device()
    card = gemm_tuning.card_key(device)
    if args.list:
        entries = gemm_tuning.read_cache(path)["cards"].get(card, {})
        print(f"{path}: {len(entries)} entries for {card}")
        for key, e in sorted(entries.items()):
            print(f"  {key}: config {e['config']} ({config_name(e['config'])}), {e.get('ms')} ms vs the library's "
                  f"choice {e.get('auto_ms')} ms")
        return 0
    print(f"card: {card}; cache: {path}")
    print("| problem | library choice | ms | best | ms | gain |")
    print("|---|---|---|---|---|---|")
    results = []
    for prob in problems:
        r = gemm_tuning.measure(prob, device, reps=args.reps, batches=args.batches)
        results.append(r)
        print(f"| {prob.key} | {r.auto_config} | {r.auto_ms:.4f} | {r.best_config} ({config_name(r.best_config)}) "
              f"| {r.best_ms:.4f} | {r.auto_ms / r.best_ms:.3f}x |", flush=True)
    kept = gemm_tuning.record(results, device, path, margin=args.margin)
    print(f"kept {kept} of {len(results)} (faster than the library's choice by more than {args.margin:.0%}) in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
