// Helpers shared by the hand-written kernels (elementwise.cu, norms.cu, rope.cu, layout.cu): packed vector
// loads/stores, warp and block reductions, activation functions, grid sizing.
#pragma once
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

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

// Streaming ("evict first", ld/st.global.cs) accesses for data a kernel touches exactly once, so it does not push
// reused data (weights, modulation vectors, angles, the output the next kernel reads) out of L2. Only 16-byte packs
// get the hint; other sizes (the scalar fallbacks) are plain accesses.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack_cs(const T* p) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    Pack<T, N> v;
    memcpy(&v, &u, 16);
    return v;
  } else {
    return load_pack<T, N>(p);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_pack_cs(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 u;
    memcpy(&u, &v, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else {
    store_pack<T, N>(p, v);
  }
}

// Element e of a pack as float32. bf16 is taken from the pack's 32-bit words, one shift or mask an element;
// converting the 16-bit halves one by one costs an extra PRMT for every odd element (and holds the extracted halves
// in registers across passes).
template <typename T, int N>
__device__ __forceinline__ float pack_f32(const Pack<T, N>& p, int e) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
    uint32_t w;
    memcpy(&w, &p.v[e & ~1], 4);
    return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
  } else {
    return to_f32(p.v[e]);
  }
}

// A pack of N float32 values rounded to T. 16-bit types convert two at a time into the pack's 32-bit words (pack2);
// element by element, the compiler splits each converted pair into halves and merges them again.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack_from_f32(const float (&f)[N]) {
  Pack<T, N> out;
  if constexpr (N % 2 == 0 && (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>)) {
#pragma unroll
    for (int e = 0; e < N; e += 2) {
      const uint32_t w = pack2<T>(f[e], f[e + 1]);
      memcpy(&out.v[e], &w, 4);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out.v[e] = from_f32<T>(f[e]);
  }
  return out;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }

// Sum / max over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must call. Unrolled
// over the five possible levels (the ones at or above `width` skipped by a uniform test) rather than a loop on the
// runtime width. Every lane ends with the same bits: each level adds the same two values in either order.
__device__ __forceinline__ float group_sum(float v, int width) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < width) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float group_max(float v, int width) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < width) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Count, mean and sum of squared deviations of a set of values (float32); merge() combines two disjoint sets
// exactly (Chan et al.), with a fast division for the weight: an ulp or two there changes nothing measurable.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n, fb = __fdividef(b.n, n), d = b.mean - a.mean;
  return {n, fmaf(d, fb, a.mean), a.m2 + b.m2 + d * d * a.n * fb};
}

// merge() over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must call. Lanes may
// differ in the last bits (merge order), so every lane gets its group's first lane's result.
__device__ __forceinline__ Moments group_merge(Moments m, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) {
    const Moments other{__shfl_xor_sync(0xffffffffu, m.n, o), __shfl_xor_sync(0xffffffffu, m.mean, o),
                        __shfl_xor_sync(0xffffffffu, m.m2, o)};
    m = merge(m, other);
  }
  return {__shfl_sync(0xffffffffu, m.n, 0, width), __shfl_sync(0xffffffffu, m.mean, 0, width),
          __shfl_sync(0xffffffffu, m.m2, 0, width)};
}

// merge() over the whole block (blockDim.x a multiple of 32): each warp's merge into slots[warp] (blockDim.x / 32
// Moments of shared memory), one barrier, then every warp merges the slots in the same order, so every thread
// returns the same bits. Every thread of the block must call; slots may be rewritten only after another barrier.
__device__ __forceinline__ Moments block_merge(Moments m, Moments* slots) {
  m = group_merge(m, 32);
  const int lane = threadIdx.x & 31;
  if (lane == 0) slots[threadIdx.x >> 5] = m;
  __syncthreads();
  return group_merge(lane < static_cast<int>(blockDim.x >> 5) ? slots[lane] : Moments{0.f, 0.f, 0.f}, 32);
}

// Exact moments of this thread's packs p[k] (pack index j0 + k * kStride; those at or past nvec are skipped), merged
// into acc: the packs' mean first, then their squared deviations from it. I: the index type.
template <typename T, int V, int K, int kStride, typename I>
__device__ __forceinline__ void packs_moments(const Pack<T, V> (&p)[K], I j0, I nvec, Moments& acc) {
  float cnt = 0.f, s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (j0 + static_cast<I>(k * kStride) < nvec) {
      cnt += V;
#pragma unroll
      for (int e = 0; e < V; ++e) s += pack_f32(p[k], e);
    }
  if (cnt == 0.f) return;
  const float mean = __fdividef(s, cnt);
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (j0 + static_cast<I>(k * kStride) < nvec) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float c = pack_f32(p[k], e) - mean;
        q = fmaf(c, c, q);
      }
    }
  acc = merge(acc, Moments{cnt, mean, q});
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

// Fast forms for 16-bit storage, where one ulp is 4e-3 (bf16) or 5e-4 (fp16): at most ~5e-6 relative error for
// |x| <= 6, far below the rounding of the result, at under half the instructions. That matters: with erfcf GEGLU
// issues ~60 instructions per element and is compute-bound below the memory ceiling on H100/H200. The hardware
// exp2 and reciprocal are used in their flush-to-zero forms (no denormal fix-up code; results below 1e-38 become 0).
// Sigmoid forms (0.5 (1 + tanh u) == 1 / (1 + exp(-2u))) have no cancellation for negative x; exp overflowing to
// inf gives 0.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;

// erfc(z) = t exp(-z^2 + P(t)) with t = 1 / (1 + |z|/2), P a degree-9 polynomial least-squares fitted here
// (Chebyshev nodes, Lawson-weighted toward minimax) to ln(erfc(z)) + z^2 - ln(t) over t in (0, 1]: max error
// 1e-7 in the exponent. No cancellation for z > 0 (the tail GELU needs for negative x).
__device__ __forceinline__ float erfc_fast(float z) {
  const float a = fabsf(z);
  const float t = rcp_ftz(fmaf(0.5f, a, 1.f));
  float p = 1.687605989e-01f;
  p = fmaf(p, t, -8.133246816e-01f);
  p = fmaf(p, t, 1.473255085e+00f);
  p = fmaf(p, t, -1.121100709e+00f);
  p = fmaf(p, t, 2.713525672e-01f);
  p = fmaf(p, t, -1.839666376e-01f);
  p = fmaf(p, t, 9.638823730e-02f);
  p = fmaf(p, t, 3.741250275e-01f);
  p = fmaf(p, t, 1.000022650e+00f);
  p = fmaf(p, t, -1.265512220e+00f);
  const float e = t * ex2_ftz(fmaf(-a, a, p) * kLog2e);
  return z >= 0.f ? e : 2.f - e;
}
__device__ __forceinline__ float gelu_erf_fast(float x) { return 0.5f * x * erfc_fast(-x * 0.70710678118654752f); }
__device__ __forceinline__ float sigmoid_mul_fast(float x, float z) {  // x * sigmoid(z)
  return x * rcp_ftz(1.f + ex2_ftz(-z * kLog2e));
}
__device__ __forceinline__ float gelu_tanh_fast(float x) {
  return sigmoid_mul_fast(x, 1.5957691216057308f * (x + 0.044715f * x * x * x));  // 2 sqrt(2/pi) (x + ...)
}
__device__ __forceinline__ float silu_fast(float x) { return sigmoid_mul_fast(x, x); }
// SiLU with one MUFU operation instead of two: u = e^-|x| (ex2), 1 / (1 + u) by two Newton steps from a linear first
// guess on the FMA pipe (1 + u is in (1, 2]; relative error 1/17 -> 1.3e-5), then x / (1 + e^-x) for x >= 0 and
// x e^x / (1 + e^x) below (max(x, x u) picks the numerator without a branch). Eleven instructions against
// silu_fast's five, but the MUFU pipe retires only 16 results a clock an SM against 128 for the FMA pipe.
__device__ __forceinline__ float silu_newton(float x) {
  const float u = ex2_ftz(-fabsf(x) * kLog2e);
  const float d = 1.f + u;
  float r = fmaf(-8.f / 17.f, d, 24.f / 17.f);
  r = fmaf(r, fmaf(-d, r, 1.f), r);
  r = fmaf(r, fmaf(-d, r, 1.f), r);
  return fmaxf(x, x * u) * r;
}
// SiLU of element e of a 16-bit pack: elements 1, 4 and 6 of every 8 by silu_newton, the others by silu_fast, so
// that a kernel whose normalize-and-store phase is MUFU-bound (GroupNorm + SiLU: two MUFU operations an element)
// spreads it over both pipes. H100, GroupNorm + SiLU bf16 [2, 512, 128, 128], NCHW / channels-last us: all by
// silu_fast 32.5 / 35.2, 4 of 8 by silu_newton 31.3 / 34.4 (then, after the evict-first loads, 29.0 / 32.0), 3 of 8
// 29.0 / 31.5, 5 of 8 29.4 / 32.1, all 32.9 / 35.0 (issue-bound instead).
__device__ __forceinline__ float silu_pack_element(float x, int e) {
  return (0x52 >> (e & 7)) & 1 ? silu_newton(x) : silu_fast(x);
}
__device__ __forceinline__ float quick_gelu_fast(float x) { return sigmoid_mul_fast(x, 1.702f * x); }

// Blocks for a grid-stride loop over `n` items with `threads` threads each: enough to fill any GPU, never more
// than the grid limit.
inline unsigned grid_blocks(int64_t n, int threads) {
  int64_t b = ceil_div(n, threads);
  if (b > (int64_t{1} << 20)) b = int64_t{1} << 20;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// Blocks of kKernel resident per SM at (threads, smem) on the current device: the CUDA occupancy query asked once
// per (device, threads, smem) and kept, since the launchers that size their grid by it run on every call.
template <auto kKernel>
cudaError_t resident_blocks(int threads, size_t smem, int* blocks) {
  struct Entry {
    int dev, threads;
    size_t smem;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> known;
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev)) return e;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : known)
    if (e.dev == dev && e.threads == threads && e.smem == smem) {
      *blocks = e.blocks;
      return cudaSuccess;
    }
  int n = 0;
  if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, threads, smem)) return e;
  if (known.size() < 256) known.push_back({dev, threads, smem, n});
  *blocks = n;
  return cudaSuccess;
}

// Lets kKernel take `optin` bytes of dynamic shared memory (and, with nonportable_clusters, clusters of more than 8
// CTAs) on device `dev`, setting the attributes once per device: they are host calls a launcher's hot path need not
// repeat.
template <auto kKernel>
cudaError_t allow_smem_optin(int dev, int optin, bool nonportable_clusters) {
  static std::mutex mutex;
  static uint64_t done = 0;  // devices (bit per ordinal) where the attributes are set
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mutex);
  if (done >> dev & 1) return cudaSuccess;
  if (cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin)) return e;
  if (nonportable_clusters)
    if (cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)) return e;
  done |= uint64_t{1} << dev;
  return cudaSuccess;
}

// Threads for one block that walks a row of `nvec` vectors: at most 256, as few loop trips as possible,
// a multiple of the warp size.
inline int row_block_threads(int64_t nvec) {
  const int64_t trips = ceil_div(nvec, 256);
  const int64_t t = ceil_div(ceil_div(nvec, trips < 1 ? 1 : trips), 32) * 32;
  return static_cast<int>(t < 32 ? 32 : t);
}

}  // namespace fdm
