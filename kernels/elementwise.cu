// Elementwise kernels: activations, GEGLU, add/mul with broadcasting, adaLN modulation and gated residuals.
// Storage f32/f16/bf16, float32 math, 16-byte vectors where pointers and sizes allow, grid-stride loops.
// Activations on 16-bit storage use the fast forms of vec.cuh (error far below one bf16/fp16 ulp); float32
// storage keeps the libm-accurate ones.
#include <type_traits>

#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

// Activation codes of fdm_activation (mirrored in runtime/ops/cuda/elementwise.py).
enum Act : int { ACT_GELU = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_QUICK_GELU = 3 };

template <int A, typename T>
__device__ __forceinline__ float activate(float x) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (A == ACT_GELU) return gelu_erf(x);
    else if constexpr (A == ACT_GELU_TANH) return gelu_tanh(x);
    else if constexpr (A == ACT_SILU) return silu(x);
    else return quick_gelu(x);
  } else {
    if constexpr (A == ACT_GELU) return gelu_erf_fast(x);
    else if constexpr (A == ACT_GELU_TANH) return gelu_tanh_fast(x);
    else if constexpr (A == ACT_SILU) return silu_fast(x);
    else return quick_gelu_fast(x);
  }
}

// y[i] = act(x[i]); the first n - n % V elements as V-wide packs, the rest one by one.
template <typename T, int V, int A>
__global__ void activation_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t nvec = n / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    Pack<T, V> p = load_pack<T, V>(x + i * V);
#pragma unroll
    for (int k = 0; k < V; ++k) p.v[k] = from_f32<T>(activate<A, T>(to_f32(p.v[k])));
    store_pack<T, V>(y + i * V, p);
  }
  for (int64_t i = nvec * V + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = from_f32<T>(activate<A, T>(to_f32(x[i])));
}

template <typename T, int V, int A>
void launch_activation(const void* x, void* y, int64_t n, cudaStream_t s) {
  const int threads = 256;
  launch_dependent(activation_kernel<T, V, A>, grid_blocks(ceil_div(n, V), threads), threads, 0, s,
      static_cast<const T*>(x), static_cast<T*>(y), n);
}

template <typename T, int V>
int activation_dispatch(const void* x, void* y, int64_t n, int act, cudaStream_t s) {
  switch (act) {
    case ACT_GELU: launch_activation<T, V, ACT_GELU>(x, y, n, s); break;
    case ACT_GELU_TANH: launch_activation<T, V, ACT_GELU_TANH>(x, y, n, s); break;
    case ACT_SILU: launch_activation<T, V, ACT_SILU>(x, y, n, s); break;
    case ACT_QUICK_GELU: launch_activation<T, V, ACT_QUICK_GELU>(x, y, n, s); break;
    default: return arg_error("fdm_activation: unknown activation code %d", act);
  }
  return launch_status();
}

// GEGLU: x [rows, 2n] -> y [rows, n], y = h * gelu(g) with h = x[:, :n], g = x[:, n:].
// Flat over the output's packs (y is contiguous): pack i is row r = i / nvec, column pack j = i % nvec. A persistent
// grid (kGegluBlocksPerSm blocks per SM) strides over the packs, U at a time per thread, and loads the next step's
// 2U packs before doing the current step's math and stores, so every warp keeps loads in flight through its own
// compute (ncu: the load-all / compute-all / store-all form left DRAM at 47-52% busy). Inputs and output are
// touched once (streaming hints). I: uint32_t when every element offset fits, else int64_t.
constexpr int kGegluThreads = 256, kGegluPacks = 2, kGegluBlocksPerSm = 4;

template <typename T, int V, typename I>
__device__ __forceinline__ void geglu_load(const T* __restrict__ x, I base, I n, I nvec, I total, Pack<T, V>* h,
                                           Pack<T, V>* g) {
#pragma unroll
  for (int u = 0; u < kGegluPacks; ++u) {
    const I i = base + static_cast<I>(u * kGegluThreads);
    if (i < total) {
      const I r = i / nvec;
      const T* xh = x + r * (2 * n) + (i - r * nvec) * V;
      h[u] = load_pack_cs<T, V>(xh);
      g[u] = load_pack_cs<T, V>(xh + n);
    }
  }
}

template <typename T, int V, bool kTanh, typename I>
__global__ void __launch_bounds__(kGegluThreads, kGegluBlocksPerSm)
gelu_mul_kernel(const T* __restrict__ x, T* __restrict__ y, I n, I nvec, I total) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  constexpr int U = kGegluPacks;
  const I step = static_cast<I>(gridDim.x) * (kGegluThreads * U);
  I base = static_cast<I>(blockIdx.x) * (kGegluThreads * U) + threadIdx.x;
  Pack<T, V> h[U], g[U];
  geglu_load<T, V, I>(x, base, n, nvec, total, h, g);
  for (; base < total; base += step) {
    Pack<T, V> h_next[U], g_next[U];
    geglu_load<T, V, I>(x, base + step, n, nvec, total, h_next, g_next);  // in flight during the math below
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I i = base + static_cast<I>(u * kGegluThreads);
      if (i < total) {
        Pack<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float gv = to_f32(g[u].v[k]);
          const float act = kTanh ? activate<ACT_GELU_TANH, T>(gv) : activate<ACT_GELU, T>(gv);
          o.v[k] = from_f32<T>(to_f32(h[u].v[k]) * act);
        }
        store_pack_cs<T, V>(y + i * V, o);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) h[u] = h_next[u], g[u] = g_next[u];
  }
}

template <typename T, int V, typename I>
int launch_gelu_mul(const void* x, void* y, int64_t rows, int64_t n, int approx_tanh, cudaStream_t s) {
  const int64_t nvec = n / V, total = rows * nvec;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    sms = 132;
  const int64_t needed = ceil_div(total, int64_t{kGegluThreads} * kGegluPacks);
  const int64_t resident = int64_t{sms} * kGegluBlocksPerSm;
  const unsigned blocks = static_cast<unsigned>(needed < resident ? (needed < 1 ? 1 : needed) : resident);
  auto xt = static_cast<const T*>(x);
  auto yt = static_cast<T*>(y);
  if (approx_tanh)
    launch_dependent(gelu_mul_kernel<T, V, true, I>, blocks, kGegluThreads, 0, s,
        xt, yt, static_cast<I>(n), static_cast<I>(nvec), static_cast<I>(total));
  else
    launch_dependent(gelu_mul_kernel<T, V, false, I>, blocks, kGegluThreads, 0, s,
        xt, yt, static_cast<I>(n), static_cast<I>(nvec), static_cast<I>(total));
  return launch_status();
}

template <typename T, int V>
int gelu_mul_dispatch(const void* x, void* y, int64_t rows, int64_t n, int approx_tanh, cudaStream_t s) {
  // 32-bit index math when the largest offset into x (2 * rows * n elements, plus a step's overshoot of the last
  // base index) stays well inside uint32_t.
  if (rows * 2 * n < (int64_t{1} << 31))
    return launch_gelu_mul<T, V, uint32_t>(x, y, rows, n, approx_tanh, s);
  return launch_gelu_mul<T, V, int64_t>(x, y, rows, n, approx_tanh, s);
}

// ---------------------------------------------------------------------------------- add / mul, broadcasting
constexpr int kMaxDims = 8;
enum BinOp : int { BIN_ADD = 0, BIN_MUL = 1 };

// Shape of the output (= a, contiguous) and the element strides of b over it (0 on broadcast dims).
struct BDims {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t bstride[kMaxDims];
};

__device__ __forceinline__ float binop(float a, float b, int op, float alpha) {
  return op == BIN_ADD ? a + alpha * b : a * b;
}

// Offset into b of output element e (I: index type, 32-bit when everything fits).
template <typename I>
__device__ __forceinline__ I b_offset(I e, const BDims& d) {
  I off = 0;
  for (int k = d.ndim - 1; k > 0; --k) {
    const I ext = static_cast<I>(d.shape[k]);
    off += (e % ext) * static_cast<I>(d.bstride[k]);
    e /= ext;
  }
  return off + e * static_cast<I>(d.bstride[0]);
}

// y = a (op) b, each thread V consecutive elements of the innermost dim (V divides it). b: null -> `scalar`.
// b_vec: b's innermost stride is 1 (load V of b), else 0 (one b value for the pack).
template <typename T, int V, typename I>
__global__ void binary_kernel(const T* __restrict__ a, const T* __restrict__ b, float scalar, T* __restrict__ y,
                              I n, BDims d, int op, float alpha, bool b_vec) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const I nvec = n / V;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const Pack<T, V> pa = load_pack<T, V>(a + i * V);
    float bv[V];
    if (b == nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) bv[k] = scalar;
    } else {
      const I off = b_offset<I>(i * V, d);
      if (b_vec) {
        const Pack<T, V> pb = load_pack<T, V>(b + off);
#pragma unroll
        for (int k = 0; k < V; ++k) bv[k] = to_f32(pb.v[k]);
      } else {
        const float v = to_f32(b[off]);
#pragma unroll
        for (int k = 0; k < V; ++k) bv[k] = v;
      }
    }
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_f32<T>(binop(to_f32(pa.v[k]), bv[k], op, alpha));
    store_pack<T, V>(y + i * V, o);
  }
}

template <typename T, int V, typename I>
void launch_binary(const void* a, const void* b, float scalar, void* y, int64_t n, const BDims& d, int op,
                   float alpha, bool b_vec, cudaStream_t s) {
  const int threads = 256;
  launch_dependent(binary_kernel<T, V, I>, grid_blocks(n / V, threads), threads, 0, s,
      static_cast<const T*>(a), static_cast<const T*>(b), scalar, static_cast<T*>(y), static_cast<I>(n), d, op, alpha,
      b_vec);
}

template <typename T>
int binary_dispatch(const void* a, const void* b, float scalar, void* y, int64_t n, const BDims& d, int op,
                    float alpha, cudaStream_t s) {
  constexpr int V = vec16<T>();
  const int64_t inner = d.shape[d.ndim - 1];
  const int64_t binner = d.bstride[d.ndim - 1];
  bool vec = inner % V == 0 && aligned16(a) && aligned16(y) && (b == nullptr || aligned16(b));
  for (int k = 0; k < d.ndim - 1 && b != nullptr; ++k) vec = vec && d.bstride[k] % V == 0;
  if (b != nullptr) vec = vec && (binner == 0 || binner == 1);
  const bool small = n < (int64_t{1} << 31);
  if (vec) {
    if (small) launch_binary<T, V, uint32_t>(a, b, scalar, y, n, d, op, alpha, binner == 1, s);
    else launch_binary<T, V, int64_t>(a, b, scalar, y, n, d, op, alpha, binner == 1, s);
  } else {
    // One element per thread: b_vec=false reads b[off] for the single element.
    if (small) launch_binary<T, 1, uint32_t>(a, b, scalar, y, n, d, op, alpha, false, s);
    else launch_binary<T, 1, int64_t>(a, b, scalar, y, n, d, op, alpha, false, s);
  }
  return launch_status();
}

// ------------------------------------------------------------------------------------ adaLN modulation
// Per-(batch, token) vectors: element (b, s, j) of v is v[b * sb + s * ss + j] (ss = 0: one vector per batch).
template <typename T>
struct RowVec {
  const T* p;
  int64_t sb, ss;
  __device__ __forceinline__ const T* row(int64_t b, int64_t s) const { return p + b * sb + s * ss; }
};

// modulate: y = x * (1 + scale) + shift.  gated residual: y = x + gate * z.  x, z, y: [B, S, D] contiguous.
template <typename T, int V, bool kGated>
__global__ void rowvec_kernel(const T* __restrict__ x, const T* __restrict__ z, RowVec<T> u, RowVec<T> w,
                              T* __restrict__ y, int64_t B, int64_t S, int64_t D) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t rows = B * S, nvec = D / V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / S, s = r - b * S;
    const T* ur = u.row(b, s);
    const T* wr = kGated ? nullptr : w.row(b, s);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t off = r * D + j * V;
      const Pack<T, V> px = load_pack<T, V>(x + off);
      const Pack<T, V> pu = load_pack<T, V>(ur + j * V);
      Pack<T, V> o;
      if constexpr (kGated) {
        const Pack<T, V> pz = load_pack<T, V>(z + off);
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = from_f32<T>(to_f32(px.v[k]) + to_f32(pu.v[k]) * to_f32(pz.v[k]));
      } else {
        const Pack<T, V> pw = load_pack<T, V>(wr + j * V);  // u = shift, w = scale
#pragma unroll
        for (int k = 0; k < V; ++k)
          o.v[k] = from_f32<T>(to_f32(px.v[k]) * (1.f + to_f32(pw.v[k])) + to_f32(pu.v[k]));
      }
      store_pack<T, V>(y + off, o);
    }
  }
}

template <typename T, bool kGated>
int launch_rowvec(const void* x, const void* z, RowVec<T> u, RowVec<T> w, void* y, int64_t B, int64_t S,
                  int64_t D, cudaStream_t s) {
  constexpr int V = vec16<T>();
  bool vec = D % V == 0 && aligned16(x) && aligned16(y) && aligned16(u.p) && u.sb % V == 0 && u.ss % V == 0;
  if (kGated) vec = vec && aligned16(z);
  else vec = vec && aligned16(w.p) && w.sb % V == 0 && w.ss % V == 0;
  const unsigned blocks = grid_blocks(B * S, 1);
  const T* xt = static_cast<const T*>(x);
  const T* zt = static_cast<const T*>(z);
  T* yt = static_cast<T*>(y);
  if (vec)
    launch_dependent(rowvec_kernel<T, V, kGated>, blocks, row_block_threads(D / V), 0, s, xt, zt, u, w, yt, B, S, D);
  else
    launch_dependent(rowvec_kernel<T, 1, kGated>, blocks, row_block_threads(D), 0, s, xt, zt, u, w, yt, B, S, D);
  return launch_status();
}

}  // namespace
}  // namespace fdm

using namespace fdm;

// y = act(x) over n contiguous elements; act: 0 gelu (erf), 1 gelu (tanh), 2 silu, 3 quick_gelu.
FDM_API int fdm_activation(const void* x, void* y, int64_t n, int act, int dtype, cudaStream_t stream) {
  if (n < 0) return arg_error("fdm_activation: negative size %lld", (long long)n);
  if (n == 0) return 0;
  const bool vec = aligned16(x) && aligned16(y);
  FDM_DISPATCH_FLOAT(dtype, {
    return vec ? activation_dispatch<scalar_t, vec16<scalar_t>()>(x, y, n, act, stream)
               : activation_dispatch<scalar_t, 1>(x, y, n, act, stream);
  });
  return 0;
}

// GEGLU: x [rows, 2n] contiguous -> y [rows, n] = x[:, :n] * gelu(x[:, n:]).
FDM_API int fdm_gelu_mul(const void* x, void* y, int64_t rows, int64_t n, int approx_tanh, int dtype,
                         cudaStream_t stream) {
  if (rows < 0 || n < 0) return arg_error("fdm_gelu_mul: negative size (rows=%lld, n=%lld)", (long long)rows,
                                          (long long)n);
  if (rows == 0 || n == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    constexpr int V = vec16<scalar_t>();
    if (n % V == 0 && aligned16(x) && aligned16(y))
      return gelu_mul_dispatch<scalar_t, V>(x, y, rows, n, approx_tanh, stream);
    return gelu_mul_dispatch<scalar_t, 1>(x, y, rows, n, approx_tanh, stream);
  });
  return 0;
}

// y = a + alpha * b (op 0) or a * b (op 1). a, y: contiguous with shape[0..ndim); b: strides bstride over that
// shape (0 on broadcast dims), or null to use `scalar` for every element. ndim in [1, 8].
FDM_API int fdm_binary(const void* a, const void* b, float scalar, void* y, int op, float alpha, int ndim,
                       const int64_t* shape, const int64_t* bstride, int dtype, cudaStream_t stream) {
  if (ndim < 1 || ndim > kMaxDims) return arg_error("fdm_binary: ndim %d not in [1, %d]", ndim, kMaxDims);
  if (op != BIN_ADD && op != BIN_MUL) return arg_error("fdm_binary: unknown op %d", op);
  BDims d{};
  d.ndim = ndim;
  int64_t n = 1;
  for (int k = 0; k < ndim; ++k) {
    if (shape[k] < 0) return arg_error("fdm_binary: negative extent %lld", (long long)shape[k]);
    d.shape[k] = shape[k];
    d.bstride[k] = b ? bstride[k] : 0;
    n *= shape[k];
  }
  if (n == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, return binary_dispatch<scalar_t>(a, b, scalar, y, n, d, op, alpha, stream));
  return 0;
}

// y = x * (1 + scale) + shift. x, y: [B, S, D] contiguous; shift/scale element (b, s, j) at
// b * s?_b + s * s?_s + j (s?_s = 0 for one vector per batch, e.g. a [B, D] chunk of a [B, 6D] buffer).
FDM_API int fdm_modulate(const void* x, const void* shift, int64_t shift_sb, int64_t shift_ss, const void* scale,
                         int64_t scale_sb, int64_t scale_ss, void* y, int64_t B, int64_t S, int64_t D, int dtype,
                         cudaStream_t stream) {
  if (B < 0 || S < 0 || D < 0) return arg_error("fdm_modulate: negative size");
  if (B * S * D == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    return launch_rowvec<T, false>(x, nullptr, RowVec<T>{static_cast<const T*>(shift), shift_sb, shift_ss},
                                   RowVec<T>{static_cast<const T*>(scale), scale_sb, scale_ss}, y, B, S, D, stream);
  });
  return 0;
}

// y = x + gate * z. x, z, y: [B, S, D] contiguous; gate element (b, s, j) at b * gate_sb + s * gate_ss + j.
FDM_API int fdm_gated_residual(const void* x, const void* gate, int64_t gate_sb, int64_t gate_ss, const void* z,
                               void* y, int64_t B, int64_t S, int64_t D, int dtype, cudaStream_t stream) {
  if (B < 0 || S < 0 || D < 0) return arg_error("fdm_gated_residual: negative size");
  if (B * S * D == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    return launch_rowvec<T, true>(x, z, RowVec<T>{static_cast<const T*>(gate), gate_sb, gate_ss},
                                  RowVec<T>{nullptr, 0, 0}, y, B, S, D, stream);
  });
  return 0;
}
