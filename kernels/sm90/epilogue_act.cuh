// The activations of the sm90 GEMM epilogues (the CUTLASS kernels' gemm_sm90_kernel.cuh and the hand-written
// gemm_sm90_wgmma.cu), for 16-bit outputs: vec.cuh's fast forms, the same the elementwise kernels use for 16-bit
// storage. gelu_tanh and silu are x * sigmoid(z) = x * rcp(1 + ex2(-z log2 e)) (0.5 x (1 + tanh u) == x * sigmoid(2u))
// on the flush-to-zero MUFU instructions: exact limits (ex2 overflowing to inf gives 0), ~1e-6 relative error, far
// below a bf16/fp16 ulp. __expf and __fdividef were the same two MUFU operations, each wrapped in a denormal range
// check and two predicated multiplies (session 25, SASS an element: gelu_tanh 13 -> 9, silu 8 -> 5). GELU (erf) is
// erfc_fast's form instead of erff (32 -> 22).
// The activation is a template argument: an unrolled epilogue with a run-time switch per element grew to ~9000
// instructions and ran the hand-written kernel at half speed (instruction cache, session 13).
#pragma once
#include "gemm.cuh"
#include "vec.cuh"

namespace fdm {

template <int Act>
__device__ __forceinline__ float epilogue_act(float x) {
  if constexpr (Act == kActGeluTanh) {
    return gelu_tanh_fast(x);
  } else if constexpr (Act == kActGelu) {
    return gelu_erf_fast(x);
  } else if constexpr (Act == kActSilu) {
    return silu_fast(x);
  } else {
    return x;
  }
}

}  // namespace fdm
