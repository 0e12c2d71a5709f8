// linear on Hopper (sm_90a): the dispatch to the kernel of a configuration (gemm.cuh, kSm90Configs), the tile
// order model behind kRasterAuto, and the stream-K workspace. The kernels themselves are
// gemm_sm90_<kernel>.cu, one translation unit each, built from the template in gemm_sm90_kernel.cuh (CUTLASS), and
// gemm_sm90_wgmma.cu (hand-written PTX).
#include "gemm_sm90_dispatch.cuh"

#include <mutex>

namespace fdm {
namespace sm90 {
namespace {

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// CUTLASS's own cap on the swizzle (PersistentTileSchedulerSm90Params::get_log_swizzle_size).
int cutlass_log_swizzle(int64_t ctas_m, int64_t ctas_n, int max_swizzle) {
  const int64_t d = ctas_m < ctas_n ? ctas_m : ctas_n;
  if (max_swizzle >= 8 && d >= 6) return 3;
  if (max_swizzle >= 4 && d >= 3) return 2;
  if (max_swizzle >= 2 && d >= 2) return 1;
  return 0;
}

// Tiles one wave touches, walking `major_tiles` deep in the raster direction over groups of `group` tiles across.
// Returns (tiles along the walk, tiles across).
void wave_footprint(int64_t wave_ctas, int64_t major_tiles, int64_t minor_tiles, int64_t group, int64_t* along,
                    int64_t* across) {
  const int64_t per_group = major_tiles * group;
  if (wave_ctas <= per_group) {
    *along = ceil_div(wave_ctas, group);
    *across = group;
  } else {
    *along = major_tiles;
    *across = ceil_div(wave_ctas, per_group) * group;
  }
  if (*along > major_tiles) *along = major_tiles;
  if (*across > minor_tiles) *across = minor_tiles;
}

// ---- stream-K workspace ------------------------------------------------------------------------------------------
// One buffer per (device, stream), grown in stream order and kept: stream-K kernels on one stream run one after
// another, so they can share it, while concurrent streams each get their own. Stream-ordered allocation keeps it
// off the host's critical path. During graph capture nothing is allocated, but a buffer that is already large
// enough is handed out (the eager call before a capture sizes it) and marked: a captured buffer is never freed when
// the slot grows later (it is left to the graphs that use it), so a captured pointer cannot dangle. A captured GEMM
// whose stream has no large-enough buffer runs data-parallel.
struct StreamWorkspace {
  int device = -1;
  cudaStream_t stream = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool captured = false;
};
constexpr int kWorkspaceSlots = 16;
constexpr size_t kWorkspaceGranule = size_t(4) << 20;
std::mutex g_workspace_mutex;
StreamWorkspace g_workspaces[kWorkspaceSlots];

}  // namespace

void* stream_workspace(size_t bytes, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();  // clear it: the caller runs without a workspace
    return nullptr;
  }
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(g_workspace_mutex);
  StreamWorkspace* slot = nullptr;
  for (StreamWorkspace& w : g_workspaces) {
    if (w.device == device && w.stream == stream) {
      slot = &w;
      break;
    }
    if (!slot && w.device < 0) slot = &w;
  }
  if (!slot) return nullptr;  // more streams than slots: the rest run data-parallel
  if (slot->device == device && slot->stream == stream && slot->bytes >= bytes) {
    slot->captured = slot->captured || capturing;
    return slot->ptr;
  }
  if (capturing) return nullptr;
  // A buffer a graph captured stays allocated for that graph (a small, bounded leak per growth).
  if (slot->ptr && !slot->captured && cudaFreeAsync(slot->ptr, stream) != cudaSuccess) cudaGetLastError();
  *slot = StreamWorkspace{};
  const size_t want = size_t(round_up(int64_t(bytes), int64_t(kWorkspaceGranule)));
  void* ptr = nullptr;
  if (cudaMallocAsync(&ptr, want, stream) != cudaSuccess) {
    cudaGetLastError();  // out of memory is not sticky; run data-parallel instead
    return nullptr;
  }
  *slot = StreamWorkspace{device, stream, ptr, want};
  return ptr;
}

TileOrder auto_tile_order(int64_t M, int64_t N, int tile_m, int tile_n, int cluster_m, int cluster_n, int sm_count) {
  const int64_t tiles_m = round_up(ceil_div(M, tile_m), cluster_m);
  const int64_t tiles_n = round_up(ceil_div(N, tile_n), cluster_n);
  const int64_t wave = sm_count > 0 ? sm_count : 1;
  struct Candidate {
    TileOrder order;
    int64_t bytes;  // A rows + B columns one wave touches, in elements per unit of K
    int log_swizzle;
  };
  Candidate best[4];  // the best direction for each swizzle
  int count = 0;
  for (int log_s = 0; log_s <= 3; ++log_s) {
    if (cutlass_log_swizzle(tiles_m, tiles_n, 1 << log_s) != log_s) continue;
    const int64_t pm = round_up(tiles_m, (int64_t(1) << log_s) * cluster_m);
    const int64_t pn = round_up(tiles_n, (int64_t(1) << log_s) * cluster_n);
    if (log_s > 0 && pm * pn * 100 > tiles_m * tiles_n * 101) continue;  // padded tiles cost full compute
    int64_t rows = 0, cols = 0;
    wave_footprint(wave, pm, pn, (int64_t(1) << log_s) * cluster_n, &rows, &cols);
    const int64_t along_m = rows * tile_m + cols * tile_n;
    wave_footprint(wave, pn, pm, (int64_t(1) << log_s) * cluster_m, &cols, &rows);
    const int64_t along_n = rows * tile_m + cols * tile_n;
    best[count++] = along_m <= along_n ? Candidate{{kRasterAlongM, 1 << log_s}, along_m, log_s}
                                       : Candidate{{kRasterAlongN, 1 << log_s}, along_n, log_s};
  }
  // The least traffic, but no larger swizzle than needed to come within 10% of it (padding risk, L2 locality of
  // the epilogue). count >= 1: swizzle 1 always qualifies.
  int64_t least = best[0].bytes;
  for (int i = 1; i < count; ++i) least = best[i].bytes < least ? best[i].bytes : least;
  for (int i = 0; i < count; ++i)
    if (best[i].bytes * 10 <= least * 11) return best[i].order;
  return best[0].order;
}

int wgmma_band_rows(int64_t block_rows, int64_t block_cols, int64_t block_m, int64_t block_n, int64_t wave_blocks,
                    int64_t k, int64_t l2_bytes) {
  // Inputs (x rows + w columns, per unit of K) that the first wave reads, for bands of 1, 2, 4, 8, 16 cluster rows
  // (the walk goes down a band's rows, then along N: a band is the "group across" of wave_footprint).
  int64_t reads[5];
  int count = 0;
  for (int64_t band = 1; count < 5; band *= 2) {
    int64_t cols = 0, rows = 0;
    wave_footprint(wave_blocks > 0 ? wave_blocks : 1, block_cols, block_rows, band, &cols, &rows);
    reads[count++] = rows * block_m + cols * block_n;
    if (band >= block_rows) break;  // taller bands walk the same order
  }
  int least = 0;
  for (int i = 1; i < count; ++i)
    if (reads[i] <= reads[least]) least = i;  // ties to the taller band
  // Bands of one cluster row when their first wave's inputs (16-bit) fit in the L2 and are at most 1.5x the
  // least-reading band's; else the least-reading band. H100, session 17 (interleaved rounds, docs/kernel_notes.md):
  // one-row bands were 2-5% faster than bands of 8 on every SDXL shape (2048 x 5120 -> 1280: 0.0399 -> 0.0382 ms)
  // and ~1% on FLUX's 3072 -> 3072; where they read 2-3x the least (FLUX qkv, 2048 x 1280 -> 10240, Wan ff up) they
  // were ~5% slower, and where a wave's inputs exceed the L2 (FLUX's and Wan's long-K projections) 0.5-2% slower.
  // Why one-row bands win when the reads are about equal (neighbouring clusters in launch order then share x rows
  // while the cluster's multicast shares w) is not established.
  const bool one_row = reads[0] * 2 <= reads[least] * 3 && reads[0] * k * 2 <= l2_bytes;
  return one_row ? 1 : 1 << least;
}

}  // namespace sm90

int linear_sm90(const LinearProblem& p, const Sm90Config& config, int sm_count, cudaStream_t stream) {
  if ((p.gate != nullptr) != (p.residual != nullptr)) return kGemmNotSupported;
  if (p.gate && (p.rows_per_gate < p.M || p.act != kActNone)) return kGemmNotSupported;
  if (p.gate && !sm90_config_takes_gate(config)) return kGemmNotSupported;
  if (p.K % 8 || p.N % 8 || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return kGemmNotSupported;
  if (p.dtype != FDM_BF16 && p.dtype != FDM_F16) return kGemmNotSupported;
  for (const void* ptr : {p.x, p.w, p.bias, p.gate, p.residual, static_cast<const void*>(p.out)})
    if (ptr && !aligned16(ptr)) return kGemmNotSupported;
  switch (config.kernel) {
    case kSm90Coop128x256: return sm90::run_coop128x256(p, config, sm_count, stream);
    case kSm90Coop256x128: return sm90::run_coop256x128(p, config, sm_count, stream);
    case kSm90Coop128x128: return sm90::run_coop128x128(p, config, sm_count, stream);
    case kSm90Pingpong128x128: return sm90::run_pingpong128x128(p, config, sm_count, stream);
    case kSm90Pingpong128x128C2: return sm90::run_pingpong128x128c2(p, config, sm_count, stream);
    case kSm90Coop128x256Lean: return sm90::run_coop128x256lean(p, config, sm_count, stream);
    case kSm90Coop128x160: return sm90::run_coop128x160(p, config, sm_count, stream);
    case kSm90Coop192x192: return sm90::run_coop192x192(p, config, sm_count, stream);
    case kSm90Coop192x192Lean: return sm90::run_coop192x192lean(p, config, sm_count, stream);
    case kSm90Wgmma128x256: return sm90::run_wgmma128x256(p, config, sm_count, stream);
    case kSm90Wgmma192x192: return sm90::run_wgmma192x192(p, config, sm_count, stream);
    case kSm90Wgmma128x160: return sm90::run_wgmma128x160(p, config, sm_count, stream);
    case kSm90Wgmma128x160C2x2: return sm90::run_wgmma128x160c2x2(p, config, sm_count, stream);
    default: return kGemmNotSupported;
  }
}

}  // namespace fdm
