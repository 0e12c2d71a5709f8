// Row reductions over the last dim (LayerNorm, LayerNorm + adaLN modulation, RMSNorm, softmax) and GroupNorm.
//
// Rows may be strided in two levels so a kernel can read e.g. the heads of a fused QKV buffer in place:
// row r = o * inner + i (o < rows / inner, i < inner) starts at o * stride_o + i * stride_i; the last dim is
// contiguous. A row is handled by a group of `width` threads: a power of two <= 32 (several rows per block) for
// short rows, or the whole block for long ones. Statistics are float32 and never E[x^2] - E[x]^2 over a row: the
// looped kernels take two passes over memory, the register kernels two passes over registers (the mean, then the
// squared deviations about it).
//
// Two kernels per op. The register kernels (16-byte vector path, rows up to 4096 packs = 32768 bf16) load the whole
// row into registers with every load issued up front, so a row is read from DRAM exactly once and each thread has
// K * 16 bytes in flight; the statistics passes and the output pass then run on registers. K (packs per thread) is
// a compile-time bucket in {1, 2, 4, 8}. The looped kernels take everything else (unaligned rows, odd sizes, very
// long rows): they re-read the row per pass (the passes after the first hit L1/L2).
#include <type_traits>

#include "gemm.cuh"  // current_device_facts
#include "group_norm.cuh"
#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

struct RowLayout {
  int64_t rows, inner;  // total rows; rows per outer index
  int64_t xs_o, xs_i;   // input strides (elements)
  int64_t ys_o, ys_i;   // output strides (elements)
  // 64-bit division is a long software sequence; most layouts need none or a 32-bit one.
  __device__ __forceinline__ int64_t outer(int64_t r) const {
    if (inner == 1) return r;
    if (r <= INT32_MAX && inner <= INT32_MAX)
      return static_cast<int64_t>(static_cast<uint32_t>(r) / static_cast<uint32_t>(inner));
    return r / inner;
  }
  __device__ __forceinline__ int64_t x_off(int64_t o, int64_t i) const { return o * xs_o + i * xs_i; }
  __device__ __forceinline__ int64_t y_off(int64_t o, int64_t i) const { return o * ys_o + i * ys_i; }
};

// Launch shape for rows of `d` elements moved as V-packs.
struct RowLaunch {
  int width, threads;
  unsigned blocks;
};

RowLaunch row_launch(int64_t rows, int64_t d, int V) {
  const int64_t nvec = ceil_div(d, V);
  RowLaunch l;
  if (nvec <= 128) {  // a warp or less per row, up to 4 packs per lane
    int w = 1;
    while (w < 32 && w < nvec) w <<= 1;
    l.width = w;
    l.threads = 256;
  } else {
    int64_t t = ceil_div(ceil_div(nvec, 2), 32) * 32;
    l.threads = static_cast<int>(t < 64 ? 64 : (t > 512 ? 512 : t));  // kernels are bounded to 512
    l.width = l.threads;
  }
  l.blocks = grid_blocks(rows, l.threads / l.width);
  return l;
}

bool layout_aligned(const RowLayout& L, int64_t d, int V) {
  return d % V == 0 && L.xs_o % V == 0 && L.xs_i % V == 0 && L.ys_o % V == 0 && L.ys_i % V == 0;
}

// Sum over a row of f(x) for packs j = lane, lane + width, ...
template <typename T, int V, typename F>
__device__ __forceinline__ float row_accumulate(const T* xr, bool valid, int64_t nvec, int lane, int width, F f) {
  float acc = 0.f;
  if (valid)
    for (int64_t j = lane; j < nvec; j += width) {
      const Pack<T, V> p = load_pack<T, V>(xr + j * V);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += f(pack_f32(p, k));
    }
  return acc;
}

// LayerNorm, optional affine (w, b may be null), optional modulation (shift/scale element (o, i, j) at
// o * sb + i * ss + j; null when not modulating): y = norm(x) * w + b, then y * (1 + scale) + shift.
template <typename T, int V>
__global__ void __launch_bounds__(512, 1)
layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                  const T* __restrict__ shift, const T* __restrict__ scale, int64_t mod_sb,
                  int64_t mod_ss, T* __restrict__ y, RowLayout L, int64_t d, float eps,
                  int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float smem[32];
  const int64_t nvec = d / V;
  const float inv_d = 1.f / static_cast<float>(d);
  const int sub = threadIdx.x / width, lane = threadIdx.x % width;
  const int64_t rpb = blockDim.x / width;
  // Every thread runs the same trip count (rows past the end compute nothing) so the reductions stay convergent.
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < L.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + sub;
    const bool valid = r < L.rows;
    const int64_t o = valid ? L.outer(r) : 0, i = valid ? r - o * L.inner : 0;
    const T* xr = x + L.x_off(o, i);
    const float mean = row_reduce<false>(
        row_accumulate<T, V>(xr, valid, nvec, lane, width, [](float v) { return v; }), width, smem) * inv_d;
    const float var = row_reduce<false>(
        row_accumulate<T, V>(xr, valid, nvec, lane, width, [mean](float v) { return (v - mean) * (v - mean); }),
        width, smem) * inv_d;
    const float rstd = rsqrtf(var + eps);
    if (valid) {
      T* yr = y + L.y_off(o, i);
      const T* sh = shift ? shift + o * mod_sb + i * mod_ss : nullptr;
      const T* sc = scale ? scale + o * mod_sb + i * mod_ss : nullptr;
      for (int64_t j = lane; j < nvec; j += width) {
        const Pack<T, V> p = load_pack<T, V>(xr + j * V);
        float v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = (pack_f32(p, k) - mean) * rstd;
        if (w) {
          const Pack<T, V> pw = load_pack<T, V>(w + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] *= pack_f32(pw, k);
        }
        if (b) {
          const Pack<T, V> pb = load_pack<T, V>(b + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] += pack_f32(pb, k);
        }
        if (sc) {
          const Pack<T, V> ps = load_pack<T, V>(sc + j * V);
          const Pack<T, V> ph = load_pack<T, V>(sh + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] = v[k] * (1.f + pack_f32(ps, k)) + pack_f32(ph, k);
        }
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(v[k]);
        store_pack<T, V>(yr + j * V, out);
      }
    }
  }
}

// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w (w may be null). Safe in place (y == x with the same layout).
template <typename T, int V>
__global__ void __launch_bounds__(512, 1)
rms_norm_kernel(const T* x, const T* __restrict__ w, T* y, RowLayout L, int64_t d, float eps, int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float smem[32];
  const int64_t nvec = d / V;
  const int sub = threadIdx.x / width, lane = threadIdx.x % width;
  const int64_t rpb = blockDim.x / width;
  // Every thread runs the same trip count (rows past the end compute nothing) so the reductions stay convergent.
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < L.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + sub;
    const bool valid = r < L.rows;
    const int64_t o = valid ? L.outer(r) : 0, i = valid ? r - o * L.inner : 0;
    const T* xr = x + L.x_off(o, i);
    const float ms = row_reduce<false>(
        row_accumulate<T, V>(xr, valid, nvec, lane, width, [](float v) { return v * v; }), width, smem) /
        static_cast<float>(d);
    const float rstd = rsqrtf(ms + eps);
    if (valid) {
      T* yr = y + L.y_off(o, i);
      for (int64_t j = lane; j < nvec; j += width) {
        const Pack<T, V> p = load_pack<T, V>(xr + j * V);
        Pack<T, V> out;
        if (w) {
          const Pack<T, V> pw = load_pack<T, V>(w + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(pack_f32(p, k) * rstd * pack_f32(pw, k));
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(pack_f32(p, k) * rstd);
        }
        store_pack<T, V>(yr + j * V, out);
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1)
softmax_kernel(const T* __restrict__ x, T* __restrict__ y, RowLayout L, int64_t d, int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float smem[32];
  const int64_t nvec = d / V;
  const int sub = threadIdx.x / width, lane = threadIdx.x % width;
  const int64_t rpb = blockDim.x / width;
  // Every thread runs the same trip count (rows past the end compute nothing) so the reductions stay convergent.
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < L.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + sub;
    const bool valid = r < L.rows;
    const int64_t o = valid ? L.outer(r) : 0, i = valid ? r - o * L.inner : 0;
    const T* xr = x + L.x_off(o, i);
    float m = -INFINITY;
    if (valid)
      for (int64_t j = lane; j < nvec; j += width) {
        const Pack<T, V> p = load_pack<T, V>(xr + j * V);
#pragma unroll
        for (int k = 0; k < V; ++k) m = fmaxf(m, pack_f32(p, k));
      }
    m = row_reduce<true>(m, width, smem);
    const float sum = row_reduce<false>(
        row_accumulate<T, V>(xr, valid, nvec, lane, width, [m](float v) { return expf(v - m); }), width, smem);
    const float inv = 1.f / sum;
    if (valid) {
      T* yr = y + L.y_off(o, i);
      for (int64_t j = lane; j < nvec; j += width) {
        const Pack<T, V> p = load_pack<T, V>(xr + j * V);
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(expf(pack_f32(p, k) - m) * inv);
        store_pack<T, V>(yr + j * V, out);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ register row kernels
// Lane `lane` of a row's group holds packs j = lane + k * width (k < K) of the row's nvec packs: each k is one
// coalesced sweep of width * 16 bytes.
template <typename T, int V, int K>
__device__ __forceinline__ void load_row(Pack<T, V> (&p)[K], const T* xr, bool valid, int lane, int width,
                                         int nvec) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = lane + k * width;
    if (valid && j < nvec) p[k] = load_pack_cs<T, V>(xr + static_cast<int64_t>(j) * V);
  }
}

// Sum over this thread's packs of f(x).
template <typename T, int V, int K, typename F>
__device__ __forceinline__ float regs_accumulate(const Pack<T, V> (&p)[K], bool valid, int lane, int width, int nvec,
                                                 F f) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (valid && lane + k * width < nvec) {
#pragma unroll
      for (int e = 0; e < V; ++e) acc += f(pack_f32(p[k], e));
    }
  return acc;
}

// A thread's place in a register row kernel: its row group (`width` lanes, a power of two <= 32 with several rows a
// block, or the whole block on one row when width > 32) by shifts, not divisions, and the offsets of row r. kFlat:
// the rows are equally spaced (row r at r * xs_o in x, r * ys_o in y; flat_layout() checked and rewrote the strides
// on the host), so no row pays a division by `inner`. The per-row overhead matters when a thread holds few
// elements: at FLUX's head RMSNorm, 16 lanes of one pack took 21.5 us with the divisions, 18.2 without.
template <bool kFlat>
struct RowCursor {
  int sub, lane, rpb;
  __device__ __forceinline__ explicit RowCursor(int width) {
    if (width > 32) {
      sub = 0;
      lane = threadIdx.x;
      rpb = 1;
    } else {
      const int s = __ffs(width) - 1;
      sub = threadIdx.x >> s;
      lane = threadIdx.x & (width - 1);
      rpb = blockDim.x >> s;
    }
  }
  // Row r's offsets in x and y and its packs (load_row's layout); false when r is past the end (offsets 0, packs
  // unset).
  template <typename T, int V, int K>
  __device__ __forceinline__ bool load(const RowLayout& L, const T* x, int64_t r, int width, int nvec,
                                       Pack<T, V> (&p)[K], int64_t& xo, int64_t& yo) const {
    const bool valid = r < L.rows;
    xo = yo = 0;
    if (valid) place(L, r, xo, yo);
    load_row<T, V, K>(p, x + xo, valid, lane, width, nvec);
    return valid;
  }
  // Offsets of row r in x and y.
  __device__ __forceinline__ void place(const RowLayout& L, int64_t r, int64_t& xo, int64_t& yo) const {
    if constexpr (kFlat) {
      xo = r * L.xs_o;
      yo = r * L.ys_o;
    } else {
      const int64_t o = L.outer(r), i = r - o * L.inner;
      xo = L.x_off(o, i);
      yo = L.y_off(o, i);
    }
  }
};

// Block size cap of the register kernels: 512 threads leave up to 128 registers a thread (K = 8 with affine LN).
constexpr int kRegMaxThreads = 512;

// Sum over the threads of a row held in registers: a group of width <= 32 lanes (shuffles only), or the whole
// block (width == blockDim.x > 32): shuffles, then one barrier, and each warp sums the per-warp partials from
// `slots` by shuffles (every thread gets the same bits). No barrier guards the slots' reuse: a kernel uses two
// slot arrays in turn (LayerNorm: one per reduction of a row; RMSNorm: one per row, alternating), so a thread can
// only overwrite an array after every thread passed the barrier of the other one, which they reach only after
// reading it.
__device__ __forceinline__ float row_sum(float v, int width, float* slots) {
  v = group_sum(v, width < 32 ? width : 32);
  if (width <= 32) return v;
  const int lane = threadIdx.x & 31;
  if (lane == 0) slots[threadIdx.x >> 5] = v;
  __syncthreads();
  return group_sum(lane < static_cast<int>(blockDim.x >> 5) ? slots[lane] : 0.f, 32);
}

// LayerNorm's two row statistics over registers, exact two-pass: the mean, then the squared deviations about it
// (row_sum twice). Session 8's single reduction merging per-thread (count, mean, M2) triples saved a barrier but
// paid divisions and a serial per-warp merge loop; with this form, the block-per-row kernel and the leaner row code
// LayerNorm+modulate at [4608, 3072] bf16 went 21.0 -> 18.0 us (H200).
template <typename T, int V, int K>
__device__ __forceinline__ void layer_norm_stats(const Pack<T, V> (&p)[K], bool valid, int lane, int width, int nvec,
                                                 float inv_d, float eps, float (&slots)[2][kRegMaxThreads / 32],
                                                 float& mean, float& rstd) {
  mean = row_sum(regs_accumulate<T, V, K>(p, valid, lane, width, nvec, [](float v) { return v; }), width,
                 slots[0]) * inv_d;
  const float mu = mean;
  const float m2 = row_sum(
      regs_accumulate<T, V, K>(p, valid, lane, width, nvec, [mu](float v) { return (v - mu) * (v - mu); }), width,
      slots[1]);
  rstd = rsqrtf(m2 * inv_d + eps);
}

// Writes a normalized row held in registers. kMod: (x - mean) * rstd * (1 + scale) + shift (sh, sc: the row's
// modulation vectors), with rstd * (1 + scale) as one FMA; else (x - mean) * rstd, then * w and + b where given.
template <typename T, int V, int K, bool kMod>
__device__ __forceinline__ void layer_norm_store_row(const Pack<T, V> (&p)[K], int lane, int width, int nvec,
                                                     float mean, float rstd, T* yr, const T* w, const T* b,
                                                     const T* sh, const T* sc) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = lane + k * width;
    if (j >= nvec) continue;
    Pack<T, V> out;
    if constexpr (kMod) {
      const Pack<T, V> ps = load_pack<T, V>(sc + j * V);
      const Pack<T, V> ph = load_pack<T, V>(sh + j * V);
#pragma unroll
      for (int e = 0; e < V; ++e)
        out.v[e] = from_f32<T>(fmaf(pack_f32(p[k], e) - mean, fmaf(pack_f32(ps, e), rstd, rstd), pack_f32(ph, e)));
    } else {
      float v[V];
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = (pack_f32(p[k], e) - mean) * rstd;
      if (w) {
        const Pack<T, V> pw = load_pack<T, V>(w + j * V);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] *= pack_f32(pw, e);
      }
      if (b) {
        const Pack<T, V> pb = load_pack<T, V>(b + j * V);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += pack_f32(pb, e);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(v[e]);
    }
    store_pack_cs<T, V>(yr + j * V, out);
  }
}

// Modulation row of row r: (o, i) -> o * mod_sb + i * mod_ss, 0 for one vector pair (B == 1) without a division.
__device__ __forceinline__ int64_t modulation_offset(const RowLayout& L, int64_t r, int64_t mod_sb, int64_t mod_ss) {
  if (mod_sb == 0 && mod_ss == 0) return 0;
  const int64_t o = L.outer(r);
  return o * mod_sb + (r - o * L.inner) * mod_ss;
}

// Rows of width <= 32 lanes, several a block (grid-stride over rows); also rows spanning a block when there are
// more than a grid of one block a row can hold (layer_norm_block_kernel takes them otherwise).
// K <= 4: at most 64 registers (two 512-thread blocks' worth).
// kMod: LayerNorm without affine, then the modulation (shift and scale set, w and b unused); else the optional
// affine (w, b may be null) and no modulation. Compiled apart, each form holds only its own operands' registers.
template <typename T, int V, int K, bool kMod, bool kFlat>
__global__ void __launch_bounds__(kRegMaxThreads, K <= 4 ? 2 : 1)
layer_norm_regs_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                       const T* __restrict__ shift, const T* __restrict__ scale, int64_t mod_sb, int64_t mod_ss,
                       T* __restrict__ y, RowLayout L, int nvec, float inv_d, float eps, int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float slots[2][kRegMaxThreads / 32];  // row_sum's, used when a row spans the block
  const RowCursor<kFlat> rc(width);
  // Every thread runs the same trip count (rows past the end compute nothing) so the reductions stay convergent.
  for (int64_t base = int64_t(blockIdx.x) * rc.rpb; base < L.rows; base += int64_t(gridDim.x) * rc.rpb) {
    const int64_t r = base + rc.sub;
    Pack<T, V> p[K];
    int64_t xo, yo;
    const bool valid = rc.load(L, x, r, width, nvec, p, xo, yo);
    float mean, rstd;
    layer_norm_stats<T, V, K>(p, valid, rc.lane, width, nvec, inv_d, eps, slots, mean, rstd);
    if (!valid) continue;
    const int64_t mo = kMod ? modulation_offset(L, r, mod_sb, mod_ss) : 0;
    layer_norm_store_row<T, V, K, kMod>(p, rc.lane, width, nvec, mean, rstd, y + yo, w, b, shift + mo, scale + mo);
  }
}

// A row over the whole block (blockDim.x > 32 threads), one row a block (grid = rows): no row loop, no rows past
// the end, offsets computed once. 52 registers at K = 4 (bf16, modulated), so ~100-thread row blocks fill an SM
// 12 deep (ncu, session 7: 88 registers held LayerNorm+modulate at 28% occupancy, 49% of copy bandwidth).
template <typename T, int V, int K, bool kMod>
__global__ void __launch_bounds__(kRegMaxThreads, K <= 4 ? 2 : 1)
layer_norm_block_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                        const T* __restrict__ shift, const T* __restrict__ scale, int64_t mod_sb, int64_t mod_ss,
                        T* __restrict__ y, RowLayout L, int nvec, float inv_d, float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float slots[2][kRegMaxThreads / 32];
  const int64_t r = blockIdx.x;
  const int64_t o = L.outer(r), i = r - o * L.inner;
  Pack<T, V> p[K];
  load_row<T, V, K>(p, x + L.x_off(o, i), true, threadIdx.x, blockDim.x, nvec);
  float mean, rstd;
  layer_norm_stats<T, V, K>(p, true, threadIdx.x, blockDim.x, nvec, inv_d, eps, slots, mean, rstd);
  const int64_t mo = kMod ? o * mod_sb + i * mod_ss : 0;
  layer_norm_store_row<T, V, K, kMod>(p, threadIdx.x, blockDim.x, nvec, mean, rstd, y + L.y_off(o, i), w, b,
                                      shift + mo, scale + mo);
}

// Safe in place (y == x with the same layout): a row is fully in registers before any of it is written.
// K <= 4 bounded to 64 registers as for LayerNorm: at 69 registers the [4608 x 24, 128] head norm of FLUX held 3
// blocks of 256 per SM (37.5% occupancy, 38% of DRAM bandwidth under ncu); 18 -> 17 us.
template <typename T, int V, int K, bool kFlat>
__global__ void __launch_bounds__(kRegMaxThreads, K <= 4 ? 2 : 1)
rms_norm_regs_kernel(const T* x, const T* __restrict__ w, T* y, RowLayout L, int nvec, float inv_d, float eps,
                     int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float slots[2][kRegMaxThreads / 32];  // row_sum's, alternating between rows
  const RowCursor<kFlat> rc(width);
  const int lane = rc.lane;
  int parity = 0;
  for (int64_t base = int64_t(blockIdx.x) * rc.rpb; base < L.rows; base += int64_t(gridDim.x) * rc.rpb) {
    const int64_t r = base + rc.sub;
    Pack<T, V> p[K];
    int64_t xo, yo;
    const bool valid = rc.load(L, x, r, width, nvec, p, xo, yo);
    const float ms = row_sum(regs_accumulate<T, V, K>(p, valid, lane, width, nvec, [](float v) { return v * v; }),
                             width, slots[parity]) * inv_d;
    parity ^= 1;
    const float rstd = rsqrtf(ms + eps);
    if (!valid) continue;
    T* yr = y + yo;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + k * width;
      if (j >= nvec) continue;
      Pack<T, V> out;
      if (w) {
        const Pack<T, V> pw = load_pack<T, V>(w + j * V);
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(pack_f32(p[k], e) * rstd * pack_f32(pw, e));
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(pack_f32(p[k], e) * rstd);
      }
      store_pack_cs<T, V>(yr + j * V, out);
    }
  }
}

template <typename T, int V, int K>
__global__ void __launch_bounds__(kRegMaxThreads, 1)
softmax_regs_kernel(const T* __restrict__ x, T* __restrict__ y, RowLayout L, int nvec, int width) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ float smem[32];
  const int sub = threadIdx.x / width, lane = threadIdx.x - sub * width;
  const int64_t rpb = blockDim.x / width;
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < L.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + sub;
    const bool valid = r < L.rows;
    const int64_t o = valid ? L.outer(r) : 0, i = valid ? r - o * L.inner : 0;
    Pack<T, V> p[K];
    load_row<T, V, K>(p, x + L.x_off(o, i), valid, lane, width, nvec);
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (valid && lane + k * width < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) m = fmaxf(m, pack_f32(p[k], e));
      }
    m = row_reduce<true>(m, width, smem);
    const float sum = row_reduce<false>(
        regs_accumulate<T, V, K>(p, valid, lane, width, nvec, [m](float v) { return expf(v - m); }), width, smem);
    const float inv = 1.f / sum;
    if (!valid) continue;
    T* yr = y + L.y_off(o, i);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + k * width;
      if (j >= nvec) continue;
      Pack<T, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(expf(pack_f32(p[k], e) - m) * inv);
      store_pack_cs<T, V>(yr + j * V, out);
    }
  }
}

// Launch shape of the register kernels; k == 0 when the row is too long for them.
struct RegPlan {
  int k = 0, width = 0, threads = 0;
  unsigned blocks = 0;
};

// Blocks below which a launch of small blocks leaves SMs idle (132 SMs on H100/H200, 2 blocks each).
constexpr int64_t kFillBlocks = 264;

RegPlan reg_plan(int64_t rows, int64_t nvec) {
  RegPlan p;
  if (nvec <= 256) {  // a group of <= 32 lanes per row, several rows per block
    // The narrowest group with at most 2 packs per lane (up to 8 at width 32): at FLUX's [4608 x 24, 128] head
    // RMSNorm (16 packs) 8 lanes of 2 packs ran 16.9 us, 4 lanes of 4 17.5 and 16 lanes of 1 18.6 (H200): more
    // threads with fewer registers each, until the per-row overhead of a one-pack thread dominates.
    int w = 1;
    while (w < 32 && w * 2 < nvec) w <<= 1;
    const int64_t per = ceil_div(nvec, w);
    p.k = per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 8;
    p.width = w;
    int t = 256;
    while (t > 64 && ceil_div(rows, t / w) < kFillBlocks) t >>= 1;  // small problems: more, smaller blocks
    p.threads = t;
    p.blocks = grid_blocks(rows, t / w);
  } else if (nvec <= int64_t{8} * kRegMaxThreads) {  // a block per row
    p.k = nvec <= int64_t{4} * kRegMaxThreads ? 4 : 8;
    p.threads = p.width = static_cast<int>(ceil_div(ceil_div(nvec, p.k), 32) * 32);
    p.blocks = grid_blocks(rows, 1);
  }
  return p;
}

// Calls f(std::integral_constant<int, K>) for the plan's K, so each branch launches a compile-time bucket.
template <typename F>
void with_k(int k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Calls f(std::bool_constant<b>) so a branch launches the compile-time form.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// The register kernels' flat form (RowCursor<true>): when the rows are equally spaced in x and in y, returns true
// and rewrites F's xs_o / ys_o to those spacings (row r at r * xs_o, r * ys_o).
bool flat_layout(const RowLayout& L, RowLayout& F) {
  F = L;
  if (L.inner == 1) return true;
  if (L.rows == L.inner) {  // one outer index: row i at i * xs_i
    F.xs_o = L.xs_i;
    F.ys_o = L.ys_i;
    return true;
  }
  if (L.xs_o == L.inner * L.xs_i && L.ys_o == L.inner * L.ys_i) {
    F.xs_o = L.xs_i;
    F.ys_o = L.ys_i;
    return true;
  }
  return false;
}

// LayerNorm through the register kernels for a plan with rp.k != 0: a block per row when the row spans the block,
// else groups of rp.width lanes (flat form when the layout allows).
template <typename T, int V, bool kMod>
void launch_layer_norm_regs(const RegPlan& rp, const T* x, const T* w, const T* b, const T* sh, const T* sc,
                            int64_t mod_sb, int64_t mod_ss, T* y, const RowLayout& L, int64_t d, float eps,
                            cudaStream_t stream) {
  const int nvec = static_cast<int>(d / V);
  const float inv_d = 1.f / static_cast<float>(d);
  with_k(rp.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    if (rp.width > 32 && L.rows <= INT32_MAX) {
      launch_dependent(layer_norm_block_kernel<T, V, K, kMod>, static_cast<unsigned>(L.rows), rp.threads, 0, stream,
          x, w, b, sh, sc, mod_sb, mod_ss, y, L, nvec, inv_d, eps);
      return;
    }
    RowLayout F;
    const bool flat = flat_layout(L, F);
    with_bool(flat, [&](auto fc) {
      launch_dependent(layer_norm_regs_kernel<T, V, K, kMod, decltype(fc)::value>, rp.blocks, rp.threads, 0, stream,
          x, w, b, sh, sc, mod_sb, mod_ss, y, F, nvec, inv_d, eps, rp.width);
    });
  });
}

int check_layout(const char* fn, const RowLayout& L, int64_t d) {
  if (L.rows < 0 || d < 0) return arg_error("%s: negative size (rows=%lld, d=%lld)", fn, (long long)L.rows,
                                            (long long)d);
  if (L.inner < 1) return arg_error("%s: inner row count must be >= 1, got %lld", fn, (long long)L.inner);
  if (L.rows % L.inner != 0)
    return arg_error("%s: rows (%lld) must be a multiple of inner (%lld)", fn, (long long)L.rows,
                     (long long)L.inner);
  return 0;
}

// ------------------------------------------------------------------------------------------------ GroupNorm
// x: [N, C, HW] contiguous, groups of Cg = C / G channels: group n*G + g is the contiguous run of L = Cg * HW
// elements at (n*G + g) * L. Each group is cut into `chunks` pieces of `chunk` elements (a multiple of 8), one block
// each. Pass 1 writes the (mean, M2) of each piece to ws [N*G, chunks, 2]; pass 2 merges a group's pieces (Chan et
// al.) and normalizes (+ SiLU) its own piece. x is read twice (once per pass) and y written once; pass 2 walks the
// pieces in reverse launch order, so it starts on the ones pass 1 read last, which are the likeliest still in L2.
// A block walks its piece as tiles of 512 threads x 4 packs with the next tile's loads issued before the current
// tile's math, on a grid of at most one wave of resident blocks (launch_group_norm picks the piece count), so
// every SM streams without gaps between blocks. The older form (a block per 32 KB tile, loads then math, 256 x 8
// packs at 89-117 registers, two blocks an SM) ran [2, 512, 128, 128] at 41 us; ncu had the statistics read at 2.5
// TB/s and the apply pass at 1.1 TB/s with 25% occupancy (H200).
constexpr int kGnThreads = 512, kGnPacks = 4;
constexpr int64_t kGnTile = int64_t{kGnThreads} * kGnPacks;  // packs per tile

// Elements in piece k of a group: `chunk`, less for the last piece, 0 past the end.
__device__ __forceinline__ int64_t piece_len(int64_t L, int64_t chunk, int64_t k) {
  const int64_t c0 = k * chunk;
  return c0 >= L ? 0 : (L - c0 < chunk ? L - c0 : chunk);
}

// Loads this thread's packs of the tile starting at pack t0 (of nvec). I: index type (32-bit when the group fits).
template <typename T, int V, typename I>
__device__ __forceinline__ void gn_load_tile(Pack<T, V> (&p)[kGnPacks], const T* xc, I t0, I nvec, bool stream) {
  const bool full = t0 + static_cast<I>(kGnTile) <= nvec;  // the usual case: no per-pack bounds tests
#pragma unroll
  for (int k = 0; k < kGnPacks; ++k) {
    const I j = t0 + threadIdx.x + k * kGnThreads;
    if (full || j < nvec)
      p[k] = stream ? load_pack_cs<T, V>(xc + static_cast<int64_t>(j) * V)
                    : load_pack<T, V>(xc + static_cast<int64_t>(j) * V);
  }
}

// Exact two-pass moments of this thread's values of the tile at pack t0 (in registers), merged into acc. A full
// tile (the usual case) takes no per-pack bounds tests and a compile-time count, and sums in two chains.
template <typename T, int V, typename I>
__device__ __forceinline__ void gn_tile_moments(const Pack<T, V> (&p)[kGnPacks], I t0, I nvec, Moments& acc) {
  if (t0 + static_cast<I>(kGnTile) <= nvec) {
    float s[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < kGnPacks; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) s[k & 1] += pack_f32(p[k], e);
    constexpr float kCount = kGnPacks * V;
    const float mean = (s[0] + s[1]) * (1.f / kCount);
    float q[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < kGnPacks; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float c = pack_f32(p[k], e) - mean;
        q[k & 1] = fmaf(c, c, q[k & 1]);
      }
    acc = merge(acc, Moments{kCount, mean, q[0] + q[1]});
    return;
  }
  packs_moments<T, V, kGnPacks, kGnThreads, I>(p, t0 + static_cast<I>(threadIdx.x), nvec, acc);
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kGnThreads, 2)
group_norm_stats_kernel(const T* __restrict__ x, float* __restrict__ ws, int64_t L, int64_t chunk, int chunks) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ Moments part[kGnThreads / 32];
  const int64_t ng = blockIdx.y;
  const T* xc = x + ng * L + int64_t(blockIdx.x) * chunk;
  const I nvec = static_cast<I>(piece_len(L, chunk, blockIdx.x) / V);  // V divides L and chunk on the vector path
  Moments acc{0.f, 0.f, 0.f};
  Pack<T, V> p[kGnPacks];
  gn_load_tile<T, V, I>(p, xc, 0, nvec, false);  // pass 2 reads x again: keep it in L2
  for (I t0 = 0; t0 < nvec; t0 += kGnTile) {
    Pack<T, V> next[kGnPacks];  // the next tile's loads are in flight while this one's moments are taken
    if (t0 + kGnTile < nvec) gn_load_tile<T, V, I>(next, xc, t0 + kGnTile, nvec, false);
    gn_tile_moments<T, V, I>(p, t0, nvec, acc);
#pragma unroll
    for (int k = 0; k < kGnPacks; ++k) p[k] = next[k];
  }
  const Moments m = block_merge(acc, part);
  if (threadIdx.x == 0) {
    ws[(ng * chunks + blockIdx.x) * 2] = m.mean;
    ws[(ng * chunks + blockIdx.x) * 2 + 1] = m.m2;
  }
}

// I: the type of the in-group position math (uint32_t when the group fits, int64_t otherwise).
template <typename T, int V, bool kSilu, typename I>
__global__ void __launch_bounds__(kGnThreads, 2)
group_norm_apply_kernel(const T* __restrict__ x, const float* __restrict__ ws, const T* __restrict__ w,
                        const T* __restrict__ b, T* __restrict__ y, int64_t L, int64_t HW, int64_t Cg, int G,
                        int64_t chunk, int chunks, float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t ng = gridDim.y - 1 - blockIdx.y, piece = gridDim.x - 1 - blockIdx.x;
  const int64_t n = piece_len(L, chunk, piece);
  if (n == 0) return;  // uniform over the block
  const int64_t c0 = piece * chunk;
  const T* xc = x + ng * L + c0;
  T* yc = y + ng * L + c0;
  const I nvec = static_cast<I>(n / V);

  // The first tile's loads go out before the statistics are merged, so their latencies overlap.
  Pack<T, V> p[kGnPacks];
  gn_load_tile<T, V, I>(p, xc, 0, nvec, true);  // last use of x

  // Every warp merges the group's pieces itself (a few dozen float pairs from L2): no shared memory, no barrier.
  const float* st = ws + ng * chunks * 2;
  Moments m{0.f, 0.f, 0.f};
  for (int k = threadIdx.x & 31; k < chunks; k += 32) {
    const float nk = static_cast<float>(piece_len(L, chunk, k));
    if (nk > 0.f) m = merge(m, Moments{nk, st[2 * k], st[2 * k + 1]});
  }
  m = group_merge(m, 32);
  const float mean = m.mean, rstd = rsqrtf(m.m2 / static_cast<float>(L) + eps);

  const int64_t ch0 = (ng % G) * Cg;  // first channel of the group
  const I hw = static_cast<I>(HW), pos0 = static_cast<I>(c0);
  for (I t0 = 0; t0 < nvec; t0 += kGnTile) {
    Pack<T, V> next[kGnPacks];
    if (t0 + kGnTile < nvec) gn_load_tile<T, V, I>(next, xc, t0 + kGnTile, nvec, true);
#pragma unroll
    for (int k = 0; k < kGnPacks; ++k) {
      const I j = t0 + threadIdx.x + k * kGnThreads;
      if (j >= nvec) continue;
      // V divides HW on the vector path, so a pack never straddles two channels.
      const int64_t ch = ch0 + static_cast<int64_t>((pos0 + j * V) / hw);
      const float a = rstd * (w ? to_f32(w[ch]) : 1.f);
      const float c = (b ? to_f32(b[ch]) : 0.f) - mean * a;
      Pack<T, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float v = fmaf(pack_f32(p[k], e), a, c);
        if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_pack_element(v, e);
        out.v[e] = from_f32<T>(v);
      }
      store_pack_cs<T, V>(yc + static_cast<int64_t>(j) * V, out);
    }
#pragma unroll
    for (int k = 0; k < kGnPacks; ++k) p[k] = next[k];
  }
}

// `chunks` pieces a group at most (the workspace is sized for them); the launch uses fewer, longer pieces when
// that keeps the grid within one wave of resident blocks.
template <typename T, int V>
int launch_group_norm(const void* x, const void* w, const void* b, void* y, float* ws, int64_t N, int64_t C,
                      int64_t HW, int G, int chunks, float eps, bool silu_act, cudaStream_t s) {
  const int64_t Cg = C / G, L = Cg * HW;
  const bool small = L <= INT32_MAX;
  DeviceFacts dev;
  if (const int e = current_device_facts(&dev)) return e;
  int occ = 0;
  if (cudaError_t e = small ? resident_blocks<group_norm_stats_kernel<T, V, uint32_t>>(kGnThreads, 0, &occ)
                            : resident_blocks<group_norm_stats_kernel<T, V, int64_t>>(kGnThreads, 0, &occ))
    return static_cast<int>(e);
  const int64_t per_group = int64_t{occ > 1 ? occ : 1} * dev.sm_count / (N * G);
  const int64_t want = per_group < 1 ? 1 : (per_group < chunks ? per_group : chunks);
  const int64_t chunk = ceil_div(ceil_div(L, want), 8) * 8;
  const int eff = static_cast<int>(ceil_div(L, chunk));  // pieces launched, none empty, <= want <= chunks
  const dim3 grid(eff, static_cast<unsigned>(N * G));
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(b);
  T* yt = static_cast<T*>(y);
  if (small)
    launch_dependent(group_norm_stats_kernel<T, V, uint32_t>, grid, kGnThreads, 0, s, xt, ws, L, chunk, eff);
  else
    launch_dependent(group_norm_stats_kernel<T, V, int64_t>, grid, kGnThreads, 0, s, xt, ws, L, chunk, eff);
  if (silu_act && small)
    launch_dependent(group_norm_apply_kernel<T, V, true, uint32_t>, grid, kGnThreads, 0, s,
        xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, eff, eps);
  else if (silu_act)
    launch_dependent(group_norm_apply_kernel<T, V, true, int64_t>, grid, kGnThreads, 0, s,
        xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, eff, eps);
  else if (small)
    launch_dependent(group_norm_apply_kernel<T, V, false, uint32_t>, grid, kGnThreads, 0, s,
        xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, eff, eps);
  else
    launch_dependent(group_norm_apply_kernel<T, V, false, int64_t>, grid, kGnThreads, 0, s,
        xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, eff, eps);
  return launch_status();
}

}  // namespace

// Which GroupNorm kernels ran last / are forced, NCHW here and channels-last in group_norm_nhwc.cu
// (fdm_group_norm_set_path, fdm_group_norm_last_path; used by tests and bench/fused.py).
int g_gn_force_path = kGnAuto;
int g_gn_last_path = kGnAuto;

}  // namespace fdm

using namespace fdm;

// Row layout arguments shared by the row kernels: `rows` rows of `d` elements; row r = o * inner + i reads
// x + o * xs_o + i * xs_i and writes y + o * ys_o + i * ys_i (contiguous rows: inner = 1, xs_o = ys_o = d).

// LayerNorm over the last dim; w, b: [d] or null.
FDM_API int fdm_layer_norm(const void* x, const void* w, const void* b, void* y, int64_t rows, int64_t inner,
                           int64_t xs_o, int64_t xs_i, int64_t ys_o, int64_t ys_i, int64_t d, float eps, int dtype,
                           cudaStream_t stream) {
  const RowLayout L{rows, inner, xs_o, xs_i, ys_o, ys_i};
  if (int e = check_layout("fdm_layer_norm", L, d)) return e;
  if (rows == 0 || d == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = layout_aligned(L, d, V) && aligned16(x) && aligned16(y) && (!w || aligned16(w)) &&
                     (!b || aligned16(b));
    const RowLaunch l = row_launch(rows, d, vec ? V : 1);
    auto xt = static_cast<const T*>(x);
    auto wt = static_cast<const T*>(w);
    auto bt = static_cast<const T*>(b);
    const RegPlan rp = vec ? reg_plan(rows, d / V) : RegPlan{};
    if (rp.k) {
      launch_layer_norm_regs<T, V, false>(rp, xt, wt, bt, nullptr, nullptr, 0, 0, static_cast<T*>(y), L, d, eps,
                                          stream);
    } else if (vec)
      launch_dependent(layer_norm_kernel<T, V>, l.blocks, l.threads, 0, stream,
          xt, wt, bt, nullptr, nullptr, 0, 0, static_cast<T*>(y), L, d, eps, l.width);
    else
      launch_dependent(layer_norm_kernel<T, 1>, l.blocks, l.threads, 0, stream,
          xt, wt, bt, nullptr, nullptr, 0, 0, static_cast<T*>(y), L, d, eps, l.width);
    return launch_status();
  });
  return 0;
}

// LayerNorm without affine, then y * (1 + scale) + shift. shift/scale element (o, i, j) at o * mod_sb + i * mod_ss
// + j: for x [B, S, D] (o = batch, i = token) and shift, scale [B, D] pass mod_sb = their row stride, mod_ss = 0.
FDM_API int fdm_layer_norm_modulate(const void* x, const void* shift, const void* scale, int64_t mod_sb,
                  int64_t mod_ss, void* y, int64_t rows, int64_t inner, int64_t xs_o,
                  int64_t xs_i, int64_t ys_o, int64_t ys_i, int64_t d, float eps, int dtype,
                                    cudaStream_t stream) {
  const RowLayout L{rows, inner, xs_o, xs_i, ys_o, ys_i};
  if (int e = check_layout("fdm_layer_norm_modulate", L, d)) return e;
  if (!shift || !scale) return arg_error("fdm_layer_norm_modulate: shift and scale are required");
  if (rows == 0 || d == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = layout_aligned(L, d, V) && aligned16(x) && aligned16(y) && aligned16(shift) &&
                     aligned16(scale) && mod_sb % V == 0 && mod_ss % V == 0;
    const RowLaunch l = row_launch(rows, d, vec ? V : 1);
    auto xt = static_cast<const T*>(x);
    auto sh = static_cast<const T*>(shift);
    auto sc = static_cast<const T*>(scale);
    const RegPlan rp = vec ? reg_plan(rows, d / V) : RegPlan{};
    if (rp.k) {
      launch_layer_norm_regs<T, V, true>(rp, xt, nullptr, nullptr, sh, sc, mod_sb, mod_ss, static_cast<T*>(y), L, d,
                                         eps, stream);
    } else if (vec)
      launch_dependent(layer_norm_kernel<T, V>, l.blocks, l.threads, 0, stream,
          xt, nullptr, nullptr, sh, sc, mod_sb, mod_ss, static_cast<T*>(y), L, d, eps, l.width);
    else
      launch_dependent(layer_norm_kernel<T, 1>, l.blocks, l.threads, 0, stream,
          xt, nullptr, nullptr, sh, sc, mod_sb, mod_ss, static_cast<T*>(y), L, d, eps, l.width);
    return launch_status();
  });
  return 0;
}

// RMSNorm over the last dim, float32 math; w: [d] or null. y may be x (same layout) to normalize in place.
FDM_API int fdm_rms_norm(const void* x, const void* w, void* y, int64_t rows, int64_t inner, int64_t xs_o,
                         int64_t xs_i, int64_t ys_o, int64_t ys_i, int64_t d, float eps, int dtype,
                         cudaStream_t stream) {
  const RowLayout L{rows, inner, xs_o, xs_i, ys_o, ys_i};
  if (int e = check_layout("fdm_rms_norm", L, d)) return e;
  if (rows == 0 || d == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = layout_aligned(L, d, V) && aligned16(x) && aligned16(y) && (!w || aligned16(w));
    const RowLaunch l = row_launch(rows, d, vec ? V : 1);
    auto xt = static_cast<const T*>(x);
    auto wt = static_cast<const T*>(w);
    const RegPlan rp = vec ? reg_plan(rows, d / V) : RegPlan{};
    if (rp.k) {
      RowLayout F;
      const bool flat = flat_layout(L, F);
      with_k(rp.k, [&](auto kc) {
        with_bool(flat, [&](auto fc) {
          launch_dependent(rms_norm_regs_kernel<T, V, decltype(kc)::value, decltype(fc)::value>,
              rp.blocks, rp.threads, 0, stream, xt, wt, static_cast<T*>(y), F, static_cast<int>(d / V),
              1.f / static_cast<float>(d), eps, rp.width);
        });
      });
    } else if (vec)
      launch_dependent(rms_norm_kernel<T, V>, l.blocks, l.threads, 0, stream,
          xt, wt, static_cast<T*>(y), L, d, eps, l.width);
    else
      launch_dependent(rms_norm_kernel<T, 1>, l.blocks, l.threads, 0, stream,
          xt, wt, static_cast<T*>(y), L, d, eps, l.width);
    return launch_status();
  });
  return 0;
}

// Softmax over the last dim (float32 math).
FDM_API int fdm_softmax(const void* x, void* y, int64_t rows, int64_t inner, int64_t xs_o, int64_t xs_i,
                        int64_t ys_o, int64_t ys_i, int64_t d, int dtype, cudaStream_t stream) {
  const RowLayout L{rows, inner, xs_o, xs_i, ys_o, ys_i};
  if (int e = check_layout("fdm_softmax", L, d)) return e;
  if (rows == 0 || d == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = layout_aligned(L, d, V) && aligned16(x) && aligned16(y);
    const RowLaunch l = row_launch(rows, d, vec ? V : 1);
    const RegPlan rp = vec ? reg_plan(rows, d / V) : RegPlan{};
    if (rp.k) {
      with_k(rp.k, [&](auto kc) {
        launch_dependent(softmax_regs_kernel<T, V, decltype(kc)::value>, rp.blocks, rp.threads, 0, stream,
            static_cast<const T*>(x), static_cast<T*>(y), L, static_cast<int>(d / V), rp.width);
      });
    } else if (vec)
      launch_dependent(softmax_kernel<T, V>, l.blocks, l.threads, 0, stream,
          static_cast<const T*>(x), static_cast<T*>(y), L, d, l.width);
    else
      launch_dependent(softmax_kernel<T, 1>, l.blocks, l.threads, 0, stream,
          static_cast<const T*>(x), static_cast<T*>(y), L, d, l.width);
    return launch_status();
  });
  return 0;
}

// GroupNorm over x [N, C, HW] (contiguous; HW = product of the spatial dims), per-channel affine w, b ([C] or
// null), then SiLU when silu != 0. Each group is cut into `chunks` pieces (statistics per piece, then merged;
// about 16K elements a piece keeps all SMs busy); ws: float32 workspace of N * G * chunks * 2.
FDM_API int fdm_group_norm(const void* x, const void* w, const void* b, void* y, void* ws, int chunks, int64_t N,
                           int64_t C, int64_t HW, int G, float eps, int silu, int dtype, cudaStream_t stream) {
  if (N < 0 || C < 0 || HW < 0) return arg_error("fdm_group_norm: negative size");
  if (G < 1 || C % G != 0) return arg_error("fdm_group_norm: %lld channels do not split into %d groups",
                                            (long long)C, G);
  if (chunks < 1 || chunks > 65535) return arg_error("fdm_group_norm: chunks %d not in [1, 65535]", chunks);
  if (N * G > 65535) return arg_error("fdm_group_norm: N * groups = %lld exceeds 65535", (long long)(N * G));
  if (N == 0 || C == 0 || HW == 0) return 0;
  // Hopper: the one-pass cluster kernel where a group fits a cluster (16 CTAs of 76 KB: groups up to ~1.2 MB; HW in
  // whole 16-byte packs) and there is a group for every four SMs; the two-pass kernels below take what it declines.
  if (g_gn_force_path == kGnResident)
    return arg_error("fdm_group_norm: the whole-tensor-on-chip path takes channels-last input only");
  if (const int st = group_norm_try_sm90(
          kGnOnePass, [&] { return group_norm_sm90(x, w, b, y, N, C, HW, G, eps, silu != 0, dtype, stream); },
          "fdm_group_norm", "a group of at most 16 x 76 KB, HW a multiple of 16 bytes, aligned x and y");
      st != kGroupNormSm90Declined)
    return st;
  g_gn_last_path = kGnTwoPass;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = HW % V == 0 && aligned16(x) && aligned16(y);
    auto wsf = static_cast<float*>(ws);
    return vec ? launch_group_norm<T, V>(x, w, b, y, wsf, N, C, HW, G, chunks, eps, silu != 0, stream)
               : launch_group_norm<T, 1>(x, w, b, y, wsf, N, C, HW, G, chunks, eps, silu != 0, stream);
  });
  return 0;
}

// Test hook, for fdm_group_norm and fdm_group_norm_nhwc: 0 picks the kernels by device and call; 1 forces the
// one-pass sm90 cluster kernel, 3 the channels-last whole-tensor-on-chip kernel (a call the forced kernel cannot
// take then fails with an argument error), 2 the two-pass (NCHW) or three-kernel (channels-last) path.
FDM_API int fdm_group_norm_set_path(int path) {
  if (path < kGnAuto || path > kGnResident) return arg_error("unknown group_norm path %d", path);
  g_gn_force_path = path;
  return 0;
}

// The path (1 one-pass cluster, 2 two-pass / three-kernel, 3 whole tensor on chip) the last group_norm call of either
// layout ran, on any thread; a query, not a status.
FDM_API int fdm_group_norm_last_path() { return g_gn_last_path; }
