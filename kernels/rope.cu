// Rotary position embedding on x [B, S, H, D] with arbitrary strides over B, S, H (last dim contiguous), so it
// can run in place on the q/k heads of a fused QKV buffer. cos, sin: float32 [S, D/2], frequency i of position s.
// Pair i is (x[2i], x[2i+1]) when interleaved (FLUX, Qwen-Image), else (x[i], x[i + D/2]) (rotate-half);
// (a, b) -> (a cos - b sin, b cos + a sin), float32 math.
//
// fdm_qk_norm_rope fuses the attention preamble of FLUX-style blocks on the fused QKV projection output
// [B, S, 3, H, D]: RMSNorm over D of the q and k heads (each with its weight), then RoPE, v copied through, all in
// one pass (one read and one write of every element).
#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

struct Strides3 {
  int64_t b, s, h;
};

// P: pairs per work item. P > 1 moves them as aligned packs (16 bytes of x per load); P == 1 element by element.
template <typename T, int P, bool kInter>
__global__ void rope_kernel(const T* x, T* y, const float* __restrict__ cos, const float* __restrict__ sin,
                            int64_t B, int64_t S, int H, int64_t D, Strides3 xs, Strides3 ys) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t half = D / 2;
  const int per_head = static_cast<int>(half / P);
  const int items = H * per_head;
  for (int64_t tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
    const int64_t b = tok / S, s = tok - b * S;
    const float* cr = cos + s * half;
    const float* sr = sin + s * half;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int h = it / per_head;
      const int64_t i0 = int64_t(it - h * per_head) * P;  // first pair of this item
      const T* xp = x + b * xs.b + s * xs.s + h * xs.h;
      T* yp = y + b * ys.b + s * ys.s + h * ys.h;
      float ea[P], eb[P];
      if constexpr (kInter) {
        if constexpr (P > 1) {
          const Pack<T, 2 * P> p = load_pack<T, 2 * P>(xp + 2 * i0);
#pragma unroll
          for (int k = 0; k < P; ++k) ea[k] = to_f32(p.v[2 * k]), eb[k] = to_f32(p.v[2 * k + 1]);
        } else {
          ea[0] = to_f32(xp[2 * i0]);
          eb[0] = to_f32(xp[2 * i0 + 1]);
        }
      } else {
        const Pack<T, P> pa = load_pack<T, P>(xp + i0);
        const Pack<T, P> pb = load_pack<T, P>(xp + half + i0);
#pragma unroll
        for (int k = 0; k < P; ++k) ea[k] = to_f32(pa.v[k]), eb[k] = to_f32(pb.v[k]);
      }
      float ra[P], rb[P];
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const float c = cr[i0 + k], sn = sr[i0 + k];
        ra[k] = ea[k] * c - eb[k] * sn;
        rb[k] = eb[k] * c + ea[k] * sn;
      }
      if constexpr (kInter) {
        if constexpr (P > 1) {
          Pack<T, 2 * P> o;
#pragma unroll
          for (int k = 0; k < P; ++k) o.v[2 * k] = from_f32<T>(ra[k]), o.v[2 * k + 1] = from_f32<T>(rb[k]);
          store_pack<T, 2 * P>(yp + 2 * i0, o);
        } else {
          yp[2 * i0] = from_f32<T>(ra[0]);
          yp[2 * i0 + 1] = from_f32<T>(rb[0]);
        }
      } else {
        Pack<T, P> oa, ob;
#pragma unroll
        for (int k = 0; k < P; ++k) oa.v[k] = from_f32<T>(ra[k]), ob.v[k] = from_f32<T>(rb[k]);
        store_pack<T, P>(yp + i0, oa);
        store_pack<T, P>(yp + half + i0, ob);
      }
    }
  }
}

template <typename T, int P, bool kInter>
int launch_rope(const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t S, int H, int64_t D,
                Strides3 xs, Strides3 ys, cudaStream_t st) {
  const int64_t items = H * (D / 2 / P);
  launch_dependent(rope_kernel<T, P, kInter>, grid_blocks(B * S, 1), row_block_threads(items), 0, st,
      static_cast<const T*>(x), static_cast<T*>(y), cos, sin, B, S, H, D, xs, ys);
  return launch_status();
}

bool strides_multiple(const Strides3& a, int64_t m) { return a.b % m == 0 && a.s % m == 0 && a.h % m == 0; }

// ------------------------------------------------------------------------------- fused QK RMSNorm + RoPE
struct Strides4 {
  int64_t b, s, t, h;  // element strides of the batch, token, q/k/v and head dims
  __device__ __forceinline__ int64_t off(int64_t b_, int64_t s_, int t_, int64_t h_) const {
    return b_ * b + s_ * s + t_ * t + h_ * h;
  }
};

// Rows (b, s, t, h) of the work, h fastest, then t < nt (q, k and, when v is copied, v), s, b: consecutive rows
// share a token, so a block's rows read the same cos/sin row (L1 hits).
struct QkvRows {
  int64_t rows, S, H;
  int nt;
  bool small;  // rows < 2^31: 32-bit index math
  __device__ __forceinline__ void decode(int64_t r, int64_t& b, int64_t& s, int& t, int64_t& h) const {
    if (small) {
      uint32_t u = static_cast<uint32_t>(r);
      const uint32_t hh = static_cast<uint32_t>(H), ss = static_cast<uint32_t>(S), tt = static_cast<uint32_t>(nt);
      h = u % hh;
      u /= hh;
      t = static_cast<int>(u % tt);
      u /= tt;
      s = u % ss;
      b = u / ss;
    } else {
      h = r % H;
      r /= H;
      t = static_cast<int>(r % nt);
      r /= nt;
      s = r % S;
      b = r / S;
    }
  }
};

// N floats from p into f: 16-byte loads when N % 4 == 0, one 8-byte load when N == 2 (p aligned to match).
template <int N>
__device__ __forceinline__ void load_floats(const float* p, float (&f)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const Pack<float, 4> v = load_pack<float, 4>(p + 4 * q);
#pragma unroll
      for (int e = 0; e < 4; ++e) f[4 * q + e] = v.v[e];
    }
  } else {
    static_assert(N == 2, "load_floats takes N = 2 or a multiple of 4");
    const Pack<float, 2> v = load_pack<float, 2>(p);
    f[0] = v.v[0];
    f[1] = v.v[1];
  }
}

// Vector path: a group of `width` lanes (a power of two >= nh, <= 32) per row; lane l < nh holds pack l of the first
// half of the row and pack l + nh of the second (nh = D / 2V), so both rotate-half partners and interleaved pairs
// are in the lane's own registers. y may equal x (in place; v rows are then not visited).
template <typename T, int V, bool kInter>
__global__ void __launch_bounds__(256)
qk_norm_rope_kernel(const T* x, const T* __restrict__ qw, const T* __restrict__ kw, const float* __restrict__ cos,
                    const float* __restrict__ sin, T* y, QkvRows R, Strides4 xs, Strides4 ys, int nh, int width,
                    float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int half = nh * V;  // D / 2
  const float inv_d = 1.f / static_cast<float>(2 * half);
  const int sub = threadIdx.x / width, lane = threadIdx.x - sub * width;
  const int64_t rpb = blockDim.x / width;
  // Every thread runs the same trip count (rows past the end compute nothing) so the shuffles stay convergent.
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < R.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + sub;
    int64_t b = 0, s = 0, h = 0;
    int t = 0;
    if (r < R.rows) R.decode(r, b, s, t, h);
    const bool active = r < R.rows && lane < nh;
    const T* xr = x + xs.off(b, s, t, h);
    Pack<T, V> p0, p1;
    float ss = 0.f;
    if (active) {
      p0 = load_pack_cs<T, V>(xr + lane * V);
      p1 = load_pack_cs<T, V>(xr + half + lane * V);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float a = to_f32(p0.v[e]), c = to_f32(p1.v[e]);
        ss = fmaf(a, a, fmaf(c, c, ss));
      }
    }
    ss = group_sum(ss, width);
    if (!active) continue;
    T* yr = y + ys.off(b, s, t, h);
    if (t == 2) {  // v: copied through
      store_pack_cs<T, V>(yr + lane * V, p0);
      store_pack_cs<T, V>(yr + half + lane * V, p1);
      continue;
    }
    const float rstd = rsqrtf(ss * inv_d + eps);
    float a0[V], a1[V];
#pragma unroll
    for (int e = 0; e < V; ++e) a0[e] = to_f32(p0.v[e]) * rstd, a1[e] = to_f32(p1.v[e]) * rstd;
    const T* w = t == 0 ? qw : kw;
    if (w) {
      const Pack<T, V> w0 = load_pack<T, V>(w + lane * V), w1 = load_pack<T, V>(w + half + lane * V);
#pragma unroll
      for (int e = 0; e < V; ++e) a0[e] *= to_f32(w0.v[e]), a1[e] *= to_f32(w1.v[e]);
    }
    const float* cr = cos + s * half;
    const float* sr = sin + s * half;
    Pack<T, V> o0, o1;
    if constexpr (kInter) {
      // Pairs (2m, 2m+1) inside each pack; pack l covers angles l*V/2 .. l*V/2 + V/2 - 1.
      float c0[V / 2], s0[V / 2], c1[V / 2], s1[V / 2];
      load_floats<V / 2>(cr + lane * (V / 2), c0);
      load_floats<V / 2>(sr + lane * (V / 2), s0);
      load_floats<V / 2>(cr + (nh + lane) * (V / 2), c1);
      load_floats<V / 2>(sr + (nh + lane) * (V / 2), s1);
#pragma unroll
      for (int m = 0; m < V / 2; ++m) {
        o0.v[2 * m] = from_f32<T>(a0[2 * m] * c0[m] - a0[2 * m + 1] * s0[m]);
        o0.v[2 * m + 1] = from_f32<T>(a0[2 * m + 1] * c0[m] + a0[2 * m] * s0[m]);
        o1.v[2 * m] = from_f32<T>(a1[2 * m] * c1[m] - a1[2 * m + 1] * s1[m]);
        o1.v[2 * m + 1] = from_f32<T>(a1[2 * m + 1] * c1[m] + a1[2 * m] * s1[m]);
      }
    } else {
      // Element e of pack l (first half) pairs with element e of pack l + nh; angle l*V + e.
      float c[V], sn[V];
      load_floats<V>(cr + lane * V, c);
      load_floats<V>(sr + lane * V, sn);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        o0.v[e] = from_f32<T>(a0[e] * c[e] - a1[e] * sn[e]);
        o1.v[e] = from_f32<T>(a1[e] * c[e] + a0[e] * sn[e]);
      }
    }
    store_pack_cs<T, V>(yr + lane * V, o0);
    store_pack_cs<T, V>(yr + half + lane * V, o1);
  }
}

// Any even D, any alignment: a warp per row, two passes over the row in global memory. In place is safe: the first
// pass (all reads) completes before the reduction, and in the second each pair is read and written by one lane.
template <typename T, bool kInter>
__global__ void __launch_bounds__(256)
qk_norm_rope_scalar_kernel(const T* x, const T* __restrict__ qw, const T* __restrict__ kw,
                           const float* __restrict__ cos, const float* __restrict__ sin, T* y, QkvRows R,
                           Strides4 xs, Strides4 ys, int64_t D, float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t half = D / 2;
  const int lane = threadIdx.x & 31;
  const int64_t rpb = blockDim.x >> 5;
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < R.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t r = base + (threadIdx.x >> 5);
    const bool valid = r < R.rows;
    int64_t b = 0, s = 0, h = 0;
    int t = 0;
    if (valid) R.decode(r, b, s, t, h);
    const T* xr = x + xs.off(b, s, t, h);
    float ss = 0.f;
    if (valid)
      for (int64_t e = lane; e < D; e += 32) {
        const float v = to_f32(xr[e]);
        ss = fmaf(v, v, ss);
      }
    ss = group_sum(ss, 32);
    if (!valid) continue;
    T* yr = y + ys.off(b, s, t, h);
    if (t == 2) {
      for (int64_t e = lane; e < D; e += 32) yr[e] = xr[e];
      continue;
    }
    const float rstd = rsqrtf(ss / static_cast<float>(D) + eps);
    const T* w = t == 0 ? qw : kw;
    const float* cr = cos + s * half;
    const float* sr = sin + s * half;
    for (int64_t i = lane; i < half; i += 32) {
      const int64_t ia = kInter ? 2 * i : i, ib = kInter ? 2 * i + 1 : i + half;
      float a = to_f32(xr[ia]) * rstd, c = to_f32(xr[ib]) * rstd;
      if (w) a *= to_f32(w[ia]), c *= to_f32(w[ib]);
      const float cs = cr[i], sn = sr[i];
      yr[ia] = from_f32<T>(a * cs - c * sn);
      yr[ib] = from_f32<T>(c * cs + a * sn);
    }
  }
}

template <typename T>
int launch_qk_norm_rope(const void* x, const void* qw, const void* kw, const float* cos, const float* sin, void* y,
                        const QkvRows& R, const Strides4& xs, const Strides4& ys, int64_t D, bool inter, float eps,
                        cudaStream_t st) {
  constexpr int V = vec16<T>();
  auto ok4 = [](const Strides4& a) { return a.b % V == 0 && a.s % V == 0 && a.t % V == 0 && a.h % V == 0; };
  const bool vec = D % (2 * V) == 0 && D / (2 * V) <= 32 && aligned16(x) && aligned16(y) && ok4(xs) && ok4(ys) &&
                   (!qw || aligned16(qw)) && (!kw || aligned16(kw)) && aligned16(cos) && aligned16(sin);
  const T* xt = static_cast<const T*>(x);
  const T* qt = static_cast<const T*>(qw);
  const T* kt = static_cast<const T*>(kw);
  T* yt = static_cast<T*>(y);
  const int threads = 256;
  if (vec) {
    const int nh = static_cast<int>(D / (2 * V));
    int width = 1;
    while (width < nh) width <<= 1;
    const unsigned blocks = grid_blocks(R.rows, threads / width);
    if (inter)
      launch_dependent(qk_norm_rope_kernel<T, V, true>, blocks, threads, 0, st,
          xt, qt, kt, cos, sin, yt, R, xs, ys, nh, width, eps);
    else
      launch_dependent(qk_norm_rope_kernel<T, V, false>, blocks, threads, 0, st,
          xt, qt, kt, cos, sin, yt, R, xs, ys, nh, width, eps);
  } else {
    const unsigned blocks = grid_blocks(R.rows, threads / 32);
    if (inter)
      launch_dependent(qk_norm_rope_scalar_kernel<T, true>, blocks, threads, 0, st,
          xt, qt, kt, cos, sin, yt, R, xs, ys, D, eps);
    else
      launch_dependent(qk_norm_rope_scalar_kernel<T, false>, blocks, threads, 0, st,
          xt, qt, kt, cos, sin, yt, R, xs, ys, D, eps);
  }
  return launch_status();
}

}  // namespace
}  // namespace fdm

using namespace fdm;

// x, y: [B, S, H, D] with element strides (xs_b, xs_s, xs_h) and (ys_b, ys_s, ys_h), last dim contiguous; y may
// be x (in place). cos, sin: float32 [S, D/2] contiguous. interleaved: 1 pairs (2i, 2i+1), 0 pairs (i, i + D/2).
FDM_API int fdm_rope(const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t S, int64_t H,
                     int64_t D, int64_t xs_b, int64_t xs_s, int64_t xs_h, int64_t ys_b, int64_t ys_s, int64_t ys_h,
                     int interleaved, int dtype, cudaStream_t stream) {
  if (B < 0 || S < 0 || H < 0 || D < 0) return arg_error("fdm_rope: negative size");
  if (D % 2 != 0) return arg_error("fdm_rope: head dim %lld must be even", (long long)D);
  if (H * D >= (int64_t{1} << 31)) return arg_error("fdm_rope: H * D = %lld is too large", (long long)(H * D));
  if (B * S * H * D == 0) return 0;
  const Strides3 xs{xs_b, xs_s, xs_h}, ys{ys_b, ys_s, ys_h};
  const int h = static_cast<int>(H);
  const bool ptrs = aligned16(x) && aligned16(y);
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    if (interleaved) {
      if (ptrs && D % V == 0 && strides_multiple(xs, V) && strides_multiple(ys, V))
        return launch_rope<T, V / 2, true>(x, y, cos, sin, B, S, h, D, xs, ys, stream);
      return launch_rope<T, 1, true>(x, y, cos, sin, B, S, h, D, xs, ys, stream);
    }
    if (ptrs && (D / 2) % V == 0 && strides_multiple(xs, V) && strides_multiple(ys, V))
      return launch_rope<T, V, false>(x, y, cos, sin, B, S, h, D, xs, ys, stream);
    return launch_rope<T, 1, false>(x, y, cos, sin, B, S, h, D, xs, ys, stream);
  });
  return 0;
}

// RMSNorm over D of the q and k heads of qkv [B, S, 3, H, D] (element strides xs_* over B, S, the q/k/v dim and H;
// D contiguous) with weights q_w, k_w ([D] or null), then RoPE with cos, sin (float32 [S, D/2] contiguous; pairs as
// fdm_rope), written to out (strides ys_*). copy_v: 1 copies the v heads to out, 0 leaves them alone (out == qkv, in
// place). float32 math; the normalized values are not rounded to the storage type before the rotation.
FDM_API int fdm_qk_norm_rope(const void* qkv, const void* q_w, const void* k_w, const float* cos, const float* sin,
                             void* out, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xs_b, int64_t xs_s,
                             int64_t xs_t, int64_t xs_h, int64_t ys_b, int64_t ys_s, int64_t ys_t, int64_t ys_h,
                             float eps, int copy_v, int interleaved, int dtype, cudaStream_t stream) {
  if (B < 0 || S < 0 || H < 0 || D < 0) return arg_error("fdm_qk_norm_rope: negative size");
  if (D % 2 != 0) return arg_error("fdm_qk_norm_rope: head dim %lld must be even", (long long)D);
  if (!cos || !sin) return arg_error("fdm_qk_norm_rope: cos and sin are required");
  if (B * S * H * D == 0) return 0;
  const int nt = copy_v ? 3 : 2;
  const int64_t rows = B * S * nt * H;
  const QkvRows R{rows, S, H, nt, rows < (int64_t{1} << 31)};
  const Strides4 xs{xs_b, xs_s, xs_t, xs_h}, ys{ys_b, ys_s, ys_t, ys_h};
  FDM_DISPATCH_FLOAT(dtype, return launch_qk_norm_rope<scalar_t>(qkv, q_w, k_w, cos, sin, out, R, xs, ys, D,
                                                                 interleaved != 0, eps, stream));
  return 0;
}
