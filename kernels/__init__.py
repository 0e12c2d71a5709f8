"""The CUDA kernel library (libfastdm_kernels.so), loaded with ctypes, and the signature of every entry point.

Each entry point returns an int status (see kernels/common.cuh); `call` checks it and raises CudaError.
Where the library is missing (no nvcc at install time, or a CPU-only machine) `library()` raises NoGpuError
with what to do; nothing else in fastdm needs it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# Absolute, not `..runtime`: with a source checkout's root on sys.path (bench/device_env.sh, `python -m` from the
# root) this folder is also importable as a top-level `kernels`, and transformers imports any top-level `kernels` it
# finds while probing for the Hugging Face package of that name; it must import cleanly there (it then reports no
# version, so transformers treats it as absent).
from fastdm.runtime.errors import CudaError, NoGpuError

LIB_NAME = "libfastdm_kernels.so"

P = ctypes.c_void_p  # device pointer or stream handle
I = ctypes.c_int
I64 = ctypes.c_int64
F = ctypes.c_float
D = ctypes.c_double

# name -> argument types; every function returns int. Grouped by the .cu file that defines it.
SIGNATURES: dict[str, list] = {
    # status.cu
    "fdm_abi_version": [],
    "fdm_has_sm90": [],
    # programmatic dependent launch (kernels/pdl.cuh): switch on (1) / off (0); returns the previous switch
    "fdm_pdl_set": [I],
    # -- elementwise.cu / norms.cu / rope.cu / misc (hand-written kernels) --
    # elementwise.cu. (x, y, n, act, dtype, stream); act 0 gelu (erf), 1 gelu (tanh), 2 silu, 3 quick_gelu
    "fdm_activation": [P, P, I64, I, I, P],
    # (x [rows, 2n], y [rows, n], rows, n, approx_tanh, dtype, stream)
    "fdm_gelu_mul": [P, P, I64, I64, I, I, P],
    # (a, b|None, scalar, y, op 0 add / 1 mul, alpha, ndim, shape[ndim], b_strides[ndim], dtype, stream)
    "fdm_binary": [P, P, F, P, I, F, I, ctypes.POINTER(I64), ctypes.POINTER(I64), I, P],
    # (x, shift, shift_sb, shift_ss, scale, scale_sb, scale_ss, y, B, S, D, dtype, stream)
    "fdm_modulate": [P, P, I64, I64, P, I64, I64, P, I64, I64, I64, I, P],
    # (x, gate, gate_sb, gate_ss, y, out, B, S, D, dtype, stream)
    "fdm_gated_residual": [P, P, I64, I64, P, P, I64, I64, I64, I, P],
    # norms.cu; rows r = o * inner + i at x + o * xs_o + i * xs_i, y + o * ys_o + i * ys_i (element strides)
    # (x, w|None, b|None, y, rows, inner, xs_o, xs_i, ys_o, ys_i, d, eps, dtype, stream)
    "fdm_layer_norm": [P, P, P, P, I64, I64, I64, I64, I64, I64, I64, F, I, P],
    # (x, shift, scale, mod_sb, mod_ss, y, rows, inner, xs_o, xs_i, ys_o, ys_i, d, eps, dtype, stream)
    "fdm_layer_norm_modulate": [P, P, P, I64, I64, P, I64, I64, I64, I64, I64, I64, I64, F, I, P],
    # (x, w|None, y, rows, inner, xs_o, xs_i, ys_o, ys_i, d, eps, dtype, stream); y may be x
    "fdm_rms_norm": [P, P, P, I64, I64, I64, I64, I64, I64, I64, F, I, P],
    # (x, y, rows, inner, xs_o, xs_i, ys_o, ys_i, d, dtype, stream)
    "fdm_softmax": [P, P, I64, I64, I64, I64, I64, I64, I64, I, P],
    # (x, w|None, b|None, y, ws f32 [N*G*chunks*2], chunks, N, C, HW, G, eps, silu, dtype, stream)
    "fdm_group_norm": [P, P, P, P, P, I, I64, I64, I64, I, F, I, I, P],
    # test hooks for fdm_group_norm(_nhwc): force a kernel (0 auto, 1 one-pass sm90 cluster, 2 two-pass /
    # three-kernel, 3 channels-last whole tensor on chip);
    # fdm_group_norm_last_path returns a path, not a status
    "fdm_group_norm_set_path": [I],
    "fdm_group_norm_last_path": [],
    # group_norm_nhwc.cu. x, y [N, S, C] channels-last; ws f32 of ws_elems >= N*G*chunks*2 + 3*N*C
    # (x, w|None, b|None, y, ws, ws_elems, chunks, N, S, C, G, eps, silu, dtype, stream)
    "fdm_group_norm_nhwc": [P, P, P, P, P, I64, I, I64, I64, I64, I, F, I, I, P],
    # the same arguments, the statistics already in ws (left there by fdm_add_group_stats_nhwc)
    "fdm_group_norm_nhwc_apply": [P, P, P, P, P, I64, I, I64, I64, I64, I, F, I, I, P],
    # out = a + alpha * b and its group statistics into ws; b [N, S, C] or [N, C] (b_per_sample)
    # (a, b, b_per_sample, alpha, out, ws, ws_elems, chunks, N, S, C, G, dtype, stream)
    "fdm_add_group_stats_nhwc": [P, P, I, F, P, P, I64, I, I64, I64, I64, I, I, P],
    # out = [a, b] along the channels and its group statistics into ws
    # (a, b, Ca, Cb, out, ws, ws_elems, chunks, N, S, G, dtype, stream)
    "fdm_concat_group_stats_nhwc": [P, P, I64, I64, P, P, I64, I, I64, I64, I, I, P],
    # rope.cu. (x, y, cos, sin, B, S, H, D, xs_b, xs_s, xs_h, ys_b, ys_s, ys_h, interleaved, dtype, stream)
    "fdm_rope": [P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I, I, P],
    # (qkv, q_w|None, k_w|None, cos, sin, out, B, S, H, D, xs_b, xs_s, xs_t, xs_h, ys_b, ys_s, ys_t, ys_h, eps,
    #  copy_v, interleaved, dtype, stream); qkv, out: [B, S, 3, H, D]
    "fdm_qk_norm_rope": [P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, F, I, I, I, P],
    # layout.cu. (src, dst, ndim, shape[ndim], src_strides[ndim], dst_strides[ndim], elem_size, stream)
    "fdm_copy_strided": [P, P, I, ctypes.POINTER(I64), ctypes.POINTER(I64), ctypes.POINTER(I64), I64, P],
    # (src, src_dtype, dst, dst_dtype, n, stream)
    "fdm_cast": [P, I, P, I, I64, P],
    # (ids, ids_dtype, table, out, n_ids, vocab, d, dtype, stream)
    "fdm_embedding": [P, I, P, P, I64, I64, I64, I, P],
    # (x, y, rows = N*C*H, w, elem_size, stream)
    "fdm_upsample_nearest2x": [P, P, I64, I64, I64, P],
    # -- gemm (gemm_sm80.cu, sm90/gemm_sm90.cu) --
    # gemm.cu: (x, w, bias|None, out, M, N, K, act, dtype, stream); act 0 none, 1 gelu_tanh, 2 gelu, 3 silu
    "fdm_linear": [P, P, P, P, I64, I64, I64, I, I, P],
    # (x, w, bias|None, gate, residual, out, B, S, N, K, dtype, stream)
    "fdm_linear_gated_residual": [P, P, P, P, P, P, I64, I64, I64, I64, I, P],
    # (a, b, c, batch, M, N, K, b_shared, dtype, stream)
    "fdm_matmul": [P, P, P, I64, I64, I64, I64, I, I, P],
    # test hooks: force a path (0 auto, 1 sm90, 2 sm80, 3 simt); fdm_gemm_last_path returns a path, not a status
    "fdm_gemm_set_path": [I],
    "fdm_gemm_last_path": [],
    # sm90 configurations (kSm90Configs in gemm.cuh): force one (-1 = choose per problem); count, last and name
    # are queries; name fills (buf, len) with a NUL-terminated string
    "fdm_gemm_sm90_set_config": [I],
    "fdm_gemm_sm90_config_count": [],
    "fdm_gemm_sm90_last_config": [],
    "fdm_gemm_sm90_config_name": [I, ctypes.c_char_p, I64],
    # configurations measured on this machine (scripts/tune_gemm.py): (M, N, K, gated, config|-1); clear forgets all
    "fdm_gemm_sm90_set_tuned": [I64, I64, I64, I, I],
    # the configuration the automatic choice picks, a query: (M, N, K, gated, sm_count, l2_mib) -> index
    "fdm_gemm_sm90_auto_config": [I64, I64, I64, I, I, I],
    "fdm_gemm_sm90_wgmma_band_rows": [I64, I64, I64, I64, I64, I64, I],
    "fdm_gemm_sm90_clear_tuned": [],
    # im2col.cu: (x, w, bias|None, out, workspace, workspace_bytes, N, C, H, W, O, kh, kw, sh, sw, ph, pw, dtype,
    #  stream)
    "fdm_conv2d": [P, P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I, P],
    # -- conv (conv_implicit.cu) --
    # (x [N,H,W,C], w [K,R,S,C], bias|None, out [N,P,Q,K], N, H, W, C, K, R, S, stride_h, stride_w, pad_h, pad_w,
    #  dtype, stream); bf16/fp16, C and K multiples of 8
    "fdm_conv2d_nhwc": [P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I, P],
    # test/bench hooks: force a configuration (0 sm80 256x128, 1 sm80 128x128, 2 sm90; -1 = choose per problem;
    # also forgets the last one); last_config (-1 = none ran since), config_count and config_available return
    # values, not statuses
    "fdm_conv2d_nhwc_set_config": [I],
    "fdm_conv2d_nhwc_last_config": [],
    "fdm_conv2d_nhwc_config_count": [],
    # 1 when a configuration can run on the current device (2 = sm90 needs cc 9.0 and an sm_90a build), else 0
    "fdm_conv2d_nhwc_config_available": [I],
    # -- attention (attention.cu) --
    # (q, k, v, key_padding_mask|None, out, B, Sq, Sk, H, D, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh,
    #  mask_sb, scale, dtype, stream); strides in elements
    "fdm_attention": [P, P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64,
                      F, I, P],
    # test hooks: force a kernel (0 auto, 1 sm90 wgmma/TMA, 2 mma.sync); fdm_attention_last_path returns a path,
    # not a status
    "fdm_attention_set_path": [I],
    "fdm_attention_last_path": [],
}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_missing: dict[str, Path] = {}  # entry points the loaded library lacks -> its path


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    out = []
    if os.environ.get("FASTDM_KERNELS_LIB"):
        out.append(Path(os.environ["FASTDM_KERNELS_LIB"]))
    out.append(here / LIB_NAME)
    return out


def library() -> ctypes.CDLL:
    """The loaded kernel library; raises NoGpuError (once per call site, clearly) where it cannot be loaded."""
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is None:
        for path in _candidates():
            if path.exists():
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as e:
                    _load_error = f"could not load {path}: {e}"
                    break
                for name, argtypes in SIGNATURES.items():
                    try:
                        fn = getattr(lib, name)
                    except AttributeError:  # a library built from older sources: the rest still works
                        _missing[name] = path
                        continue
                    fn.argtypes = argtypes
                    fn.restype = I
                lib.fdm_error_name.argtypes = [I]
                lib.fdm_error_name.restype = ctypes.c_char_p
                lib.fdm_last_error_message.argtypes = []
                lib.fdm_last_error_message.restype = ctypes.c_char_p
                _lib = lib
                return lib
        else:
            _load_error = (
                f"the CUDA kernel library ({LIB_NAME}) is not built: fastdm was installed without nvcc, so only "
                "the CPU reference backend works. Install the CUDA toolkit and reinstall (pip install .), or set "
                "FASTDM_KERNELS_LIB to a built library; use device='cpu' meanwhile."
            )
    raise NoGpuError(_load_error)


def available() -> bool:
    try:
        library()
        return True
    except NoGpuError:
        return False


def sm90_config_names() -> list[str]:
    """The name of every sm90 GEMM configuration (kSm90Configs in kernels/gemm.cuh), by index."""
    lib = library()
    names = []
    for index in range(lib.fdm_gemm_sm90_config_count()):
        buf = ctypes.create_string_buffer(160)
        call("fdm_gemm_sm90_config_name", index, buf, len(buf))
        names.append(buf.value.decode())
    return names


def call(name: str, *args) -> None:
    """Call entry point `name` and raise CudaError if it reports a failure."""
    lib = library()
    if name in _missing:
        raise NoGpuError(f"{_missing[name]} has no {name}: the kernel library is older than this fastdm's Python code. "
                         "Rebuild it (pip install . again, or cmake --build on your build folder).")
    status = getattr(lib, name)(*args)
    if status != 0:
        err = lib.fdm_error_name(status).decode()
        detail = lib.fdm_last_error_message().decode() if status < 0 else "kernel launch or execution failed"
        raise CudaError(err, f"{name}: {detail}")
