// sm90 linear kernel: cooperative 192x192x64, cluster 2x1, stream-K scheduler, the warp groups splitting the tile
// along N (192x96 each; cuBLAS's tiling for the large FLUX GEMMs).
// bf16 and fp16 instantiations; the template is in gemm_sm90_kernel.cuh, the dispatch in gemm_sm90.cu.
#include "gemm_sm90_kernel.cuh"

namespace fdm {
namespace sm90 {
namespace {
template <typename E>
using Family = Coop192x192<E, false>;
}  // namespace

int run_coop192x192(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  return run_by_dtype<Family>(p, c, sm_count, stream);
}

}  // namespace sm90
}  // namespace fdm
