// sm90 linear kernel: cooperative 128x256x64, cluster 2x1, stream-K scheduler (the large-problem workhorse).
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Coop128x256<E, false>;
}  // namespace

int run_coop128x256(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
