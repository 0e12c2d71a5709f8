// Skinny linear, out[m, n] = act(sum_k x[m, k] w[n, k] + bias[n]) for a few rows of x (M <= kGemvMaxRows): the
// adaLN modulations (one row of silu(temb) against a [6D or 12D, D] weight, 57 of them per FLUX forward), the
// timestep and pooled-text embedders. One row of x leaves a tensor-core tile 1/64 full, and the time is reading W
// once, so a warp per output column streams its row of W with 16-byte loads (four in flight a lane, evict-first:
// weights are read once per call) against x from L1, float32 sums, a shuffle tree per output. Deterministic.
#include "gemm.cuh"
#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

constexpr int kGemvThreads = 256;  // 8 warps, a column each at a time
constexpr int kGemvUnroll = 4;     // 16-byte packs of W in flight per lane

template <typename T, int M>
__global__ void __launch_bounds__(kGemvThreads)
gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
            int64_t N, int K, int act) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  constexpr int V = vec16<T>();  // elements per 16-byte pack
  const int lane = threadIdx.x & 31;
  const int packs = K / V;
  const int64_t warps = int64_t(gridDim.x) * (kGemvThreads / 32);
  for (int64_t n = int64_t(blockIdx.x) * (kGemvThreads / 32) + threadIdx.x / 32; n < N; n += warps) {
    const T* wr = w + n * K;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    // acc[m] += W pack `pw` . x[m] pack `jp`, for every row m of x.
    auto accumulate = [&](const Pack<T, V>& pw, int jp) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const Pack<T, V> px = load_pack<T, V>(x + int64_t(m) * K + jp * V);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[m] = fmaf(to_f32(pw.v[e]), to_f32(px.v[e]), acc[m]);
      }
    };
    int j = lane;
    for (; j + (kGemvUnroll - 1) * 32 < packs; j += kGemvUnroll * 32) {
      Pack<T, V> pw[kGemvUnroll];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) pw[u] = load_pack_cs<T, V>(wr + (j + u * 32) * V);
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) accumulate(pw[u], j + u * 32);
    }
    for (; j < packs; j += 32) accumulate(load_pack_cs<T, V>(wr + j * V), j);
    const float b = bias ? to_f32(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = group_sum(acc[m], 32);
      if (lane == 0) out[m * N + n] = from_f32<T>(apply_act(s + b, act));
    }
  }
}

template <typename T, int M>
int launch_gemv(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  const int64_t want = ceil_div(p.N, int64_t{kGemvThreads / 32});
  const int64_t cap = int64_t{sm_count} * 16;  // 16 blocks of 8 warps per SM: enough loads in flight
  launch_dependent(gemv_kernel<T, M>, static_cast<unsigned>(want < cap ? want : cap), kGemvThreads, 0, stream,
      static_cast<const T*>(p.x), static_cast<const T*>(p.w), static_cast<const T*>(p.bias), static_cast<T*>(p.out),
      p.N, static_cast<int>(p.K), p.act);
  return launch_status();
}

template <typename T>
int gemv_by_rows(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  switch (p.M) {
    case 1: return launch_gemv<T, 1>(p, sm_count, stream);
    case 2: return launch_gemv<T, 2>(p, sm_count, stream);
    case 3: return launch_gemv<T, 3>(p, sm_count, stream);
    default: return launch_gemv<T, 4>(p, sm_count, stream);
  }
}

}  // namespace

bool gemv_takes(const LinearProblem& p) {
  return is_16bit(p.dtype) && !p.gate && p.M >= 1 && p.M <= kGemvMaxRows && p.K > 0 &&
         p.K % 8 == 0 && p.K <= (int64_t{1} << 30) && aligned16(p.x) && aligned16(p.w);
}

int linear_gemv(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  if (!gemv_takes(p)) return kGemmNotSupported;
  return p.dtype == FDM_BF16 ? gemv_by_rows<__nv_bfloat16>(p, sm_count, stream)
                             : gemv_by_rows<__half>(p, sm_count, stream);
}

}  // namespace fdm
