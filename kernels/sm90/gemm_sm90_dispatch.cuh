// Declarations shared by the sm90 linear translation units: the per-kernel entry points
// (gemm_sm90_<kernel>.cu) and the helpers that gemm_sm90.cu gives them. Kept free of CUTLASS headers so the
// dispatch TU compiles fast.
#pragma once
#include "gemm.cuh"

namespace fdm {

int linear_sm90(const LinearProblem& p, const Sm90Config& config, int sm_count, cudaStream_t stream);

namespace sm90 {

// Per-kernel entry points (gemm_sm90_<kernel>.cu); dtype is p.dtype (bf16 or f16).
int run_coop128x256(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop256x128(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop128x128(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_pingpong128x128(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_pingpong128x128c2(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop128x256lean(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop128x160(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop192x192(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_coop192x192lean(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
// Hand-written kernels (gemm_sm90_wgmma.cu): plain linears and gated residuals; the grid is one cluster per SM pair.
int run_wgmma128x256(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_wgmma192x192(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_wgmma128x160(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);
int run_wgmma128x160c2x2(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream);

// Device scratch of at least `bytes` for stream-K partial sums, owned by the library and reused by every GEMM on
// `stream` (gemm_sm90.cu). Null when none can be had (allocation failed, stream capture, too many streams): the
// caller then runs data-parallel, which needs none.
void* stream_workspace(size_t bytes, cudaStream_t stream);

// Tile order: raster kRasterAlongM or kRasterAlongN, and CUTLASS max_swizzle_size.
struct TileOrder {
  int raster;
  int swizzle;
};
// The order for kRasterAuto: the direction and swizzle whose wave of sm_count tiles touches the fewest A and B
// bytes, among those that pad the tile grid by at most ~1% (CUTLASS rounds both grid dims up to
// swizzle * cluster, and padded tiles cost full compute).
TileOrder auto_tile_order(int64_t M, int64_t N, int tile_m, int tile_n, int cluster_m, int cluster_n, int sm_count);

// Band height (in cluster rows) for the hand-written kernels' tile walk (gemm_sm90_wgmma.cu, TileWalk): a grid of
// block_rows x block_cols clusters of block_m x block_n outputs, wave_blocks clusters resident at once, depth k, on
// a card with l2_bytes of L2.
int wgmma_band_rows(int64_t block_rows, int64_t block_cols, int64_t block_m, int64_t block_n, int64_t wave_blocks,
                    int64_t k, int64_t l2_bytes);

}  // namespace sm90
}  // namespace fdm
