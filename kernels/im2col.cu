// conv2d as im2col + GEMM (a correct first version; an implicit GEMM will replace it).
//
// Output pixels are GEMM rows: row r = (n, oh, ow) holds the receptive field of that pixel, C*kh*kw values in
// weight order (c, i, j). Then tmp[rows, O] = linear(col, weight.view(O, C*kh*kw), bias), and tmp is scattered
// back to NCHW. The work goes in chunks of rows so the workspace stays bounded (Python sizes it).
// K = C*kh*kw and O are zero-padded to multiples of 8 (padded weight and bias copies in the workspace) so every
// convolution, the RGB ones included, takes the tensor-core GEMM paths.
#include "gemm.cuh"

namespace fdm {
namespace {

struct ConvShape {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
};

inline int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

// col[r - r0, c] for rows [r0, r0 + rows) and c < Kp (zero for c >= K and outside the image).
template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col, ConvShape s, int64_t r0, int64_t rows,
                              int64_t K, int64_t Kp) {
  const int64_t total = rows * Kp;
  const int64_t khw = s.kh * s.kw, hw_out = s.Ho * s.Wo;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rr = i / Kp, c = i - rr * Kp;
    const int64_t r = r0 + rr;
    T v = from_f32<T>(0.0f);
    if (c < K) {
      const int64_t n = r / hw_out, p = r - n * hw_out;
      const int64_t oh = p / s.Wo, ow = p - oh * s.Wo;
      const int64_t ci = c / khw, rem = c - ci * khw;
      const int64_t ki = rem / s.kw, kj = rem - ki * s.kw;
      const int64_t ih = oh * s.sh - s.ph + ki, iw = ow * s.sw - s.pw + kj;
      if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) v = x[((n * s.C + ci) * s.H + ih) * s.W + iw];
    }
    col[i] = v;
  }
}

// wp[Op, Kp] = w[O, K] zero-padded; bp[Op] = bias zero-padded (bias may be null: zeros).
template <typename T>
__global__ void pad_weight_kernel(const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ wp,
                                  T* __restrict__ bp, int64_t O, int64_t K, int64_t Op, int64_t Kp) {
  const int64_t total = Op * Kp;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / Kp, c = i - o * Kp;
    wp[i] = (o < O && c < K) ? w[o * K + c] : from_f32<T>(0.0f);
    if (c == 0) bp[o] = (o < O && bias) ? bias[o] : from_f32<T>(0.0f);
  }
}

// out[n, o, p] = tmp[r - r0, o] for rows r = n * Ho*Wo + p in [r0, r0 + rows) and o < O, through a shared
// 32x32 tile so both the tmp reads (along o) and the out writes (along p) are coalesced.
template <typename T>
__global__ void rows_to_nchw_kernel(const T* __restrict__ tmp, T* __restrict__ out, int64_t r0, int64_t rows,
                                    int64_t O, int64_t Op, int64_t hw_out) {
  __shared__ T tile[32][33];
  const int64_t rr0 = int64_t(blockIdx.x) * 32, o0 = int64_t(blockIdx.y) * 32;
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t rr = rr0 + k, o = o0 + threadIdx.x;
    if (rr < rows && o < O) tile[k][threadIdx.x] = tmp[rr * Op + o];
  }
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t o = o0 + k, rr = rr0 + threadIdx.x;
    if (rr < rows && o < O) {
      const int64_t r = r0 + rr, n = r / hw_out, p = r - n * hw_out;
      out[(n * O + o) * hw_out + p] = tile[threadIdx.x][k];
    }
  }
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = ceil_div(total, threads);
  return unsigned(blocks < 65536 * 16 ? blocks : 65536 * 16);
}

template <typename T>
int conv2d_impl(const T* x, const T* w, const T* bias, T* out, char* ws, int64_t ws_bytes, const ConvShape& s,
                int dtype, cudaStream_t stream) {
  const int64_t K = s.C * s.kh * s.kw;
  const bool pad = (K % 8) || (s.O % 8);
  const int64_t Kp = pad ? round_up8(K) : K, Op = pad ? round_up8(s.O) : s.O;
  const int64_t isz = sizeof(T);
  // Workspace: [padded weight Op*Kp][padded bias Op] then per chunk [col rows*Kp][tmp rows*Op]. Op and Kp are
  // multiples of 8, so every piece starts 16-byte aligned (the GEMM's vector loads need it).
  const int64_t fixed = pad ? (Op * Kp + Op) * isz : 0;
  const int64_t per_row = (Kp + Op) * isz;
  const int64_t total_rows = s.N * s.Ho * s.Wo;
  int64_t chunk = (ws_bytes - fixed) / per_row;
  if (chunk < 1)
    return arg_error("workspace of %lld bytes is too small (need at least %lld)", (long long)ws_bytes,
                     (long long)(fixed + per_row));
  if (chunk > total_rows) chunk = total_rows;

  const T* wg = w;
  const T* bg = bias;
  char* cursor = ws;
  if (pad) {
    T* wp = reinterpret_cast<T*>(cursor);
    cursor += Op * Kp * isz;
    T* bp = reinterpret_cast<T*>(cursor);
    cursor += Op * isz;
    pad_weight_kernel<T><<<grid_for(Op * Kp, 256), 256, 0, stream>>>(w, bias, wp, bp, s.O, K, Op, Kp);
    if (const int st = launch_status()) return st;
    wg = wp;
    bg = bp;
  }
  T* col = reinterpret_cast<T*>(cursor);
  T* tmp = col + chunk * Kp;

  for (int64_t r0 = 0; r0 < total_rows; r0 += chunk) {
    const int64_t rows = total_rows - r0 < chunk ? total_rows - r0 : chunk;
    im2col_kernel<T><<<grid_for(rows * Kp, 256), 256, 0, stream>>>(x, col, s, r0, rows, K, Kp);
    if (const int st = launch_status()) return st;
    LinearProblem p;
    p.x = col;
    p.w = wg;
    p.bias = bg;
    p.out = tmp;
    p.M = rows;
    p.N = Op;
    p.K = Kp;
    p.dtype = dtype;
    if (const int st = linear_dispatch(p, stream)) return st;
    const dim3 grid(unsigned(ceil_div(rows, 32)), unsigned(ceil_div(s.O, 32)));
    rows_to_nchw_kernel<T><<<grid, dim3(32, 8), 0, stream>>>(tmp, out, r0, rows, s.O, Op, s.Ho * s.Wo);
    if (const int st = launch_status()) return st;
  }
  return 0;
}

}  // namespace
}  // namespace fdm

using namespace fdm;

// out[N, O, Ho, Wo] = conv2d(x[N, C, H, W], w[O, C, kh, kw]) + bias[O] (bias may be null), cross-correlation
// as torch: Ho = (H + 2*ph - kh) / sh + 1. workspace: device scratch of workspace_bytes (see runtime/ops/cuda/
// gemm.py for the size); larger means fewer, bigger GEMMs. x, out and workspace must not overlap.
FDM_API int fdm_conv2d(const void* x, const void* w, const void* bias, void* out, void* workspace,
                       int64_t workspace_bytes, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kh,
                       int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int dtype, cudaStream_t stream) {
  if (N < 0 || C <= 0 || H < 0 || W < 0 || O <= 0 || kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 || ph < 0 || pw < 0)
    return arg_error("bad sizes");
  ConvShape s{N, C, H, W, O, kh, kw, sh, sw, ph, pw, 0, 0};
  const int64_t hp = H + 2 * ph - kh, wpad = W + 2 * pw - kw;
  if (hp < 0 || wpad < 0) return arg_error("kernel %lldx%lld is larger than the padded input %lldx%lld",
                                           (long long)kh, (long long)kw, (long long)(H + 2 * ph),
                                           (long long)(W + 2 * pw));
  s.Ho = hp / sh + 1;
  s.Wo = wpad / sw + 1;
  if (N == 0) return 0;
  if (!workspace || !aligned16(workspace)) return arg_error("the workspace must be 16-byte aligned");
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case FDM_F32:
      return conv2d_impl(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<const float*>(bias),
                         static_cast<float*>(out), ws, workspace_bytes, s, dtype, stream);
    case FDM_F16:
      return conv2d_impl(static_cast<const __half*>(x), static_cast<const __half*>(w),
                         static_cast<const __half*>(bias), static_cast<__half*>(out), ws, workspace_bytes, s, dtype,
                         stream);
    case FDM_BF16:
      return conv2d_impl(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
                         static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), ws,
                         workspace_bytes, s, dtype, stream);
    default: return arg_error("unsupported dtype code %d (want f32, f16 or bf16)", dtype);
  }
}
