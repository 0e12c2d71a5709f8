// The plain GEMM path: a shared-memory tiled kernel on CUDA cores, float32 accumulation.
// It takes what the tensor-core paths cannot: fp32 (exact fp32 math, no TF32), odd K/N (alignment 1),
// unaligned pointers and arbitrary strides. It is correct first and reasonably fast, never the hot path.
// Also here: the in-place gated-residual pass used after a tensor-core GEMM that could not fuse it.
#include "gemm.cuh"

namespace fdm {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, each owns a 4 x 4 block of outputs strided by 16

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_simt_kernel(SimtProblem p) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];

  const int64_t batch = blockIdx.z;
  const T* A = static_cast<const T*>(p.a) + batch * p.a_batch;
  const T* B = static_cast<const T*>(p.b) + batch * p.b_batch;
  T* D = static_cast<T*>(p.d) + batch * p.d_batch;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;  // x: up to 2^31 - 1 tiles, so M is unbounded in practice
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  // Pick the load order whose consecutive threads touch consecutive addresses.
  const bool a_k_fast = p.a_k == 1;
  const bool b_k_fast = p.b_k == 1;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < (kBM * kBK) / kThreads; ++i) {
      const int e = tid + i * kThreads;
      const int mm = a_k_fast ? e / kBK : e % kBM;
      const int kk = a_k_fast ? e % kBK : e / kBM;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < p.M && k < p.K) ? to_f32(A[m * p.a_m + k * p.a_k]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < (kBN * kBK) / kThreads; ++i) {
      const int e = tid + i * kThreads;
      const int nn = b_k_fast ? e / kBK : e % kBN;
      const int kk = b_k_fast ? e % kBK : e / kBN;
      const int64_t n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < p.N && k < p.K) ? to_f32(B[k * p.b_k + n * p.b_n]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const T* bias = static_cast<const T*>(p.bias);
  const T* gate = static_cast<const T*>(p.gate);
  const T* residual = p.residual ? static_cast<const T*>(p.residual) + batch * p.d_batch : nullptr;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      float v = acc[i][j];
      if (bias) v += to_f32(bias[n]);
      v = apply_act(v, p.act);
      if (gate) v = to_f32(residual[m * p.d_m + n]) + to_f32(gate[(m / p.rows_per_gate) * p.N + n]) * v;
      D[m * p.d_m + n] = from_f32<T>(v);
    }
  }
}

template <typename T>
__global__ void gated_residual_kernel(T* out, const T* gate, const T* residual, int64_t M, int64_t N,
                                      int64_t rows_per_gate) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    out[i] = from_f32<T>(to_f32(residual[i]) + to_f32(gate[(m / rows_per_gate) * N + n]) * to_f32(out[i]));
  }
}

}  // namespace

int gemm_simt(const SimtProblem& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || p.batch <= 0) return 0;
  const int64_t grid_n = ceil_div(p.N, kBN), grid_m = ceil_div(p.M, kBM);
  if (grid_n > 65535) return arg_error("gemm: N = %lld is too large for the fallback kernel", (long long)p.N);
  // gridDim.z is at most 65535: launch the batch in slices.
  for (int64_t b0 = 0; b0 < p.batch; b0 += 65535) {
    SimtProblem q = p;
    q.batch = p.batch - b0 < 65535 ? p.batch - b0 : 65535;
    dim3 grid(unsigned(grid_m), unsigned(grid_n), unsigned(q.batch));
    FDM_DISPATCH_FLOAT(p.dtype, {
      q.a = static_cast<const scalar_t*>(p.a) + b0 * p.a_batch;
      q.b = static_cast<const scalar_t*>(p.b) + b0 * p.b_batch;
      q.d = static_cast<scalar_t*>(p.d) + b0 * p.d_batch;
      if (p.residual) q.residual = static_cast<const scalar_t*>(p.residual) + b0 * p.d_batch;
      gemm_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(q);
    });
    const int st = launch_status();
    if (st) return st;
  }
  return 0;
}

int gated_residual_inplace(void* out, const void* gate, const void* residual, int64_t M, int64_t N,
                           int64_t rows_per_gate, int dtype, cudaStream_t stream) {
  const int64_t total = M * N;
  if (total <= 0) return 0;
  const int threads = 256;
  const int64_t blocks = ceil_div(total, threads) < 65536 * 8 ? ceil_div(total, threads) : 65536 * 8;
  FDM_DISPATCH_FLOAT(dtype, {
    gated_residual_kernel<scalar_t><<<unsigned(blocks), threads, 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<const scalar_t*>(gate), static_cast<const scalar_t*>(residual), M,
        N, rows_per_gate);
  });
  return launch_status();
}

}  // namespace fdm
