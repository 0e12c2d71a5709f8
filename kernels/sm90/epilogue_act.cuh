// The activations of the sm90 GEMM epilogues (the CUTLASS kernels' gemm_sm90_kernel.cuh and the hand-written
// gemm_sm90_wgmma.cu), for 16-bit outputs. gelu_tanh and silu use the sigmoid form x * sigmoid(z) with the hardware
// exp2 and a fast divide (0.5 x (1 + tanh u) == x / (1 + exp(-2u))): branch-free, about 1e-6 relative error, far
// below a bf16/fp16 ulp, and much cheaper than tanhf/expf. The limits are exact: exp overflowing to inf gives 0.
// The activation is a template argument: an unrolled epilogue with a run-time switch per element grew to ~9000
// instructions and ran the hand-written kernel at half speed (instruction cache, session 13).
#pragma once
#include "gemm.cuh"

namespace fdm {

template <int Act>
__device__ __forceinline__ float epilogue_act(float x) {
  if constexpr (Act == kActGeluTanh) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // sqrt(2/pi) (x + 0.044715 x^3)
    return __fdividef(x, 1.0f + __expf(-2.0f * u));
  } else if constexpr (Act == kActGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  } else if constexpr (Act == kActSilu) {
    return __fdividef(x, 1.0f + __expf(-x));
  } else {
    return x;
  }
}

}  // namespace fdm
