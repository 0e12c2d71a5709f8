"""Where the SDXL UNet forward spends its time: GPU kernels of fastdm and of diffusers (torch.profiler / CUPTI sees
every kernel in the process, fastdm's too), grouped by kernel name, plus the host time to enqueue one forward.

  python bench/sdxl.py make --dir /tmp/sdxl-rand && python bench/profile_unet.py --dir /tmp/sdxl-rand
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _table(prof, title: str, top: int) -> float:
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            name = ev.name
            entry = by_name[name[:110]]
            entry[0] += ev.device_time_total
            entry[1] += 1
    total = sum(v[0] for v in by_name.values())
    print(f"\n### {title}: GPU kernel time {total / 1e3:.2f} ms per forward, {sum(v[1] for v in by_name.values())} "
          "kernels")
    print("| us | % | calls | kernel |")
    print("|---|---|---|---|")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {us:.0f} | {100 * us / total:.1f} | {n} | `{name}` |")
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-rand"))
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--only", choices=["fastdm", "torch", "both"], default="both")
    args = p.parse_args()

    import torch
    from sdxl import unet_inputs
    from torch.profiler import ProfilerActivity, profile

    inp = unet_inputs()
    if args.only in ("torch", "both"):
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(args.dir / "unet", torch_dtype=torch.bfloat16).cuda()
        t = {k: torch.from_numpy(v).cuda().to(torch.bfloat16) for k, v in inp.items()}
        cond = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
        with torch.inference_mode():
            for _ in range(2):
                model(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=cond)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=cond)
                torch.cuda.synchronize()
        _table(prof, "diffusers", args.top)
        del model
        torch.cuda.empty_cache()

    if args.only in ("fastdm", "both"):
        from fastdm.models.denoisers.unet2d import UNet2DCondition
        from fastdm.runtime import cuda as fcuda
        from fastdm.runtime import ops
        from fastdm.runtime.tensor import Tensor

        model = UNet2DCondition.from_pretrained(args.dir / "unet", device="cuda", dtype="bfloat16")
        dev = {k: ops.cast(Tensor.from_numpy(v, device="cuda"), "bfloat16") for k, v in inp.items()
               if k != "timestep"}
        dev["timestep"] = inp["timestep"]
        for _ in range(2):
            model(**dev)
        fcuda.current_device().synchronize()
        t0 = time.perf_counter()
        model(**dev)
        host = time.perf_counter() - t0
        fcuda.current_device().synchronize()
        wall = time.perf_counter() - t0
        print(f"\nfastdm: host enqueue {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms per forward")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**dev)
            fcuda.current_device().synchronize()
        _table(prof, "fastdm", args.top)

        import cProfile
        import pstats

        cp = cProfile.Profile()
        cp.enable()
        model(**dev)
        cp.disable()
        fcuda.current_device().synchronize()
        print("\n### fastdm host time of one forward by function (cProfile, tottime)")
        pstats.Stats(cp).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
