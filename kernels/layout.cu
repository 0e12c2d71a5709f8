// Copies and layout: strided copy (contiguous / permute / concat), dtype casts (f32, f16, bf16, fp8 e4m3fn/e5m2),
// embedding lookup, nearest 2x upsampling. Copies move raw bytes, so they serve every dtype.
#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

constexpr int kMaxDims = 8;

// ------------------------------------------------------------------------------------------- strided copy
struct CopyDims {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t ss[kMaxDims];  // source strides (elements of E)
  int64_t ds[kMaxDims];  // destination strides
};

// dst[idx(i)] = src[idx(i)] for every multi-index i of shape; E: a plain type of the element's size.
template <typename E, typename I>
__global__ void copy_strided_kernel(const E* __restrict__ src, E* __restrict__ dst, I n, CopyDims d) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    I rest = e, so = 0, doff = 0;
    for (int k = d.ndim - 1; k > 0; --k) {
      const I ext = static_cast<I>(d.shape[k]);
      const I c = rest % ext;
      rest /= ext;
      so += c * static_cast<I>(d.ss[k]);
      doff += c * static_cast<I>(d.ds[k]);
    }
    so += rest * static_cast<I>(d.ss[0]);
    doff += rest * static_cast<I>(d.ds[0]);
    dst[doff] = src[so];
  }
}

template <typename E>
int launch_copy(const void* src, void* dst, int64_t n, const CopyDims& d, cudaStream_t s) {
  const int threads = 256;
  // 32-bit index math is much cheaper; use it when every offset fits.
  int64_t max_off_s = 0, max_off_d = 0;
  for (int k = 0; k < d.ndim; ++k) {
    max_off_s += (d.shape[k] - 1) * (d.ss[k] < 0 ? -d.ss[k] : d.ss[k]);
    max_off_d += (d.shape[k] - 1) * (d.ds[k] < 0 ? -d.ds[k] : d.ds[k]);
  }
  bool neg = false;
  for (int k = 0; k < d.ndim; ++k) neg = neg || d.ss[k] < 0 || d.ds[k] < 0;
  if (!neg && n < INT32_MAX && max_off_s < INT32_MAX && max_off_d < INT32_MAX)
    launch_dependent(copy_strided_kernel<E, uint32_t>, grid_blocks(n, threads), threads, 0, s,
        static_cast<const E*>(src), static_cast<E*>(dst), static_cast<uint32_t>(n), d);
  else
    launch_dependent(copy_strided_kernel<E, int64_t>, grid_blocks(n, threads), threads, 0, s,
        static_cast<const E*>(src), static_cast<E*>(dst), n, d);
  return launch_status();
}

// Copies whose source and destination are contiguous along different dims (a transpose, e.g. NCHW <-> NHWC):
// 32x32 tiles through shared memory, so both the reads (along dim a, contiguous in src) and the writes (along dim
// b, contiguous in dst) are coalesced. The other dims are a batch of tiles.
struct TileDims {
  int nb;  // batch dims
  int64_t shape[kMaxDims], ss[kMaxDims], ds[kMaxDims];
  int64_t na, nbt;   // extents of dims a and b
  int64_t a_ds;      // dst stride of a (its src stride is 1)
  int64_t b_ss;      // src stride of b (its dst stride is 1)
};

constexpr int kTile = 32, kTileRows = 8;

template <typename E>
__global__ void __launch_bounds__(kTile * kTileRows, 4)
transpose_kernel(const E* __restrict__ src, E* __restrict__ dst, TileDims t, int64_t tiles_a, int64_t tiles_b,
                 int64_t tiles) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ E tile[kTile][kTile + 1];  // tile[b - b0][a - a0]; the pad spreads columns over banks
  for (int64_t id = blockIdx.x; id < tiles; id += gridDim.x) {
    const int64_t tb = id % tiles_b, rest = id / tiles_b;
    const int64_t ta = rest % tiles_a;
    int64_t bi = rest / tiles_a, so = 0, doff = 0;
    for (int k = t.nb - 1; k >= 0; --k) {
      const int64_t c = bi % t.shape[k];
      bi /= t.shape[k];
      so += c * t.ss[k];
      doff += c * t.ds[k];
    }
    const int64_t a0 = ta * kTile, b0 = tb * kTile;
    for (int i = threadIdx.y; i < kTile; i += kTileRows) {
      const int64_t a = a0 + threadIdx.x, b = b0 + i;
      if (a < t.na && b < t.nbt) tile[i][threadIdx.x] = src[so + a + b * t.b_ss];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < kTile; i += kTileRows) {
      const int64_t a = a0 + i, b = b0 + threadIdx.x;
      if (a < t.na && b < t.nbt) dst[doff + a * t.a_ds + b] = tile[threadIdx.x][i];
    }
    __syncthreads();  // the next tile overwrites `tile`
  }
}

// Dims (a, b) for the tiled transpose: b = innermost dim (dst stride 1, src stride not 1), a = a dim with src
// stride 1; both at least 16 long. False when the copy is not such a transpose.
bool as_transpose(const CopyDims& d, TileDims& t) {
  const int b = d.ndim - 1;
  if (d.ndim < 2 || d.ds[b] != 1 || d.ss[b] == 1 || d.shape[b] < 16) return false;
  int a = -1;
  for (int k = 0; k < b; ++k)
    if (d.ss[k] == 1 && d.shape[k] >= 16) a = k;
  if (a < 0) return false;
  t.nb = 0;
  for (int k = 0; k < b; ++k) {
    if (k == a) continue;
    t.shape[t.nb] = d.shape[k];
    t.ss[t.nb] = d.ss[k];
    t.ds[t.nb] = d.ds[k];
    ++t.nb;
  }
  t.na = d.shape[a];
  t.nbt = d.shape[b];
  t.a_ds = d.ds[a];
  t.b_ss = d.ss[b];
  return true;
}

template <typename E>
int launch_transpose(const void* src, void* dst, const TileDims& t, cudaStream_t s) {
  int64_t batch = 1;
  for (int k = 0; k < t.nb; ++k) batch *= t.shape[k];
  const int64_t tiles_a = ceil_div(t.na, kTile), tiles_b = ceil_div(t.nbt, kTile);
  const int64_t tiles = tiles_a * tiles_b * batch;
  launch_dependent(transpose_kernel<E>, grid_blocks(tiles, 1), dim3(kTile, kTileRows), 0, s,
      static_cast<const E*>(src), static_cast<E*>(dst), t, tiles_a, tiles_b, tiles);
  return launch_status();
}

template <typename E>
int copy_dispatch(const void* src, void* dst, int64_t n, const CopyDims& d, cudaStream_t s) {
  TileDims t;
  if (as_transpose(d, t)) return launch_transpose<E>(src, dst, t, s);
  return launch_copy<E>(src, dst, n, d, s);
}

// Moves the innermost dim in wider units when both sides are contiguous there and everything stays aligned:
// e.g. 8 bf16 as one 16-byte element.
void widen(CopyDims& d, int64_t& esize, const void* src, const void* dst) {
  const int k = d.ndim - 1;
  if (d.ss[k] != 1 || d.ds[k] != 1) return;
  for (int64_t w = 16; w > esize; w >>= 1) {
    const int64_t f = w / esize;
    if (w % esize != 0 || d.shape[k] % f != 0) continue;
    if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % w != 0) continue;
    bool ok = true;
    for (int j = 0; j < k; ++j) ok = ok && d.ss[j] % f == 0 && d.ds[j] % f == 0;
    if (!ok) continue;
    d.shape[k] /= f;
    for (int j = 0; j < k; ++j) d.ss[j] /= f, d.ds[j] /= f;
    esize = w;
    return;
  }
}

// ------------------------------------------------------------------------------------------------- casts
struct F8E4M3 { uint8_t bits; };
struct F8E5M2 { uint8_t bits; };

// float -> fp8 with round to nearest even, not saturating (as ml_dtypes / torch): e4m3fn has no infinity, so
// anything that rounds past 448 (and inf, nan) becomes nan; e5m2 overflows to inf.
__device__ __forceinline__ uint8_t f32_to_e4m3(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | 0x7f;  // inf, nan
  if (a < 0x3c800000u) {                     // below 2^-6: subnormal, step 2^-9 (rintf rounds half to even)
    return sign | static_cast<uint8_t>(rintf(__uint_as_float(a) * 512.f));
  }
  // Keep 3 of 23 mantissa bits, ties to even, then rebias the exponent 127 -> 7.
  const uint32_t r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  const uint32_t code = r - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(code > 0x7eu ? 0x7fu : code);
}

__device__ __forceinline__ uint8_t f32_to_e5m2(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e;  // nan
  if (a == 0x7f800000u) return sign | 0x7c;  // inf
  if (a < 0x38800000u) {                     // below 2^-14: subnormal, step 2^-16
    return sign | static_cast<uint8_t>(rintf(__uint_as_float(a) * 65536.f));
  }
  const uint32_t r = (a + 0xfffffu + ((a >> 21) & 1u)) >> 21;
  const uint32_t code = r - ((127u - 15u) << 2);
  return sign | static_cast<uint8_t>(code >= 0x7cu ? 0x7cu : code);
}

__device__ __forceinline__ float e4m3_to_f32(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80) << 24;
  const uint32_t e = (c >> 3) & 0xf, m = c & 7;
  if (e == 0xf && m == 7) return __uint_as_float(sign | 0x7fc00000u);
  if (e == 0) return __uint_as_float(sign | __float_as_uint(static_cast<float>(m) * 0.001953125f));
  return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

// e5m2 is the top byte of an IEEE half.
__device__ __forceinline__ float e5m2_to_f32(uint8_t c) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(c) << 8));
}

template <typename T> __device__ __forceinline__ float load_f32(T v) { return to_f32<T>(v); }
template <> __device__ __forceinline__ float load_f32<F8E4M3>(F8E4M3 v) { return e4m3_to_f32(v.bits); }
template <> __device__ __forceinline__ float load_f32<F8E5M2>(F8E5M2 v) { return e5m2_to_f32(v.bits); }

template <typename T> __device__ __forceinline__ T store_f32(float v) { return from_f32<T>(v); }
template <> __device__ __forceinline__ F8E4M3 store_f32<F8E4M3>(float v) { return F8E4M3{f32_to_e4m3(v)}; }
template <> __device__ __forceinline__ F8E5M2 store_f32<F8E5M2>(float v) { return F8E5M2{f32_to_e5m2(v)}; }

// Each source value is exact in float32, so going through float32 rounds once (as ml_dtypes' astype does).
template <typename S, typename D, int V>
__global__ void cast_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t nvec = n / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const Pack<S, V> p = load_pack<S, V>(src + i * V);
    Pack<D, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = store_f32<D>(load_f32<S>(p.v[k]));
    store_pack<D, V>(dst + i * V, o);
  }
  for (int64_t i = nvec * V + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = store_f32<D>(load_f32<S>(src[i]));
}

template <typename S, typename D>
int launch_cast(const void* src, void* dst, int64_t n, cudaStream_t s) {
  constexpr int V = 8;  // 8 elements: 16 bytes of the 2-byte side
  const int threads = 256;
  const bool vec = reinterpret_cast<uintptr_t>(src) % (V * sizeof(S)) == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % (V * sizeof(D)) == 0;
  if (vec)
    launch_dependent(cast_kernel<S, D, V>, grid_blocks(ceil_div(n, V), threads), threads, 0, s,
        static_cast<const S*>(src), static_cast<D*>(dst), n);
  else
    launch_dependent(cast_kernel<S, D, 1>, grid_blocks(n, threads), threads, 0, s,
        static_cast<const S*>(src), static_cast<D*>(dst), n);
  return launch_status();
}

template <typename S>
int cast_to(const void* src, void* dst, int dst_dtype, int64_t n, cudaStream_t s) {
  switch (dst_dtype) {
    case FDM_F32: return launch_cast<S, float>(src, dst, n, s);
    case FDM_F16: return launch_cast<S, __half>(src, dst, n, s);
    case FDM_BF16: return launch_cast<S, __nv_bfloat16>(src, dst, n, s);
    case FDM_F8E4M3: return launch_cast<S, F8E4M3>(src, dst, n, s);
    case FDM_F8E5M2: return launch_cast<S, F8E5M2>(src, dst, n, s);
    default: return arg_error("fdm_cast: unsupported destination dtype code %d", dst_dtype);
  }
}

// ------------------------------------------------------------------------------------------------ embedding
// out[t, :] = table[ids[t], :]; an id outside [0, V) gives a row of NaN (the kernel cannot raise).
template <typename T, typename Id, int P>
__global__ void embedding_kernel(const Id* __restrict__ ids, const T* __restrict__ table, T* __restrict__ out,
                                 int64_t n_ids, int64_t vocab, int64_t d) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t nvec = d / P;
  for (int64_t t = blockIdx.x; t < n_ids; t += gridDim.x) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    T* o = out + t * d;
    if (id < 0 || id >= vocab) {
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = from_f32<T>(NAN);
      continue;
    }
    const T* row = table + id * d;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
      store_pack<T, P>(o + j * P, load_pack<T, P>(row + j * P));
  }
}

template <typename T, typename Id>
int launch_embedding(const void* ids, const void* table, void* out, int64_t n_ids, int64_t vocab, int64_t d,
                     cudaStream_t s) {
  constexpr int V = vec16<T>();
  auto i = static_cast<const Id*>(ids);
  auto tb = static_cast<const T*>(table);
  auto o = static_cast<T*>(out);
  if (d % V == 0 && aligned16(table) && aligned16(out))
    launch_dependent(embedding_kernel<T, Id, V>, grid_blocks(n_ids, 1), row_block_threads(d / V), 0, s,
        i, tb, o, n_ids, vocab, d);
  else
    launch_dependent(embedding_kernel<T, Id, 1>, grid_blocks(n_ids, 1), row_block_threads(d), 0, s,
        i, tb, o, n_ids, vocab, d);
  return launch_status();
}

// ------------------------------------------------------------------------------------- nearest 2x upsample
// x: rows of w elements (rows = N*C*H) -> y: rows of 2w, input row r feeding output rows 2r and 2r + 1.
template <typename E, int P>
__global__ void upsample2x_kernel(const E* __restrict__ x, E* __restrict__ y, int64_t rows, int64_t w) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t per_row = w / P, n = rows * per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / per_row, c = (i - r * per_row) * P;
    const Pack<E, P> p = load_pack<E, P>(x + r * w + c);
    Pack<E, 2 * P> o;
#pragma unroll
    for (int k = 0; k < P; ++k) o.v[2 * k] = p.v[k], o.v[2 * k + 1] = p.v[k];
    E* y0 = y + 2 * r * 2 * w + 2 * c;
    store_pack<E, 2 * P>(y0, o);
    store_pack<E, 2 * P>(y0 + 2 * w, o);
  }
}

template <typename E>
int launch_upsample(const void* x, void* y, int64_t rows, int64_t w, cudaStream_t s) {
  const int threads = 256;
  constexpr int P = 16 / sizeof(E) / 2 > 0 ? 16 / sizeof(E) / 2 : 1;  // 2P outputs = 16 bytes
  auto xe = static_cast<const E*>(x);
  auto ye = static_cast<E*>(y);
  if (w % P == 0 && reinterpret_cast<uintptr_t>(x) % (P * sizeof(E)) == 0 && aligned16(y))
    launch_dependent(upsample2x_kernel<E, P>, grid_blocks(rows * (w / P), threads), threads, 0, s, xe, ye, rows, w);
  else
    launch_dependent(upsample2x_kernel<E, 1>, grid_blocks(rows * w, threads), threads, 0, s, xe, ye, rows, w);
  return launch_status();
}

}  // namespace
}  // namespace fdm

using namespace fdm;

// dst[i] = src[i] over every multi-index i of shape[0..ndim) (ndim in [1, 8]); src/dst strides in elements of
// elem_size bytes (1, 2, 4, 8 or 16). Any dtype; the caller merges dims where it can.
FDM_API int fdm_copy_strided(const void* src, void* dst, int ndim, const int64_t* shape, const int64_t* src_strides,
                             const int64_t* dst_strides, int64_t elem_size, cudaStream_t stream) {
  if (ndim < 1 || ndim > kMaxDims) return arg_error("fdm_copy_strided: ndim %d not in [1, %d]", ndim, kMaxDims);
  CopyDims d{};
  d.ndim = ndim;
  int64_t n = 1;
  for (int k = 0; k < ndim; ++k) {
    if (shape[k] < 0) return arg_error("fdm_copy_strided: negative extent %lld", (long long)shape[k]);
    d.shape[k] = shape[k];
    d.ss[k] = src_strides[k];
    d.ds[k] = dst_strides[k];
    n *= shape[k];
  }
  if (n == 0) return 0;
  widen(d, elem_size, src, dst);
  n = 1;
  for (int k = 0; k < ndim; ++k) n *= d.shape[k];
  switch (elem_size) {
    case 1: return copy_dispatch<uint8_t>(src, dst, n, d, stream);
    case 2: return copy_dispatch<uint16_t>(src, dst, n, d, stream);
    case 4: return copy_dispatch<uint32_t>(src, dst, n, d, stream);
    case 8: return copy_dispatch<uint2>(src, dst, n, d, stream);
    case 16: return copy_dispatch<uint4>(src, dst, n, d, stream);
    default: return arg_error("fdm_copy_strided: element size %lld not in {1, 2, 4, 8, 16}", (long long)elem_size);
  }
}

// dst = src converted between f32, f16, bf16, fp8 e4m3fn and fp8 e5m2 (codes of FdmDtype) over n contiguous
// elements: round to nearest even; fp8 does not saturate (e4m3fn overflow -> nan, e5m2 overflow -> inf).
FDM_API int fdm_cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n, cudaStream_t stream) {
  if (n < 0) return arg_error("fdm_cast: negative size %lld", (long long)n);
  if (n == 0) return 0;
  switch (src_dtype) {
    case FDM_F32: return cast_to<float>(src, dst, dst_dtype, n, stream);
    case FDM_F16: return cast_to<__half>(src, dst, dst_dtype, n, stream);
    case FDM_BF16: return cast_to<__nv_bfloat16>(src, dst, dst_dtype, n, stream);
    case FDM_F8E4M3: return cast_to<F8E4M3>(src, dst, dst_dtype, n, stream);
    case FDM_F8E5M2: return cast_to<F8E5M2>(src, dst, dst_dtype, n, stream);
    default: return arg_error("fdm_cast: unsupported source dtype code %d", src_dtype);
  }
}

// out [n_ids, d] = table [vocab, d] rows picked by ids (int32 or int64 codes); table f32/f16/bf16.
FDM_API int fdm_embedding(const void* ids, int ids_dtype, const void* table, void* out, int64_t n_ids, int64_t vocab,
                          int64_t d, int dtype, cudaStream_t stream) {
  if (n_ids < 0 || vocab < 0 || d < 0) return arg_error("fdm_embedding: negative size");
  if (ids_dtype != FDM_I32 && ids_dtype != FDM_I64)
    return arg_error("fdm_embedding: ids dtype code %d is not int32 or int64", ids_dtype);
  if (n_ids == 0 || d == 0) return 0;
  FDM_DISPATCH_FLOAT(dtype, {
    return ids_dtype == FDM_I32 ? launch_embedding<scalar_t, int32_t>(ids, table, out, n_ids, vocab, d, stream)
                                : launch_embedding<scalar_t, int64_t>(ids, table, out, n_ids, vocab, d, stream);
  });
  return 0;
}

// Nearest 2x upsampling of x [rows, w] (rows = N*C*H, contiguous) into y [2 rows, 2w]; elem_size 1, 2 or 4 bytes.
FDM_API int fdm_upsample_nearest2x(const void* x, void* y, int64_t rows, int64_t w, int64_t elem_size,
                                   cudaStream_t stream) {
  if (rows < 0 || w < 0) return arg_error("fdm_upsample_nearest2x: negative size");
  if (rows == 0 || w == 0) return 0;
  switch (elem_size) {
    case 1: return launch_upsample<uint8_t>(x, y, rows, w, stream);
    case 2: return launch_upsample<uint16_t>(x, y, rows, w, stream);
    case 4: return launch_upsample<uint32_t>(x, y, rows, w, stream);
    default: return arg_error("fdm_upsample_nearest2x: element size %lld not in {1, 2, 4}", (long long)elem_size);
  }
}
