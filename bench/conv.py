"""conv2d benchmark: fastdm (implicit GEMM, kernels/conv_implicit.cu) vs torch F.conv2d (cuDNN) on the same card in
one run, at the conv shapes of the SDXL UNet (1024x1024, batch 2 for CFG) and of the VAE decoder (1024x1024).

Run on a GPU machine with torch installed:  python bench/conv.py [--dtype bf16|fp16] [--quick] [--sweep]
Prints one table: milliseconds of torch NCHW, torch channels_last, fastdm ops.conv2d (NCHW in and out: two
permutes around the kernel) and fastdm conv2d_nhwc (channels-last in and out, the kernel alone), fastdm's
TFLOP/s on both, the ratio best torch / fastdm NHWC (>1 means fastdm is faster), fastdm's tile configuration and
the relative L2 difference from torch's output. --sweep adds one column per configuration (0, 1: the sm80 tiles, 2:
the sm90 TMA/wgmma kernel; forced through fdm_conv2d_nhwc_set_config), to check conv_implicit.cu's choice. Shapes
with C or O not a multiple of 8 (the RGB convs) show the im2col fallback (config -1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402  (bench/ is the baseline side: torch is allowed here)
import torch.nn.functional as F  # noqa: E402
from fastdm.runtime import cuda, ops  # noqa: E402
from fastdm.runtime.dlpack import from_dlpack  # noqa: E402
from fastdm.runtime.errors import CudaError  # noqa: E402
from timing import card_ceilings, time_fastdm, time_torch  # noqa: E402

from fastdm import kernels  # noqa: E402

# name: (N, C, H, W, O, k, stride, padding)
SHAPES = {
    "sdxl 128^2 320->320 3x3": (2, 320, 128, 128, 320, 3, 1, 1),
    "sdxl 128^2 320 down s2": (2, 320, 128, 128, 320, 3, 2, 1),
    "sdxl 64^2 640->640 3x3": (2, 640, 64, 64, 640, 3, 1, 1),
    "sdxl 64^2 640 down s2": (2, 640, 64, 64, 640, 3, 2, 1),
    "sdxl 64^2 1x1 640->1280": (2, 640, 64, 64, 1280, 1, 1, 0),
    "sdxl 32^2 1280->1280 3x3": (2, 1280, 32, 32, 1280, 3, 1, 1),
    "sdxl 32^2 2560->1280 3x3": (2, 2560, 32, 32, 1280, 3, 1, 1),
    "sdxl 128^2 640->320 3x3": (2, 640, 128, 128, 320, 3, 1, 1),
    "vae 64^2 512->512 3x3": (1, 512, 64, 64, 512, 3, 1, 1),
    "vae 128^2 512->512 3x3": (1, 512, 128, 128, 512, 3, 1, 1),
    "vae 256^2 512->512 3x3": (1, 512, 256, 256, 512, 3, 1, 1),
    "vae 256^2 128->128 3x3": (1, 128, 256, 256, 128, 3, 1, 1),
    "vae 512^2 256->256 3x3": (1, 256, 512, 512, 256, 3, 1, 1),
    "vae 1024^2 128->128 3x3": (1, 128, 1024, 1024, 128, 3, 1, 1),
    "vae 1024^2 conv_out 128->3": (1, 128, 1024, 1024, 3, 3, 1, 1),
    "vae 1024^2 conv_in 3->128": (1, 3, 1024, 1024, 128, 3, 1, 1),
}
QUICK = ["sdxl 128^2 320->320 3x3", "sdxl 32^2 1280->1280 3x3", "vae 256^2 512->512 3x3",
         "vae 1024^2 128->128 3x3"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fd(t: torch.Tensor):
    """The same memory as a fastdm Tensor (DLPack, no copy)."""
    return from_dlpack(t)


def last_config() -> int:
    return kernels.library().fdm_conv2d_nhwc_last_config()


def set_config(c: int) -> None:
    kernels.call("fdm_conv2d_nhwc_set_config", c)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def case(name, shape, dtype, sweep, n_configs):
    from fastdm.runtime.ops.cuda.conv import conv2d_nhwc

    n, c, h, w, o, k, stride, padding = shape
    x = torch.randn(n, c, h, w, dtype=dtype, device="cuda")
    wt = torch.randn(o, c, k, k, dtype=dtype, device="cuda") * (c * k * k) ** -0.5
    b = torch.randn(o, dtype=dtype, device="cuda")
    x_cl = x.to(memory_format=torch.channels_last)
    wt_cl = wt.to(memory_format=torch.channels_last)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # [N, H, W, C], what conv2d_nhwc takes
    xf, wf, bf, xnf = fd(x), fd(wt), fd(b), fd(x_nhwc)
    torch.cuda.synchronize()

    t_nchw = time_torch(lambda: F.conv2d(x, wt, b, stride=stride, padding=padding))
    t_cl = time_torch(lambda: F.conv2d(x_cl, wt_cl, b, stride=stride, padding=padding))
    set_config(-1)
    f_nchw = time_fastdm(lambda: ops.conv2d(xf, wf, bf, stride=stride, padding=padding))
    f_nhwc = time_fastdm(lambda: conv2d_nhwc(xnf, wf, bf, stride=stride, padding=padding))
    config = last_config()

    ref = F.conv2d(x, wt, b, stride=stride, padding=padding)
    torch.cuda.synchronize()
    ours_fd = ops.conv2d(xf, wf, bf, stride=stride, padding=padding)
    cuda.current_stream().synchronize()
    ours = torch.from_dlpack(ours_fd)
    err = rel_l2(ours, ref)

    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    flop = 2 * n * ho * wo * o * c * k * k
    best_torch = min(t_nchw, t_cl)
    cols = [name, f"{t_nchw:.3f}", f"{t_cl:.3f}", f"{f_nchw:.3f}", f"{f_nhwc:.3f}",
            f"{flop / f_nchw / 1e9:.0f}", f"{flop / f_nhwc / 1e9:.0f}", f"{best_torch / f_nhwc:.2f}x", str(config),
            f"{err:.1e}"]
    if sweep:
        lib = kernels.library()
        for cfg in range(n_configs):
            # "-": the fallback shapes (nothing to force), a configuration this card lacks, or one that declines
            # the shape (sm90 needs C % 64 == 0)
            cell = "-"
            if config >= 0 and lib.fdm_conv2d_nhwc_config_available(cfg):
                set_config(cfg)
                try:
                    cell = f"{time_fastdm(lambda: conv2d_nhwc(xnf, wf, bf, stride=stride, padding=padding)):.3f}"
                except CudaError:
                    pass
            cols.append(cell)
        set_config(-1)
    print("| " + " | ".join(cols) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} shapes")
    ap.add_argument("--sweep", action="store_true", help="also time every tile configuration")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm per shape
    ceil = card_ceilings()
    n_configs = kernels.library().fdm_conv2d_nhwc_config_count()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}; card: cuBLAS bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"copy {ceil['copy_GBps']:.0f} GB/s; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    head = ["shape (N C H W -> O, k, stride)", "torch NCHW ms", "torch CL ms", "fastdm NCHW ms", "fastdm NHWC ms",
            "NCHW TFLOP/s", "NHWC TFLOP/s", "best torch / NHWC", "config", "rel L2 vs torch"]
    if args.sweep:
        cfg_names = {0: "sm80 256x128", 1: "sm80 128x128", 2: "sm90 128x128"}
        head += [f"{cfg_names.get(i, f'cfg {i}')} ms" for i in range(n_configs)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    names = QUICK if args.quick else list(SHAPES)
    for name in names:
        case(name, SHAPES[name], DTYPES[args.dtype], args.sweep, n_configs)


if __name__ == "__main__":
    main()
