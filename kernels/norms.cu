// Row reductions over the last dim (LayerNorm, LayerNorm + adaLN modulation, RMSNorm, softmax) and GroupNorm.
//
// Rows may be strided in two levels so a kernel can read e.g. the heads of a fused QKV buffer in place:
// row r = o * inner + i (o < rows / inner, i < inner) starts at o * stride_o + i * stride_i; the last dim is
// contiguous. A row is handled by a group of `width` threads: a power of two <= 32 (several rows per block) for
// short rows, or the whole block for long ones. Rows are read from global memory once per pass (mean, variance,
// output); the passes after the first hit L1/L2. Statistics are float32 two-pass (no E[x^2] - E[x]^2).
#include "vec.cuh"

namespace fdm {
namespace {

struct RowLayout {
  int64_t rows, inner;  // total rows; rows per outer index
  int64_t xs_o, xs_i;   // input strides (elements)
  int64_t ys_o, ys_i;   // output strides (elements)
  __device__ __forceinline__ int64_t outer(int64_t r) const { return r / inner; }
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
      for (int k = 0; k < V; ++k) acc += f(to_f32(p.v[k]));
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
        for (int k = 0; k < V; ++k) v[k] = (to_f32(p.v[k]) - mean) * rstd;
        if (w) {
          const Pack<T, V> pw = load_pack<T, V>(w + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] *= to_f32(pw.v[k]);
        }
        if (b) {
          const Pack<T, V> pb = load_pack<T, V>(b + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] += to_f32(pb.v[k]);
        }
        if (sc) {
          const Pack<T, V> ps = load_pack<T, V>(sc + j * V);
          const Pack<T, V> ph = load_pack<T, V>(sh + j * V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] = v[k] * (1.f + to_f32(ps.v[k])) + to_f32(ph.v[k]);
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
          for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(to_f32(p.v[k]) * rstd * to_f32(pw.v[k]));
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(to_f32(p.v[k]) * rstd);
        }
        store_pack<T, V>(yr + j * V, out);
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1)
softmax_kernel(const T* __restrict__ x, T* __restrict__ y, RowLayout L, int64_t d, int width) {
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
        for (int k = 0; k < V; ++k) m = fmaxf(m, to_f32(p.v[k]));
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
        for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(expf(to_f32(p.v[k]) - m) * inv);
        store_pack<T, V>(yr + j * V, out);
      }
    }
  }
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
// elements at (n*G + g) * L. Each group is cut into `chunks` pieces of `chunk` elements (a multiple of 8).
// Pass 1 writes (mean, M2) of each piece to ws [N*G, chunks, 2]; pass 2 merges them (Chan et al.) and normalizes.
template <typename T, int V>
__global__ void __launch_bounds__(512, 1)
group_norm_stats_kernel(const T* __restrict__ x, float* __restrict__ ws, int64_t L, int64_t chunk, int chunks) {
  __shared__ float smem[32];
  const int64_t ng = blockIdx.y, c0 = int64_t(blockIdx.x) * chunk;
  const int64_t n = c0 < L ? (L - c0 < chunk ? L - c0 : chunk) : 0;
  const T* xc = x + ng * L + c0;
  const int width = blockDim.x;
  const int64_t nvec = n / V;
  const float mean = row_reduce<false>(
      row_accumulate<T, V>(xc, true, nvec, threadIdx.x, width, [](float v) { return v; }), width, smem) /
      static_cast<float>(n > 0 ? n : 1);
  const float m2 = row_reduce<false>(
      row_accumulate<T, V>(xc, true, nvec, threadIdx.x, width, [mean](float v) { return (v - mean) * (v - mean); }),
      width, smem);
  if (threadIdx.x == 0) {
    ws[(ng * chunks + blockIdx.x) * 2] = mean;
    ws[(ng * chunks + blockIdx.x) * 2 + 1] = m2;
  }
}

template <typename T, int V, bool kSilu>
__global__ void __launch_bounds__(512, 1)
group_norm_apply_kernel(const T* __restrict__ x, const float* __restrict__ ws, const T* __restrict__ w,
                        const T* __restrict__ b, T* __restrict__ y, int64_t L, int64_t HW, int64_t Cg, int G,
                        int64_t chunk, int chunks, float eps) {
  __shared__ float smem[32];
  const int64_t ng = blockIdx.y;
  const float* st = ws + ng * chunks * 2;
  // Merge the pieces' statistics: mean = sum(n_k m_k) / L, M2 = sum(M2_k + n_k (m_k - mean)^2).
  float acc = 0.f;
  for (int k = threadIdx.x; k < chunks; k += blockDim.x) {
    const int64_t c0 = int64_t(k) * chunk;
    const float nk = c0 < L ? static_cast<float>(L - c0 < chunk ? L - c0 : chunk) : 0.f;
    acc += nk * st[2 * k];
  }
  const float mean = row_reduce<false>(acc, blockDim.x, smem) / static_cast<float>(L);
  acc = 0.f;
  for (int k = threadIdx.x; k < chunks; k += blockDim.x) {
    const int64_t c0 = int64_t(k) * chunk;
    const float nk = c0 < L ? static_cast<float>(L - c0 < chunk ? L - c0 : chunk) : 0.f;
    const float dm = st[2 * k] - mean;
    acc += nk > 0.f ? st[2 * k + 1] + nk * dm * dm : 0.f;
  }
  const float var = row_reduce<false>(acc, blockDim.x, smem) / static_cast<float>(L);
  const float rstd = rsqrtf(var + eps);

  const int64_t c0 = int64_t(blockIdx.x) * chunk;
  if (c0 >= L) return;
  const int64_t n = L - c0 < chunk ? L - c0 : chunk;
  const int64_t ch0 = (ng % G) * Cg;  // first channel of the group
  const T* xc = x + ng * L + c0;
  T* yc = y + ng * L + c0;
  const bool small = L <= INT32_MAX;
  for (int64_t j = int64_t(threadIdx.x) * V; j < n; j += int64_t(blockDim.x) * V) {
    const int64_t pos = c0 + j;
    const int64_t ch = ch0 + (small ? static_cast<int64_t>(static_cast<uint32_t>(pos) / static_cast<uint32_t>(HW))
                                    : pos / HW);
    // V divides HW on the vector path, so a pack never straddles two channels.
    const float a = rstd * (w ? to_f32(w[ch]) : 1.f);
    const float c = (b ? to_f32(b[ch]) : 0.f) - mean * a;
    const Pack<T, V> p = load_pack<T, V>(xc + j);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float v = to_f32(p.v[k]) * a + c;
      if (kSilu) v = silu(v);
      out.v[k] = from_f32<T>(v);
    }
    store_pack<T, V>(yc + j, out);
  }
}

template <typename T, int V>
int launch_group_norm(const void* x, const void* w, const void* b, void* y, float* ws, int64_t N, int64_t C,
                      int64_t HW, int G, int chunks, float eps, bool silu_act, cudaStream_t s) {
  const int64_t Cg = C / G, L = Cg * HW;
  const int64_t chunk = ceil_div(ceil_div(L, chunks), 8) * 8;
  const dim3 grid(chunks, static_cast<unsigned>(N * G));
  const int64_t nvec = ceil_div(chunk, V);
  int threads = static_cast<int>(ceil_div(ceil_div(nvec, 4), 32) * 32);
  threads = threads < 64 ? 64 : (threads > 512 ? 512 : threads);
  const T* xt = static_cast<const T*>(x);
  group_norm_stats_kernel<T, V><<<grid, threads, 0, s>>>(xt, ws, L, chunk, chunks);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(b);
  T* yt = static_cast<T*>(y);
  if (silu_act)
    group_norm_apply_kernel<T, V, true><<<grid, threads, 0, s>>>(xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, chunks,
                                                                 eps);
  else
    group_norm_apply_kernel<T, V, false><<<grid, threads, 0, s>>>(xt, ws, wt, bt, yt, L, HW, Cg, G, chunk, chunks,
                                                                  eps);
  return launch_status();
}

}  // namespace
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
    if (vec)
      layer_norm_kernel<T, V><<<l.blocks, l.threads, 0, stream>>>(xt, wt, bt, nullptr, nullptr, 0, 0,
                                                                  static_cast<T*>(y), L, d, eps, l.width);
    else
      layer_norm_kernel<T, 1><<<l.blocks, l.threads, 0, stream>>>(xt, wt, bt, nullptr, nullptr, 0, 0,
                                                                  static_cast<T*>(y), L, d, eps, l.width);
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
    if (vec)
      layer_norm_kernel<T, V><<<l.blocks, l.threads, 0, stream>>>(xt, nullptr, nullptr, sh, sc, mod_sb, mod_ss,
                                                                  static_cast<T*>(y), L, d, eps, l.width);
    else
      layer_norm_kernel<T, 1><<<l.blocks, l.threads, 0, stream>>>(xt, nullptr, nullptr, sh, sc, mod_sb, mod_ss,
                                                                  static_cast<T*>(y), L, d, eps, l.width);
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
    if (vec)
      rms_norm_kernel<T, V><<<l.blocks, l.threads, 0, stream>>>(xt, wt, static_cast<T*>(y), L, d, eps, l.width);
    else
      rms_norm_kernel<T, 1><<<l.blocks, l.threads, 0, stream>>>(xt, wt, static_cast<T*>(y), L, d, eps, l.width);
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
    if (vec)
      softmax_kernel<T, V><<<l.blocks, l.threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), L, d,
                                                               l.width);
    else
      softmax_kernel<T, 1><<<l.blocks, l.threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), L, d,
                                                               l.width);
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
