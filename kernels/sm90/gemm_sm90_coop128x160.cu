// sm90 linear kernel: cooperative 128x160x64, cluster 1x1, stream-K scheduler (SDXL-sized N: 640, 1280, 3840).
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Coop128x160<E>;
}  // namespace

int run_coop128x160(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
