// Shared conventions of the fastdm kernel library's C ABI.
//
// Every entry point is `extern "C"`, takes raw device pointers, sizes and a cudaStream_t (a CUstream is the
// same handle), and returns an int status:
//     0   success
//   > 0   a cudaError_t (fdm_error_name gives its name)
//   < 0   a bad argument (unsupported dtype, shape, ...); fdm_last_error_message() says which
// Python (kernels/__init__.py) checks every status and raises.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#define FDM_API extern "C" __attribute__((visibility("default")))

// Element type codes; must match runtime/dtypes.py (DType.code).
enum FdmDtype : int {
  FDM_F32 = 0,
  FDM_F16 = 1,
  FDM_BF16 = 2,
  FDM_F8E4M3 = 3,
  FDM_F8E5M2 = 4,
  FDM_I8 = 5,
  FDM_I32 = 6,
  FDM_I64 = 7,
  FDM_U8 = 8,
};

namespace fdm {

// Records a message for fdm_last_error_message() and returns the negative status.
int arg_error(const char* fmt, ...);

// Status of the last launch on this thread (cudaGetLastError), as an int.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes an element of a floating dtype (f32, f16, bf16) takes.
inline int element_size(int dtype) { return dtype == FDM_F32 ? 4 : 2; }

// Whether a pointer suits 16-byte vector loads/stores (and TMA).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Load/store helpers that compute in float32 whatever the storage type.
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two floats rounded to a 16-bit T (bf16 or fp16) in one 32-bit word, lo in the low half (the lower element or column,
// as packs and mma fragments expect): one F2FP instruction.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "pack2: a 16-bit float type");
  uint32_t w;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&w, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&w, &v, 4);
  }
  return w;
}

}  // namespace fdm

// Dispatch on a floating dtype code (f32, f16, bf16): binds `scalar_t` in the body.
#define FDM_DISPATCH_FLOAT(code, ...)                                         \
  switch (code) {                                                             \
    case FDM_F32: { using scalar_t = float; __VA_ARGS__; break; }             \
    case FDM_F16: { using scalar_t = __half; __VA_ARGS__; break; }            \
    case FDM_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }    \
    default: return fdm::arg_error("unsupported dtype code %d (want f32, f16 or bf16)", (int)(code)); \
  }
