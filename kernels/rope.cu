// Rotary position embedding on x [B, S, H, D] with arbitrary strides over B, S, H (last dim contiguous), so it
// can run in place on the q/k heads of a fused QKV buffer. cos, sin: float32 [S, D/2], frequency i of position s.
// Pair i is (x[2i], x[2i+1]) when interleaved (FLUX, Qwen-Image), else (x[i], x[i + D/2]) (rotate-half);
// (a, b) -> (a cos - b sin, b cos + a sin), float32 math.
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
  rope_kernel<T, P, kInter><<<grid_blocks(B * S, 1), row_block_threads(items), 0, st>>>(
      static_cast<const T*>(x), static_cast<T*>(y), cos, sin, B, S, H, D, xs, ys);
  return launch_status();
}

bool strides_multiple(const Strides3& a, int64_t m) { return a.b % m == 0 && a.s % m == 0 && a.h % m == 0; }

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
