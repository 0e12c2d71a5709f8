// sm90 linear kernel: cooperative 192x192x64, cluster 2x1, stream-K scheduler, N split between the warp groups,
// C-free epilogue (plain linear only).
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Coop192x192<E, true>;
}  // namespace

int run_coop192x192lean(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
