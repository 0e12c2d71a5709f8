// Batched matmul on Ampere-class tensor cores (CUTLASS 2.x strided batched GEMM): C[b] = A[b] @ B[b].
// A [batch, M, K], B [batch, K, N] (or one [K, N] shared by every batch: b_batch = 0) and C are packed
// row-major: an "NN" GEMM. One tile configuration per dtype; runs on every architecture, Hopper included.
#include "gemm.cuh"

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_universal.h"

namespace fdm {
namespace {

template <typename Element>
struct Sm80Matmul {
  static constexpr int kAlign = 8;
  // beta = 0 and no source: C is never read.
  using EpilogueOp = cutlass::epilogue::thread::LinearCombination<
      Element, kAlign, float, float, cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Gemm = cutlass::gemm::device::GemmUniversal<
      Element, cutlass::layout::RowMajor, Element, cutlass::layout::RowMajor, Element, cutlass::layout::RowMajor,
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
      cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>, EpilogueOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, 4, kAlign, kAlign>;

  static int run(const void* a, const void* b, void* c, int64_t batch, int64_t M, int64_t N, int64_t K,
                 int64_t b_batch, cudaStream_t stream) {
    typename EpilogueOp::Params epi(1.0f, 0.0f);
    const auto mode = batch > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm;
    typename Gemm::Arguments args(mode, {int(M), int(N), int(K)}, int(batch), epi, a, b, c, c,
                                  /*batch strides A, B, C, D*/ M * K, b_batch, M * N, M * N,
                                  /*lda=*/K, /*ldb=*/N, /*ldc=*/N, /*ldd=*/N);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (Gemm::get_workspace_size(args) != 0) return kGemmNotSupported;
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorLaunchFailure);
    return 0;
  }
};

}  // namespace

int matmul_sm80(const void* a, const void* b, void* c, int64_t batch, int64_t M, int64_t N, int64_t K,
                int64_t b_batch, int dtype, cudaStream_t stream) {
  if (K % 8 || N % 8 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || batch > 65535) return kGemmNotSupported;
  if (!aligned16(a) || !aligned16(b) || !aligned16(c)) return kGemmNotSupported;
  switch (dtype) {
    case FDM_BF16: return Sm80Matmul<cutlass::bfloat16_t>::run(a, b, c, batch, M, N, K, b_batch, stream);
    case FDM_F16: return Sm80Matmul<cutlass::half_t>::run(a, b, c, batch, M, N, K, b_batch, stream);
    default: return kGemmNotSupported;
  }
}

}  // namespace fdm
