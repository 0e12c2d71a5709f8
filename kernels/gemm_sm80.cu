// linear on Ampere-class tensor cores (CUTLASS 2.x multistage GEMM): out = act(x @ w^T + bias).
// Also the sm90 path's fallback for shapes its kernels reject, and the path of sm86/sm89 cards.
//
// x [M, K] row-major and w [N, K] row-major make a "TN" GEMM (B = w^T is column-major K x N).
// The bias rides in as the C operand with a zero row stride (every row reads bias[0:N]); beta = 0 when there is
// none, so C is never read. The activation is a runtime switch inside one epilogue functor, which keeps this
// file at 4 kernel instantiations (2 dtypes x 2 tiles) for every architecture it is built for.
#include "gemm.cuh"

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination_generic.h"
#include "cutlass/gemm/device/gemm_universal.h"

namespace fdm {
namespace {

struct ActArguments {
  int act = kActNone;
};

// Activation functor for LinearCombinationGeneric, chosen at run time (the branch is uniform per launch).
template <typename T>
struct RuntimeAct {
  using Arguments = ActArguments;
  CUTLASS_HOST_DEVICE T operator()(T const& x, Arguments const& args) const {
    return T(apply_act(float(x), args.act));
  }
};

template <typename T, int N>
struct RuntimeAct<cutlass::Array<T, N>> {
  using Arguments = ActArguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x, Arguments const& args) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = T(apply_act(float(x[i]), args.act));
    return y;
  }
};

template <typename Element, typename Threadblock, typename Warp, int Stages>
struct Sm80Linear {
  static constexpr int kAlign = 8;  // 16 bytes of 16-bit elements
  using EpilogueOp = cutlass::epilogue::thread::LinearCombinationGeneric<RuntimeAct, Element, kAlign, float, float>;
  using Gemm = cutlass::gemm::device::GemmUniversal<
      Element, cutlass::layout::RowMajor,     // A = x [M, K]
      Element, cutlass::layout::ColumnMajor,  // B = w^T [K, N]
      Element, cutlass::layout::RowMajor,     // C (bias, ldc = 0) and D [M, N]
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, Threadblock, Warp,
      cutlass::gemm::GemmShape<16, 8, 16>, EpilogueOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, Stages, kAlign, kAlign>;

  static int run(const LinearProblem& p, cudaStream_t stream) {
    typename EpilogueOp::Params epi(1.0f, p.bias ? 1.0f : 0.0f);
    epi.act = p.act;
    const void* c = p.bias ? p.bias : p.out;  // never read when beta == 0
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm,
                                  {int(p.M), int(p.N), int(p.K)}, /*batch_count=*/1, epi, p.x, p.w, c, p.out,
                                  /*batch strides*/ 0, 0, 0, 0,
                                  /*lda=*/p.K, /*ldb=*/p.K, /*ldc=*/0, /*ldd=*/p.N);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (Gemm::get_workspace_size(args) != 0) return kGemmNotSupported;
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorLaunchFailure);
    return 0;
  }
};

template <int M, int N, int K> using Shape = cutlass::gemm::GemmShape<M, N, K>;

// Large problems: 128x256 tiles (8 warps), 3 stages = 72 KiB of shared memory, which fits sm86/sm89 too.
template <typename E> using Big = Sm80Linear<E, Shape<128, 256, 32>, Shape<64, 64, 32>, 3>;
// Problems with few 128x256 tiles (small M or N): 64x128 tiles (4 warps) fill more SMs.
template <typename E> using Small = Sm80Linear<E, Shape<64, 128, 32>, Shape<32, 64, 32>, 4>;

template <typename E>
int run_linear(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  const int64_t big_tiles = ceil_div(p.M, 128) * ceil_div(p.N, 256);
  if (big_tiles >= sm_count) return Big<E>::run(p, stream);
  return Small<E>::run(p, stream);
}

}  // namespace

int linear_sm80(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  if (p.gate || p.residual) return kGemmNotSupported;
  if (p.K % 8 || p.N % 8 || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return kGemmNotSupported;
  if (!aligned16(p.x) || !aligned16(p.w) || !aligned16(p.out) || (p.bias && !aligned16(p.bias)))
    return kGemmNotSupported;
  switch (p.dtype) {
    case FDM_BF16: return run_linear<cutlass::bfloat16_t>(p, sm_count, stream);
    case FDM_F16: return run_linear<cutlass::half_t>(p, sm_count, stream);
    default: return kGemmNotSupported;
  }
}

}  // namespace fdm
