// sm90 linear kernel: ping-pong 64x256x64, cluster 2x1 (B multicast), persistent scheduler.
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Pingpong64x256<E, Shape<_2, _1, _1>>;
}  // namespace

int run_pingpong64x256c2(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
