"""sm90 GEMM configuration sweep: every configuration of kernels/gemm.cuh (kSm90Configs) on every benchmark shape,
against torch F.linear (cuBLAS) on the same inputs in the same run.

Run on a Hopper GPU with torch installed (the repo importable as fastdm, the library prebuilt for sm_90a):
    . bench/device_env.sh && python bench/gemm_sweep.py --out /tmp/gemm_sweep.json
Prints, per shape, each configuration's time and torch/fastdm (> 1 means fastdm is faster), flags any
configuration whose output disagrees with torch's, then a summary with the winner per shape and the rows to paste
into kSm90Winners in kernels/gemm.cu. --out writes every number as JSON.

Timing: both libraries run on one CUDA stream; each measurement is the median over --batches of CUDA-event time
of --reps back-to-back calls divided by reps, queued behind a GPU spin so the host has issued them all before the
GPU starts. That is device time per GEMM: Python/ctypes overhead (tens of microseconds, more than a small SDXL
GEMM takes) stays out, as it does in a model whose host runs ahead of the GPU. bench/kernels.py times single
calls instead, host overhead included.

--rounds R (R > 1) interleaves: each round measures torch and every configuration once, in turn, and a
candidate's time is its median over the rounds. Long GEMMs (FLUX, Wan) drift by 5-10% over a sweep as the card
settles at its power cap, which decides a winner when candidates are timed one after another; interleaved, the
drift hits all of them alike. Use it (e.g. --rounds 12 --batches 1) before changing a row of the winners table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch  # bench/ is the baseline side: torch is allowed here
import torch.nn.functional as F
from fastdm.runtime import cuda, memory, ops
from fastdm.runtime.dlpack import from_dlpack

from fastdm import kernels as fdm_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import gemm_bench_shapes, interleaved_ms  # noqa: E402

EXTRA_SHAPES = {  # name: (M, K, N)
    "sdxl 64x64 attn proj 640->640": (8192, 640, 640),
    "sdxl 32x32 attn proj 1280->1280": (2048, 1280, 1280),
    "flux attn out 3072->3072": (4608, 3072, 3072),
    "sdxl 32x32 qkv 1280->3840": (2048, 1280, 3840),
    "sdxl 64x64 qkv 640->1920": (8192, 640, 1920),
    "sdxl 64x64 ff down 2560->640": (8192, 2560, 640),
    # SDXL at 832x1216 (a common portrait size): no measured winners, so these check the rules of sm90_rule
    "sdxl 832x1216 26x38 attn proj 1280->1280": (1976, 1280, 1280),
    "sdxl 832x1216 26x38 qkv 1280->3840": (1976, 1280, 3840),
    "sdxl 832x1216 26x38 ff down 5120->1280": (1976, 5120, 1280),
    "sdxl 832x1216 52x76 ff down 2560->640": (7904, 2560, 640),
    # FLUX.1 1024x1024 double-stream blocks: image (4096 rows) and text (512 rows) streams apart, and the adaLN
    # modulation GEMVs of both block kinds (one row: weight-bandwidth bound)
    "flux double img qkv 3072->9216": (4096, 3072, 9216),
    "flux double img mlp 3072->12288": (4096, 3072, 12288),
    "flux double img mlp 12288->3072": (4096, 12288, 3072),
    "flux double img attn out 3072->3072": (4096, 3072, 3072),
    "flux double txt qkv 3072->9216": (512, 3072, 9216),
    "flux double txt mlp 3072->12288": (512, 3072, 12288),
    "flux double txt mlp 12288->3072": (512, 12288, 3072),
    "flux double txt attn out 3072->3072": (512, 3072, 3072),
    "flux double modulation 3072->18432": (1, 3072, 18432),
    "flux single modulation 3072->9216": (1, 3072, 9216),
}
# Shapes also timed as linear_gated_residual (FLUX's output projections, batch 1: one fused launch; the SDXL UNet's
# residual projections, whose gate is ones).
GATED = {"flux attn out 3072->3072", "flux mlp 12288->3072", "flux single out 15360->3072",
         "sdxl 64x64 attn proj 640->640", "sdxl 32x32 attn proj 1280->1280", "sdxl 64x64 ff down 2560->640",
         "sdxl 32x32 ff 5120->1280", "flux double img mlp 12288->3072", "flux double img attn out 3072->3072",
         "flux double txt mlp 12288->3072", "flux double txt attn out 3072->3072"}
# Shapes also timed with the gelu_tanh epilogue (FLUX's MLP up-projection).
GELU = {"flux mlp 3072->12288", "flux double img mlp 3072->12288", "flux double txt mlp 3072->12288"}
SM90_PATH = 1
PATH_NAMES = {2: "sm80", 3: "simt", 4: "gemv"}  # fdm_gemm_last_path codes other than sm90
MAX_REL_L2 = 2e-2  # vs torch's bf16 output: both round to bf16, so about an ulp apart


def rel_l2(ours, ref: torch.Tensor) -> float:
    got = torch.from_dlpack(ours).float()
    ref = ref.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


class Case:
    """One timed problem: the torch baseline and the fastdm call on the same memory."""

    def __init__(self, name: str, m: int, k: int, n: int, kind: str):
        self.name, self.m, self.k, self.n, self.kind = name, m, k, n, kind
        self.x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        self.w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
        self.b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        self.xf, self.wf, self.bf = from_dlpack(self.x), from_dlpack(self.w), from_dlpack(self.b)
        if kind == "gated":
            self.gate = torch.randn(1, n, dtype=torch.bfloat16, device="cuda")
            self.res = torch.randn(1, m, n, dtype=torch.bfloat16, device="cuda")
            self.x3 = self.x.view(1, m, k)
            self.x3f, self.gatef, self.resf = from_dlpack(self.x3), from_dlpack(self.gate), from_dlpack(self.res)
        torch.cuda.synchronize()

    def torch_fn(self):
        if self.kind == "gelu_tanh":
            return lambda: F.gelu(F.linear(self.x, self.w, self.b), approximate="tanh")
        if self.kind == "gated":
            return lambda: self.res + self.gate[:, None, :] * F.linear(self.x3, self.w, self.b)
        return lambda: F.linear(self.x, self.w, self.b)

    def ours_fn(self):
        if self.kind == "gelu_tanh":
            return lambda: ops.linear(self.xf, self.wf, self.bf, activation="gelu_tanh")
        if self.kind == "gated":
            return lambda: ops.linear_gated_residual(self.x3f, self.wf, self.bf, self.gatef, self.resf)
        return lambda: ops.linear(self.xf, self.wf, self.bf)

    @property
    def label(self) -> str:
        return self.name if self.kind == "bias" else f"{self.name} [{self.kind}]"


def sweep_case(case: Case, lib, names: list[str], configs: list[int], reps: int, batches: int,
               rounds: int = 1) -> dict:
    ref = case.torch_fn()()
    torch.cuda.synchronize()
    ours = case.ours_fn()
    results = {}
    fdm_kernels.call("fdm_gemm_set_path", SM90_PATH)  # a problem of a few rows would otherwise take the GEMV
    for idx in configs:
        if case.kind == "gated" and "lean" in names[idx]:
            continue
        fdm_kernels.call("fdm_gemm_sm90_set_config", idx)
        out = ours()
        torch.cuda.synchronize()
        ran = lib.fdm_gemm_last_path() == SM90_PATH and lib.fdm_gemm_sm90_last_config() == idx
        if not ran:
            results[idx] = {"ms": None, "rel_l2": None, "note": "did not run on sm90 with this configuration"}
            continue
        results[idx] = {"ms": None, "rel_l2": rel_l2(out, ref)}
    # The library's own choice (any path), its configuration and error, from one call.
    fdm_kernels.call("fdm_gemm_sm90_set_config", -1)
    fdm_kernels.call("fdm_gemm_set_path", 0)
    out = ours()
    torch.cuda.synchronize()
    auto = {"config": lib.fdm_gemm_sm90_last_config() if lib.fdm_gemm_last_path() == SM90_PATH else
            PATH_NAMES[lib.fdm_gemm_last_path()], "ms": None, "rel_l2": rel_l2(out, ref)}

    def forced(path, config):
        def run():
            fdm_kernels.call("fdm_gemm_set_path", path)
            fdm_kernels.call("fdm_gemm_sm90_set_config", config)
            return ours()
        return run

    # Time torch, the automatic choice and every configuration that ran, all of them once a round (see --rounds),
    # so that the automatic choice is compared with the others under the same drift.
    timed = [idx for idx, r in results.items() if r["rel_l2"] is not None]
    ms = interleaved_ms({"torch": case.torch_fn(), "auto": forced(0, -1),
                         **{idx: forced(SM90_PATH, idx) for idx in timed}}, reps, rounds, batches)
    fdm_kernels.call("fdm_gemm_sm90_set_config", -1)
    fdm_kernels.call("fdm_gemm_set_path", 0)
    t_ms, auto["ms"] = ms["torch"], ms["auto"]
    for idx in timed:
        results[idx]["ms"] = ms[idx]
    good = {i: r for i, r in results.items() if r["ms"] is not None and r["rel_l2"] < MAX_REL_L2}
    winner = min(good, key=lambda i: good[i]["ms"]) if good else None
    return {"name": case.name, "kind": case.kind, "M": case.m, "K": case.k, "N": case.n, "torch_ms": t_ms,
            "results": results, "auto": auto, "winner": winner}


def print_case(row: dict, names: list[str]) -> None:
    label = row["name"] if row["kind"] == "bias" else f"{row['name']} [{row['kind']}]"
    print(f"\n### {label}: M={row['M']} K={row['K']} N={row['N']}, torch {row['torch_ms']:.4f} ms")
    print("| config | fastdm ms | torch/fastdm | rel L2 vs torch | |")
    print("|---|---|---|---|---|")
    for idx, r in row["results"].items():
        if r["ms"] is None:
            print(f"| {idx} {names[idx]} | - | - | - | {r['note']} |")
            continue
        flag = "WRONG" if not r["rel_l2"] < MAX_REL_L2 else ("winner" if idx == row["winner"] else "")
        print(f"| {idx} {names[idx]} | {r['ms']:.4f} | {row['torch_ms'] / r['ms']:.3f}x | {r['rel_l2']:.2e} "
              f"| {flag} |")
    a = row["auto"]
    print(f"| auto (config {a['config']}) | {a['ms']:.4f} | {row['torch_ms'] / a['ms']:.3f}x | {a['rel_l2']:.2e} | |")


def print_summary(rows: list[dict], names: list[str]) -> None:
    print("\n## Summary (torch/fastdm > 1 means fastdm is faster)")
    print("| shape | torch ms | best config | best ms | best ratio | auto config | auto ms | auto ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        label = row["name"] if row["kind"] == "bias" else f"{row['name']} [{row['kind']}]"
        a, w = row["auto"], row["winner"]
        best = row["results"][w]["ms"] if w is not None else float("nan")
        print(f"| {label} | {row['torch_ms']:.4f} | {w} | {best:.4f} | {row['torch_ms'] / best:.3f}x "
              f"| {a['config']} | {a['ms']:.4f} | {row['torch_ms'] / a['ms']:.3f}x |")
    print("\n## Rows for kSm90Winners in kernels/gemm.cu: {M, N, K, plain winner, gated winner or -1}")
    print("(a linear with an activation runs the plain winner: its gelu_tanh timings above show how that one fares;")
    l2_mib = torch.cuda.get_device_properties(0).L2_cache_size >> 20
    print(f" untagged rows serve every card: to make a row this card's only, append its L2 size, {l2_mib} MiB)")
    by_kind = {(r["M"], r["N"], r["K"], r["kind"]): r for r in rows}
    for row in rows:
        if row["kind"] != "bias" or row["winner"] is None:
            continue
        key = (row["M"], row["N"], row["K"])
        ms = row["results"][row["winner"]]["ms"]
        r = by_kind.get((*key, "gated"))
        # -1 where the plain winner serves the gated form too (it won, or the form was not swept)
        gated = r["winner"] if r is not None and r["winner"] not in (None, row["winner"]) else -1
        note = f"; gated {names[gated]}" if gated >= 0 else ""
        print(f"    {{{row['M']}, {row['N']}, {row['K']}, {row['winner']}, {gated}}},  "
              f"// {row['name']}: {ms:.4f} ms, torch {row['torch_ms']:.4f} ms ({row['torch_ms'] / ms:.2f}x), "
              f"{names[row['winner']]}{note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--only", default=None, help="only shapes whose name contains this text")
    p.add_argument("--configs", default=None, help="comma-separated configuration indices (default: all)")
    p.add_argument("--kinds", default=None, help="comma-separated epilogues to time: bias, gelu_tanh, gated "
                   "(default: all a shape has)")
    p.add_argument("--reps", type=int, default=20, help="back-to-back calls per timed batch")
    p.add_argument("--batches", type=int, default=5, help="timed batches per measurement (median)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds: every candidate timed once a round, "
                   "its median over the rounds reported (default 1: each candidate timed once, in turn)")
    args = p.parse_args()

    lib = fdm_kernels.library()
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0) or not lib.fdm_has_sm90():
        sys.exit(f"needs an sm90 GPU and a library built for sm_90a (device {major}.{minor}, "
                 f"fdm_has_sm90={lib.fdm_has_sm90()})")
    names = fdm_kernels.sm90_config_names()
    configs = [int(c) for c in args.configs.split(",")] if args.configs else list(range(len(names)))
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.multi_processor_count} SMs  (torch {torch.__version__})")
    for i, name in enumerate(names):
        print(f"  config {i}: {name}")

    shapes = {**gemm_bench_shapes(), **EXTRA_SHAPES}
    torch.manual_seed(0)
    rows = []
    # One stream for both libraries: fastdm's GEMMs queue behind the same spin as torch's.
    stream = torch.cuda.Stream()
    torch.cuda.set_stream(stream)
    fdm_stream = cuda.Stream.from_handle(stream.cuda_stream)
    try:
        for name, (m, k, n) in shapes.items():
            if args.only and args.only not in name:
                continue
            kinds = ["bias"] + (["gelu_tanh"] if name in GELU else []) + (["gated"] if name in GATED else [])
            if args.kinds:
                kinds = [kind for kind in kinds if kind in args.kinds.split(",")]
            for kind in kinds:
                case = Case(name, m, k, n, kind)
                with cuda.use_stream(fdm_stream):
                    row = sweep_case(case, lib, names, configs, args.reps, args.batches, args.rounds)
                del case
                torch.cuda.empty_cache()
                memory.allocator().empty_cache()
                print_case(row, names)
                rows.append(row)
    finally:
        fdm_kernels.call("fdm_gemm_sm90_set_config", -1)
        fdm_kernels.call("fdm_gemm_set_path", 0)
    print_summary(rows, names)
    if args.out:
        args.out.write_text(json.dumps({"device": props.name, "sm_count": props.multi_processor_count,
                                        "torch": torch.__version__, "configs": names, "rows": rows}, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
