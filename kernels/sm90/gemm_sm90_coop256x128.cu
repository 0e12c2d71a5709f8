// sm90 linear kernel: cooperative 256x128x64, cluster 1x2, stream-K scheduler.
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Coop256x128<E>;
}  // namespace

int run_coop256x128(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
