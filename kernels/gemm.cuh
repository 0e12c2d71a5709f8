// Shared declarations of the GEMM family: the entry points live in gemm.cu, which picks one of
//   sm90  kernels/sm90/gemm_sm90*.cu   CUTLASS 3.x TMA warp-specialized kernels (Hopper, 16-bit, aligned)
//   sm80  kernels/gemm_sm80*.cu        CUTLASS 2.x multistage tensor-op kernels (Ampere+, 16-bit, aligned)
//   simt  kernels/gemm_simt.cu         a plain tiled kernel: any alignment, any stride, fp32 too
//   gemv  kernels/gemv.cu              a warp per output column, for x of at most kGemvMaxRows rows (16-bit)
// Every path computes in float32 and applies the same epilogue functions (below), so results agree to rounding.
#pragma once
#include "common.cuh"

namespace fdm {

// Activation codes of the C ABI (fdm_linear's `act`); runtime/ops/cuda/gemm.py mirrors them.
enum GemmAct : int { kActNone = 0, kActGeluTanh = 1, kActGelu = 2, kActSilu = 3 };

// Which kernel family ran last / is forced (fdm_gemm_set_path, fdm_gemm_last_path; used by tests).
enum GemmPath : int { kPathAuto = 0, kPathSm90 = 1, kPathSm80 = 2, kPathSimt = 3, kPathGemv = 4 };

// Internal status of a path that cannot take a problem (alignment, size): the caller tries the next path.
// Never returned through the C ABI.
constexpr int kGemmNotSupported = -1000;

inline bool is_16bit(int dtype) { return dtype == FDM_BF16 || dtype == FDM_F16; }

__host__ __device__ __forceinline__ float apply_act(float x, int act) {
  // Accurate libm functions (no fast-math): fp32 results are checked to 1e-5.
  switch (act) {
    case kActGeluTanh: {
      const float k0 = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
    }
    case kActGelu: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case kActSilu: return x / (1.0f + expf(-x));
    default: return x;
  }
}

// One linear problem: out[M, N] = residual + gate[m / rows_per_gate] * act(x[M, K] @ w[N, K]^T + bias[N]).
// bias may be null (zero); gate/residual are both null (plain linear) or both set (gated residual; act must
// be none). All tensors are contiguous row-major of the same 16-bit or fp32 dtype.
struct LinearProblem {
  const void* x = nullptr;         // [M, K]
  const void* w = nullptr;         // [N, K]
  const void* bias = nullptr;      // [N] or null
  const void* gate = nullptr;      // [M / rows_per_gate, N] or null
  const void* residual = nullptr;  // [M, N] or null
  void* out = nullptr;             // [M, N]
  int64_t M = 0, N = 0, K = 0;
  int64_t rows_per_gate = 1;
  int act = kActNone;
  int dtype = FDM_BF16;
};

// A strided batched problem for the SIMT kernel: D[b](m, n) = epilogue(sum_k A[b](m, k) * B[b](k, n)).
// Element (m, k) of A[b] is at a + b*a_batch + m*a_m + k*a_k (in elements); likewise B and D (d_n == 1).
struct SimtProblem {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const void* bias = nullptr;      // [N] or null
  const void* gate = nullptr;      // [batch rows / rows_per_gate, N] or null (then residual is set too)
  const void* residual = nullptr;  // like D
  int64_t M = 0, N = 0, K = 0, batch = 1;
  int64_t a_m = 0, a_k = 0, a_batch = 0;
  int64_t b_k = 0, b_n = 0, b_batch = 0;
  int64_t d_m = 0, d_batch = 0;
  int64_t rows_per_gate = 1;
  int act = kActNone;
  int dtype = FDM_F32;
};

// Device facts the dispatch needs, queried once per device.
struct DeviceFacts {
  int cc_major = 0, cc_minor = 0, sm_count = 0;
  int l2_mib = 0;      // L2 size: tells an H100 (50 MiB) from an H200 (60) for per-card GEMM winners
  int smem_optin = 0;  // bytes of dynamic shared memory a block may opt into
};
int current_device_facts(DeviceFacts* facts);  // cudaError_t as int

// ---- sm90 configurations -------------------------------------------------------------------------------------
// A configuration is one CUTLASS kernel (compiled once per 16-bit dtype, one kernels/sm90/gemm_sm90_<kernel>.cu
// each) plus run-time scheduler settings that cost no extra compile: the work decomposition (stream-K needs the
// kernel built with CUTLASS's stream-K scheduler) and the tile order (raster direction, swizzle).
// gemm.cu picks one per problem (its table of measured winners, then rules); bench/gemm_sweep.py times them all
// through fdm_gemm_sm90_set_config.
enum Sm90Kernel : int {
  kSm90Coop128x256 = 0,  // cooperative 128x256x64, cluster 2x1 (B multicast), stream-K scheduler
  kSm90Coop256x128,      // cooperative 256x128x64, cluster 1x2 (A multicast), stream-K scheduler
  kSm90Coop128x128,      // cooperative 128x128x64, cluster 1x1, stream-K scheduler
  kSm90Pingpong128x128,  // ping-pong 128x128x64, cluster 1x1, persistent scheduler (no stream-K)
  kSm90Pingpong128x128C2,  // ping-pong 128x128x64, cluster 2x1, persistent scheduler (no stream-K)
  kSm90Coop128x256Lean,  // kSm90Coop128x256 with an epilogue that never reads C: plain linear only (no gate)
  kSm90Coop128x160,      // cooperative 128x160x64, cluster 1x1, stream-K scheduler: N = 640 / 1280 / 3840 in
                         // whole tiles, and a 2048 x 1280 output in 128 tiles (one wave on 132 SMs)
  kSm90Coop192x192,      // cooperative 192x192x64, cluster 2x1 (B multicast), stream-K scheduler, the warp groups
                         // splitting the tile along N (192x96 each): cuBLAS's tiling for the large FLUX GEMMs
  kSm90Coop192x192Lean,  // kSm90Coop192x192 with the epilogue that never reads C: plain linear only (no gate)
  // Hand-written PTX kernels (gemm_sm90_wgmma.cu), plain linears and gated residuals, always data-parallel;
  // `swizzle` is the height of the band of cluster rows the tiles walk down before moving along N, 0 to choose it
  // per launch (sm90::wgmma_band_rows in gemm_sm90.cu).
  kSm90Wgmma128x256,  // 128x256x64, cluster 2x1 (B multicast), warp groups splitting M (64x256 wgmmas)
  kSm90Wgmma192x192,  // 192x192x64, cluster 2x1 (B multicast), warp groups splitting N (64x96 wgmmas)
  kSm90Wgmma128x160,  // 128x160x64, cluster 2x1 (B multicast), warp groups splitting M (64x160 wgmmas)
  kSm90Wgmma128x160C2x2,  // kSm90Wgmma128x160 in clusters of 2x2 tiles (A and B multicast: ~30% fewer L2 reads)
  kSm90KernelCount
};

enum Sm90Decomp : int {
  kDecompDataParallel = 0,  // one CTA per output tile (no workspace)
  kDecompHeuristic,         // CUTLASS's choice: stream-K / split-K over the last partial wave, else data-parallel
  kDecompStreamK,           // stream-K whenever the tiles do not fill whole waves
};

enum Sm90Raster : int {
  kRasterAuto = 0,  // direction and swizzle from a DRAM-traffic estimate (sm90_auto_raster in gemm_sm90.cu)
  kRasterAlongM,    // consecutive CTAs walk down M (reuse a few B column blocks); the only order of the wgmma kernels
  kRasterAlongN,    // consecutive CTAs walk along N (reuse a few A row blocks)
};

struct Sm90Config {
  Sm90Kernel kernel;
  Sm90Decomp decomp;
  Sm90Raster raster;
  int swizzle;  // CUTLASS max_swizzle_size (1, 2, 4, 8); ignored with kRasterAuto, which picks its own. The wgmma
                // kernels: band height in cluster rows, 0 = chosen per launch
};

// Every configuration, by index (fdm_gemm_sm90_set_config, the winners table in gemm.cu). Append new ones at the
// end so recorded indices keep their meaning.
inline constexpr Sm90Config kSm90Configs[] = {
    {kSm90Coop128x256, kDecompDataParallel, kRasterAuto, 1},       // 0
    {kSm90Coop128x256, kDecompDataParallel, kRasterAlongM, 1},     // 1
    {kSm90Coop128x256, kDecompDataParallel, kRasterAlongN, 1},     // 2
    {kSm90Coop128x256, kDecompDataParallel, kRasterAlongM, 4},     // 3
    {kSm90Coop128x256, kDecompDataParallel, kRasterAlongN, 4},     // 4
    {kSm90Coop128x256, kDecompHeuristic, kRasterAuto, 1},          // 5
    {kSm90Coop128x256, kDecompStreamK, kRasterAuto, 1},            // 6
    {kSm90Coop256x128, kDecompDataParallel, kRasterAuto, 1},       // 7
    {kSm90Coop256x128, kDecompHeuristic, kRasterAuto, 1},          // 8
    {kSm90Coop128x128, kDecompDataParallel, kRasterAuto, 1},       // 9
    {kSm90Coop128x128, kDecompHeuristic, kRasterAuto, 1},          // 10
    {kSm90Coop128x128, kDecompStreamK, kRasterAuto, 1},            // 11
    {kSm90Pingpong128x128, kDecompDataParallel, kRasterAuto, 1},   // 12
    {kSm90Pingpong128x128, kDecompDataParallel, kRasterAlongM, 1}, // 13
    {kSm90Pingpong128x128C2, kDecompDataParallel, kRasterAuto, 1}, // 14
    {kSm90Coop128x256Lean, kDecompDataParallel, kRasterAuto, 1},   // 15
    {kSm90Coop128x256Lean, kDecompHeuristic, kRasterAuto, 1},      // 16
    {kSm90Coop128x160, kDecompDataParallel, kRasterAuto, 1},       // 17
    {kSm90Coop128x160, kDecompHeuristic, kRasterAuto, 1},          // 18
    {kSm90Coop128x160, kDecompStreamK, kRasterAuto, 1},            // 19
    {kSm90Coop192x192, kDecompDataParallel, kRasterAuto, 1},       // 20
    {kSm90Coop192x192, kDecompHeuristic, kRasterAuto, 1},          // 21
    {kSm90Coop192x192Lean, kDecompDataParallel, kRasterAuto, 1},   // 22
    {kSm90Coop192x192Lean, kDecompHeuristic, kRasterAuto, 1},      // 23
    {kSm90Wgmma128x256, kDecompDataParallel, kRasterAlongM, 0},    // 24
    {kSm90Wgmma128x256, kDecompDataParallel, kRasterAlongM, 16},   // 25
    {kSm90Wgmma192x192, kDecompDataParallel, kRasterAlongM, 0},    // 26
    {kSm90Wgmma192x192, kDecompDataParallel, kRasterAlongM, 16},   // 27
    {kSm90Wgmma128x160, kDecompDataParallel, kRasterAlongM, 0},    // 28
    {kSm90Wgmma128x160C2x2, kDecompDataParallel, kRasterAlongM, 0},  // 29
};
inline constexpr int kSm90ConfigCount = int(sizeof(kSm90Configs) / sizeof(kSm90Configs[0]));

// The C-reading kernel of the same tiling that serves a lean (C-free epilogue) kernel's gated problems; any other
// kernel itself.
inline constexpr Sm90Kernel sm90_full_kernel(Sm90Kernel k) {
  return k == kSm90Coop128x256Lean ? kSm90Coop128x256 : k == kSm90Coop192x192Lean ? kSm90Coop192x192 : k;
}

// Whether a configuration can run gated problems (gate/residual set): the lean epilogues have no C operand.
inline constexpr bool sm90_config_takes_gate(const Sm90Config& c) { return sm90_full_kernel(c.kernel) == c.kernel; }

// sm90 (kernels/sm90/gemm_sm90*.cu; declared only where they are compiled in). Returns kGemmNotSupported when
// the configuration cannot take the problem (alignment, sizes, a gate on the lean kernel).
#ifdef FASTDM_HAS_SM90
int linear_sm90(const LinearProblem& p, const Sm90Config& config, int sm_count, cudaStream_t stream);
#endif

// sm80 (gemm_sm80.cu): act(x @ w^T + bias) only (gate/residual must be null).
int linear_sm80(const LinearProblem& p, int sm_count, cudaStream_t stream);
// sm80 (gemm_sm80_batched.cu): C[b] = A[b] @ B[b], all row-major, packed; b_batch 0 = B shared.
int matmul_sm80(const void* a, const void* b, void* c, int64_t batch, int64_t M, int64_t N, int64_t K,
                int64_t b_batch, int dtype, cudaStream_t stream);

// gemv (gemv.cu): act(x @ w^T + bias) for 1 <= M <= kGemvMaxRows, 16-bit, K % 8 == 0, x and w 16-byte aligned,
// no gate; gemv_takes says whether it applies.
constexpr int64_t kGemvMaxRows = 4;
bool gemv_takes(const LinearProblem& p);
int linear_gemv(const LinearProblem& p, int sm_count, cudaStream_t stream);

// simt (gemm_simt.cu)
int gemm_simt(const SimtProblem& p, cudaStream_t stream);
// out[m, n] = residual[m, n] + gate[m / rows_per_gate, n] * out[m, n], in place (gemm_simt.cu).
int gated_residual_inplace(void* out, const void* gate, const void* residual, int64_t M, int64_t N,
                           int64_t rows_per_gate, int dtype, cudaStream_t stream);

// The dispatching linear (gemm.cu); conv2d (im2col.cu) calls it too.
int linear_dispatch(const LinearProblem& p, cudaStream_t stream);

}  // namespace fdm
