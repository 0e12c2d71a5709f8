// conv2d as a CUTLASS 2.x implicit GEMM on Ampere-class tensor cores (mma.sync; runs on sm80/86/89 and Hopper):
//   out[N, P, Q, K] = conv2d(x[N, H, W, C], w[K, R, S, C]) + bias[K]     (channels-last, cross-correlation)
//
// GEMM view: rows are the N*P*Q output pixels, columns the K output channels, the reduction runs over R*S*C.
// CUTLASS's "optimized" activation iterator gathers each receptive field straight from x (predicated loads give
// the zero padding), so no im2col buffer exists. It needs C % 8 == 0 (16-byte vector loads of 16-bit elements)
// and R, S <= 32 (filter positions are bit masks); the epilogue's 16-byte stores need K % 8 == 0. Other shapes
// are answered with a bad-argument status and Python's conv2d takes the im2col path (kernels/im2col.cu).
//
// The bias rides in as the C operand with all-zero strides (every output pixel reads bias[0:K]); beta = 0 when
// there is none, so C is never read. Two tile configurations x two dtypes = 4 kernel instantiations.
//
// On an sm90 device (with the library built for sm_90a) a third configuration runs first where it can: the
// CUTLASS 3.x TMA/wgmma implicit GEMM of kernels/sm90/conv_sm90.cu (C a multiple of 64); the sm80 kernels take
// whatever it declines.
#include "common.cuh"
#include "gemm.cuh"  // current_device_facts

#include <atomic>

#include "cutlass/cutlass.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/epilogue/thread/linear_combination.h"

namespace fdm {

#ifdef FASTDM_HAS_SM90
// kernels/sm90/conv_sm90.cu: returns kConvNotSupported (-1000) where it cannot take the problem.
int conv2d_sm90(const void* x, const void* w, const void* bias, void* out, int N, int H, int W, int C, int K, int R,
                int S, int sh, int sw, int ph, int pw, int dtype, cudaStream_t stream);
#endif

namespace {

// Status of a configuration that cannot take a problem (never returned through the C ABI).
constexpr int kConvNotSupported = -1000;

// Whether the automatic choice takes the sm90 kernel on sm90 devices (tests and bench/conv.py force each
// configuration through fdm_conv2d_nhwc_set_config either way).
constexpr bool kSm90Auto = true;

struct ConvProblem {
  const void* x;     // [N, H, W, C]
  const void* w;     // [K, R, S, C]
  const void* bias;  // [K] or null
  void* out;         // [N, P, Q, K]
  int N, H, W, C, K, R, S, P, Q, stride_h, stride_w, pad_h, pad_w;
};

template <typename Element, typename Threadblock, typename Warp, int Stages>
struct ImplicitConv {
  static constexpr int kAlign = 8;  // 16 bytes of 16-bit elements
  using EpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, kAlign, float, float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Element, cutlass::layout::TensorNHWC,  // A = x
      Element, cutlass::layout::TensorNHWC,  // B = w (KRSC is NHWC-shaped)
      Element, cutlass::layout::TensorNHWC,  // C = bias (zero strides), D = out
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, Threadblock, Warp,
      cutlass::gemm::GemmShape<16, 8, 16>, EpilogueOp,
      // Consecutive CTAs take neighbouring output-channel tiles of one pixel tile, so the activation tile they
      // share is read from L2 rather than DRAM.
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, Stages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized, cutlass::conv::StrideSupport::kUnity, kAlign,
      kAlign>::Kernel;
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static int run(const ConvProblem& p, cudaStream_t stream) {
    using Layout = cutlass::layout::TensorNHWC;
    const cutlass::conv::Conv2dProblemSize size(p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q, p.pad_h, p.pad_w,
                                                p.stride_h, p.stride_w, /*dilation*/ 1, 1,
                                                cutlass::conv::Mode::kCrossCorrelation);
    auto* x = static_cast<Element*>(const_cast<void*>(p.x));
    auto* w = static_cast<Element*>(const_cast<void*>(p.w));
    auto* out = static_cast<Element*>(p.out);
    auto* bias = static_cast<Element*>(const_cast<void*>(p.bias));
    const Layout x_layout = Layout::packed({p.N, p.H, p.W, p.C});
    const Layout w_layout = Layout::packed({p.K, p.R, p.S, p.C});
    const Layout out_layout = Layout::packed({p.N, p.P, p.Q, p.K});
    typename EpilogueOp::Params epi(1.0f, bias ? 1.0f : 0.0f);
    // C: the bias broadcast over pixels by zero strides; when there is none beta = 0 and C is never read.
    cutlass::TensorRef<Element, Layout> ref_c(bias ? bias : out, bias ? Layout(Layout::Stride(0)) : out_layout);
    typename Conv::Arguments args(size, {x, x_layout}, {w, w_layout}, ref_c, {out, out_layout}, epi);
    if (Conv::can_implement(args) != cutlass::Status::kSuccess) return kConvNotSupported;
    if (Conv::get_workspace_size(args) != 0) return kConvNotSupported;  // split-K is never asked for
    Conv conv;
    if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kConvNotSupported;
    if (conv.run(stream) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorLaunchFailure);
    return 0;
  }
};

template <int M, int N, int K> using Shape = cutlass::gemm::GemmShape<M, N, K>;

// Large problems: 256 pixels x 128 channels per CTA (8 warps of 64x64), 3 stages = 72 KiB of shared memory, which
// fits sm86/sm89 too. One CTA per SM (the 64x64 warp tiles take ~230 registers per thread).
template <typename E> using Big = ImplicitConv<E, Shape<256, 128, 32>, Shape<64, 64, 32>, 3>;
// Problems whose big tiles fill the SMs poorly (small images, a last wave mostly empty): 128x128 per CTA (4 warps of
// 64x64), 4 stages = 64 KiB, two CTAs per SM, so twice the CTAs at the same warp-level efficiency.
template <typename E> using Medium = ImplicitConv<E, Shape<128, 128, 32>, Shape<64, 64, 32>, 4>;

// Configurations by index (fdm_conv2d_nhwc_set_config, fdm_conv2d_nhwc_last_config, bench/conv.py).
enum ConvConfig : int { kConvBig = 0, kConvMedium = 1, kConvSm90 = 2, kConvConfigCount };

std::atomic<int> g_force_config{-1};  // -1: choose per problem
std::atomic<int> g_last_config{-1};   // -1 after set_config, until a convolution runs here

// sm_90a code runs on compute capability 9.0 only.
bool sm90_available(const DeviceFacts& f) {
#ifdef FASTDM_HAS_SM90
  return f.cc_major == 9 && f.cc_minor == 0;
#else
  (void)f;
  return false;
#endif
}

// Pick by estimated time. A big CTA does the work of two medium ones, and an SM runs one big or two medium CTAs
// at a time, so in units of one medium CTA's run time: big = 2 x (waves of big tiles), medium = (rounds of one
// medium tile per SM). The medium tile wins when its finer grain fills the last wave better (e.g. 140 big tiles on
// 132 SMs: 4 units big, 3 medium) or when even its tiles number at most one per SM (tiny problems); ties go to the
// big tile, whose longer-lived CTAs amortise their prologue and epilogue better.
int choose_sm80_config(const ConvProblem& p, int sms) {
  const int64_t m = int64_t(p.N) * p.P * p.Q;
  const int64_t big_tiles = ceil_div(m, 256) * ceil_div(p.K, 128);
  const int64_t medium_tiles = ceil_div(m, 128) * ceil_div(p.K, 128);
  return ceil_div(medium_tiles, sms) < 2 * ceil_div(big_tiles, sms) ? kConvMedium : kConvBig;
}

template <typename E>
int run_sm80(int config, const ConvProblem& p, cudaStream_t stream) {
  switch (config) {
    case kConvBig: return Big<E>::run(p, stream);
    case kConvMedium: return Medium<E>::run(p, stream);
    default: return kConvNotSupported;
  }
}

int run_config(int dtype, int config, const ConvProblem& p, const DeviceFacts& f, cudaStream_t stream) {
  if (config == kConvSm90) {
    if (!sm90_available(f)) return kConvNotSupported;
#ifdef FASTDM_HAS_SM90
    return conv2d_sm90(p.x, p.w, p.bias, p.out, p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.stride_h, p.stride_w, p.pad_h,
                       p.pad_w, dtype, stream);
#endif
  }
  switch (dtype) {
    case FDM_BF16: return run_sm80<cutlass::bfloat16_t>(config, p, stream);
    case FDM_F16: return run_sm80<cutlass::half_t>(config, p, stream);
    default: return kConvNotSupported;
  }
}

// The automatic choice: the sm90 kernel where it takes the problem, else an sm80 tile. Sets *config to the one
// that ran.
int run_auto(int dtype, const ConvProblem& p, const DeviceFacts& f, cudaStream_t stream, int* config) {
  if (kSm90Auto && sm90_available(f)) {
    *config = kConvSm90;
    const int st = run_config(dtype, kConvSm90, p, f, stream);
    if (st != kConvNotSupported) return st;
  }
  *config = choose_sm80_config(p, f.sm_count);
  return run_config(dtype, *config, p, f, stream);
}

constexpr int64_t kMaxTensorBytes = int64_t(1) << 31;  // CUTLASS 2.x conv indexes each tensor in int32 bytes

}  // namespace
}  // namespace fdm

using namespace fdm;

// out[N, P, Q, K] = conv2d(x[N, H, W, C], w[K, R, S, C]) + bias[K] (bias may be null), cross-correlation as torch,
// P = (H + 2*pad_h - R) / stride_h + 1, Q likewise. All tensors are contiguous channels-last bf16 or fp16 with
// 16-byte aligned pointers; C and K must be multiples of 8, R and S at most 32, and one image of x or out under
// 2 GiB (larger batches run in several launches). A shape outside these limits returns a bad-argument status
// (the caller then uses fdm_conv2d). out must not overlap x, w or bias.
FDM_API int fdm_conv2d_nhwc(const void* x, const void* w, const void* bias, void* out, int64_t N, int64_t H,
                            int64_t W, int64_t C, int64_t K, int64_t R, int64_t S, int64_t stride_h,
                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int dtype, cudaStream_t stream) {
  if (N < 0 || H <= 0 || W <= 0 || C <= 0 || K <= 0 || R <= 0 || S <= 0 || stride_h <= 0 || stride_w <= 0 ||
      pad_h < 0 || pad_w < 0)
    return arg_error("fdm_conv2d_nhwc: bad sizes");
  if (dtype != FDM_BF16 && dtype != FDM_F16)
    return arg_error("fdm_conv2d_nhwc: dtype code %d is not supported (want f16 or bf16)", dtype);
  if (C % 8 || K % 8)
    return arg_error("fdm_conv2d_nhwc: C=%lld and K=%lld must be multiples of 8", (long long)C, (long long)K);
  if (R > 32 || S > 32) return arg_error("fdm_conv2d_nhwc: filters larger than 32x32 are not supported");
  const int64_t hp = H + 2 * pad_h - R, wp = W + 2 * pad_w - S;
  if (hp < 0 || wp < 0)
    return arg_error("fdm_conv2d_nhwc: kernel %lldx%lld is larger than the padded input %lldx%lld", (long long)R,
                     (long long)S, (long long)(H + 2 * pad_h), (long long)(W + 2 * pad_w));
  const int64_t P = hp / stride_h + 1, Q = wp / stride_w + 1;
  if (!aligned16(x) || !aligned16(w) || !aligned16(out) || (bias && !aligned16(bias)))
    return arg_error("fdm_conv2d_nhwc: x, w, bias and out must be 16-byte aligned");
  const int64_t esize = 2;
  const int64_t image_in = H * W * C * esize, image_out = P * Q * K * esize;
  if (image_in >= kMaxTensorBytes || image_out >= kMaxTensorBytes || K * R * S * C * esize >= kMaxTensorBytes)
    return arg_error("fdm_conv2d_nhwc: one image (%lld B in, %lld B out) or the filter is 2 GiB or more",
                     (long long)image_in, (long long)image_out);
  if (N == 0) return 0;

  DeviceFacts facts;
  if (const int st = current_device_facts(&facts)) return st;
  // Whole images per launch, as many as keep every tensor of the launch under 2 GiB.
  const int64_t per_launch_max = (kMaxTensorBytes - 1) / (image_in > image_out ? image_in : image_out);
  const int force = g_force_config.load();
  for (int64_t n0 = 0; n0 < N; n0 += per_launch_max) {
    const int64_t n = N - n0 < per_launch_max ? N - n0 : per_launch_max;
    ConvProblem p{static_cast<const char*>(x) + n0 * image_in, w, bias, static_cast<char*>(out) + n0 * image_out,
                  int(n), int(H), int(W), int(C), int(K), int(R), int(S), int(P), int(Q), int(stride_h),
                  int(stride_w), int(pad_h), int(pad_w)};
    int config = force;
    const int st =
        force >= 0 ? run_config(dtype, force, p, facts, stream) : run_auto(dtype, p, facts, stream, &config);
    if (st == kConvNotSupported)
      return arg_error("fdm_conv2d_nhwc: CUTLASS configuration %d rejected N=%lld H=%lld W=%lld C=%lld K=%lld "
                       "R=%lld S=%lld", config, (long long)n, (long long)H, (long long)W, (long long)C,
                       (long long)K, (long long)R, (long long)S);
    if (st) return st;
    g_last_config.store(config);
  }
  return 0;
}

// Test and benchmark hooks. set_config forces a configuration (-1 = choose per problem) and forgets the last one;
// last_config and config_count are queries that return a value, not a status.
FDM_API int fdm_conv2d_nhwc_set_config(int config) {
  if (config < -1 || config >= kConvConfigCount)
    return arg_error("fdm_conv2d_nhwc_set_config: config %d is out of range [-1, %d)", config, int(kConvConfigCount));
  g_force_config.store(config);
  g_last_config.store(-1);
  return 0;
}

FDM_API int fdm_conv2d_nhwc_last_config() { return g_last_config.load(); }

FDM_API int fdm_conv2d_nhwc_config_count() { return kConvConfigCount; }

// 1 when configuration `config` can run on the current device (the sm90 one needs a compute capability 9.0
// device and a library built for sm_90a), else 0; a query, not a status.
FDM_API int fdm_conv2d_nhwc_config_available(int config) {
  if (config < 0 || config >= kConvConfigCount) return 0;
  if (config != kConvSm90) return 1;
  DeviceFacts facts;
  return current_device_facts(&facts) == 0 && sm90_available(facts) ? 1 : 0;
}
