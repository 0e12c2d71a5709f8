// Shared declarations of the GEMM family: the entry points live in gemm.cu, which picks one of
//   sm90  kernels/sm90/gemm_sm90*.cu   CUTLASS 3.x TMA warp-specialized kernels (Hopper, 16-bit, aligned)
//   sm80  kernels/gemm_sm80*.cu        CUTLASS 2.x multistage tensor-op kernels (Ampere+, 16-bit, aligned)
//   simt  kernels/gemm_simt.cu         a plain tiled kernel: any alignment, any stride, fp32 too
// Every path computes in float32 and applies the same epilogue functions (below), so results agree to rounding.
#pragma once
#include "common.cuh"

namespace fdm {

// Activation codes of the C ABI (fdm_linear's `act`); runtime/ops/cuda/gemm.py mirrors them.
enum GemmAct : int { kActNone = 0, kActGeluTanh = 1, kActGelu = 2, kActSilu = 3 };

// Which kernel family ran last / is forced (fdm_gemm_set_path, fdm_gemm_last_path; used by tests).
enum GemmPath : int { kPathAuto = 0, kPathSm90 = 1, kPathSm80 = 2, kPathSimt = 3 };

// Internal status of a path that cannot take a problem (alignment, size): the caller tries the next path.
// Never returned through the C ABI.
constexpr int kGemmNotSupported = -1000;

__host__ __device__ __forceinline__ float apply_act(float x, int act) {
  // Accurate libm functions (no fast-math): fp32 results are checked to 1e-5.
  switch (act) {
    case kActGeluTanh: {
      const float k0 = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
    }
    case kActGelu: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case kActSilu: return x / (1.0f + expf(-x));
    default: return x;
  }
}

// One linear problem: out[M, N] = residual + gate[m / rows_per_gate] * act(x[M, K] @ w[N, K]^T + bias[N]).
// bias may be null (zero); gate/residual are both null (plain linear) or both set (gated residual; act must
// be none). All tensors are contiguous row-major of the same 16-bit or fp32 dtype.
struct LinearProblem {
  const void* x = nullptr;         // [M, K]
  const void* w = nullptr;         // [N, K]
  const void* bias = nullptr;      // [N] or null
  const void* gate = nullptr;      // [M / rows_per_gate, N] or null
  const void* residual = nullptr;  // [M, N] or null
  void* out = nullptr;             // [M, N]
  int64_t M = 0, N = 0, K = 0;
  int64_t rows_per_gate = 1;
  int act = kActNone;
  int dtype = FDM_BF16;
};

// A strided batched problem for the SIMT kernel: D[b](m, n) = epilogue(sum_k A[b](m, k) * B[b](k, n)).
// Element (m, k) of A[b] is at a + b*a_batch + m*a_m + k*a_k (in elements); likewise B and D (d_n == 1).
struct SimtProblem {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const void* bias = nullptr;      // [N] or null
  const void* gate = nullptr;      // [batch rows / rows_per_gate, N] or null (then residual is set too)
  const void* residual = nullptr;  // like D
  int64_t M = 0, N = 0, K = 0, batch = 1;
  int64_t a_m = 0, a_k = 0, a_batch = 0;
  int64_t b_k = 0, b_n = 0, b_batch = 0;
  int64_t d_m = 0, d_batch = 0;
  int64_t rows_per_gate = 1;
  int act = kActNone;
  int dtype = FDM_F32;
};

// Device facts the dispatch needs, queried once per device.
struct DeviceFacts {
  int cc_major = 0, cc_minor = 0, sm_count = 0;
};
int current_device_facts(DeviceFacts* facts);  // cudaError_t as int

// sm90 (kernels/sm90/gemm_sm90*.cu; declared only where they are compiled in).
#ifdef FASTDM_HAS_SM90
int linear_sm90(const LinearProblem& p, int sm_count, cudaStream_t stream);
#endif

// sm80 (gemm_sm80.cu): act(x @ w^T + bias) only (gate/residual must be null).
int linear_sm80(const LinearProblem& p, int sm_count, cudaStream_t stream);
// sm80 (gemm_sm80_batched.cu): C[b] = A[b] @ B[b], all row-major, packed; b_batch 0 = B shared.
int matmul_sm80(const void* a, const void* b, void* c, int64_t batch, int64_t M, int64_t N, int64_t K,
                int64_t b_batch, int dtype, cudaStream_t stream);

// simt (gemm_simt.cu)
int gemm_simt(const SimtProblem& p, cudaStream_t stream);
// out[m, n] = residual[m, n] + gate[m / rows_per_gate, n] * out[m, n], in place (gemm_simt.cu).
int gated_residual_inplace(void* out, const void* gate, const void* residual, int64_t M, int64_t N,
                           int64_t rows_per_gate, int dtype, cudaStream_t stream);

// The dispatching linear (gemm.cu); conv2d (im2col.cu) calls it too.
int linear_dispatch(const LinearProblem& p, cudaStream_t stream);

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace fdm
