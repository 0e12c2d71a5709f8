// Helpers shared by the hand-written kernels (elementwise.cu, norms.cu, rope.cu, layout.cu): packed vector
// loads/stores, warp and block reductions, activation functions, grid sizing.
#pragma once
#include "common.cuh"

namespace fdm {

// N elements of T moved as one aligned load/store (16 bytes for the vector paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Sum / max over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must call.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float group_max(float v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduction over the threads that share one row: a group of `width` <= 32 lanes, or (width == blockDim.x > 32)
// the whole block through `smem` (32 floats). Every thread of the block must call it; the result is broadcast.
template <bool kMax>
__device__ __forceinline__ float row_reduce(float v, int width, float* smem) {
  v = kMax ? group_max(v, width < 32 ? width : 32) : group_sum(v, width < 32 ? width : 32);
  if (width <= 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : (kMax ? -INFINITY : 0.f);
  return kMax ? group_max(v, 32) : group_sum(v, 32);
}

// Activations in float32 (shared by elementwise kernels; GEMM epilogues may want the same formulas).
// erfc form: 1 + erf(x/sqrt2) cancels catastrophically for negative x, erfc(-x/sqrt2) does not.
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * erfcf(-x * 0.70710678118654752f); }
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float quick_gelu(float x) { return x / (1.f + expf(-1.702f * x)); }

// Blocks for a grid-stride loop over `n` items with `threads` threads each: enough to fill any GPU, never more
// than the grid limit.
inline unsigned grid_blocks(int64_t n, int threads) {
  int64_t b = ceil_div(n, threads);
  if (b > (int64_t{1} << 20)) b = int64_t{1} << 20;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// Threads for one block that walks a row of `nvec` vectors: at most 256, as few loop trips as possible,
// a multiple of the warp size.
inline int row_block_threads(int64_t nvec) {
  const int64_t trips = ceil_div(nvec, 256);
  const int64_t t = ceil_div(ceil_div(nvec, trips < 1 ? 1 : trips), 32) * 32;
  return static_cast<int>(t < 32 ? 32 : t);
}

}  // namespace fdm
