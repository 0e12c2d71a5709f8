// GEMM entry points of the C ABI and the choice of kernel family (see gemm.cuh):
//   16-bit on an sm90 device:  sm90 CUTLASS 3.x kernels, else sm80 CUTLASS 2.x kernels, else the SIMT kernel
//   16-bit on sm80..sm89:      sm80 kernels, else SIMT
//   fp32, odd K or N, unaligned pointers:  SIMT (exact fp32, any alignment)
// A path that cannot take a problem answers kGemmNotSupported and the next one is tried; results agree to
// rounding because every path accumulates in fp32 and applies the same epilogue.
// On sm90 one of several CUTLASS configurations runs (gemm.cuh, kSm90Configs): choose_sm90_config below picks it
// from a table of measured winners (bench/gemm_sweep.py), else by rules.
#include "gemm.cuh"
#ifdef FASTDM_HAS_SM90
#include "sm90/gemm_sm90_dispatch.cuh"  // sm90::wgmma_band_rows (a host-only query below)
#endif

#include <mutex>
#include <vector>

namespace fdm {
namespace {

int g_force_path = kPathAuto;  // fdm_gemm_set_path (tests)
int g_last_path = kPathAuto;   // fdm_gemm_last_path (tests)
int g_sm90_force_config = -1;  // fdm_gemm_sm90_set_config (tests, bench/gemm_sweep.py); -1 = choose
int g_sm90_last_config = -1;   // fdm_gemm_sm90_last_config

constexpr int kMaxDevices = 64;
std::mutex g_facts_mutex;
DeviceFacts g_facts[kMaxDevices];
bool g_facts_known[kMaxDevices] = {};

SimtProblem simt_linear(const LinearProblem& p) {
  SimtProblem s;
  s.a = p.x;
  s.b = p.w;
  s.d = p.out;
  s.bias = p.bias;
  s.gate = p.gate;
  s.residual = p.residual;
  s.M = p.M;
  s.N = p.N;
  s.K = p.K;
  s.a_m = p.K;
  s.a_k = 1;
  s.b_k = 1;  // B(k, n) = w[n, k]
  s.b_n = p.K;
  s.d_m = p.N;
  s.rows_per_gate = p.rows_per_gate;
  s.act = p.act;
  s.dtype = p.dtype;
  return s;
}

#ifdef FASTDM_HAS_SM90
// ---- which sm90 configuration runs a problem -------------------------------------------------------------------
// Named indices into kSm90Configs (gemm.cuh) that the rules below use; checked against the table at compile time.
constexpr int kCfgCoop128x256Dp = 0;      // coop 128x256 c2x1, data-parallel, auto tile order
constexpr int kCfgCoop128x256Sk = 5;      // coop 128x256 c2x1, stream-K over a partial last wave
constexpr int kCfgCoop128x128Sk = 10;     // coop 128x128 c1x1, stream-K over a partial last wave
constexpr int kCfgPingpong128x128 = 12;   // ping-pong 128x128 c1x1, data-parallel, auto tile order
constexpr int kCfgWgmma128x256 = 24;      // hand-written wgmma 128x256 c2x1, bands chosen per launch
constexpr int kCfgWgmma192x192 = 26;      // hand-written wgmma 192x192 c2x1 n-split, bands chosen per launch
constexpr int kCfgWgmma128x160 = 28;      // hand-written wgmma 128x160 c2x1, bands chosen per launch
static_assert(kSm90Configs[kCfgCoop128x256Dp].kernel == kSm90Coop128x256 &&
              kSm90Configs[kCfgCoop128x256Dp].decomp == kDecompDataParallel &&
              kSm90Configs[kCfgCoop128x256Dp].raster == kRasterAuto);
static_assert(kSm90Configs[kCfgCoop128x256Sk].kernel == kSm90Coop128x256 &&
              kSm90Configs[kCfgCoop128x256Sk].decomp == kDecompHeuristic &&
              kSm90Configs[kCfgCoop128x256Sk].raster == kRasterAuto);
static_assert(kSm90Configs[kCfgCoop128x128Sk].kernel == kSm90Coop128x128 &&
              kSm90Configs[kCfgCoop128x128Sk].decomp == kDecompHeuristic);
static_assert(kSm90Configs[kCfgPingpong128x128].kernel == kSm90Pingpong128x128 &&
              kSm90Configs[kCfgPingpong128x128].raster == kRasterAuto);
static_assert(kSm90Configs[kCfgWgmma128x256].kernel == kSm90Wgmma128x256 &&
              kSm90Configs[kCfgWgmma128x256].swizzle == 0);
static_assert(kSm90Configs[kCfgWgmma192x192].kernel == kSm90Wgmma192x192 &&
              kSm90Configs[kCfgWgmma192x192].swizzle == 0);
static_assert(kSm90Configs[kCfgWgmma128x160].kernel == kSm90Wgmma128x160 &&
              kSm90Configs[kCfgWgmma128x160].swizzle == 0);

// THE TABLE OF WINNERS: for an exact (M, N, K), the configurations bench/gemm_sweep.py measured fastest, for the
// plain linear (with or without an activation epilogue) and for the gated residual (-1: the plain winner, or its
// C-reading sibling when that is the lean kernel). The sweep prints rows in this form; paste them here. Shapes not
// listed go by sm90_rule. (Session 8 kept a third column for activation epilogues; once the 192x192 lean kernel
// won gelu_tanh too, no row differed from its plain winner by more than the sweep's noise, and it was dropped.)
// l2_mib: the L2 size (MiB) of the card a row is for; 0 = any card. Untagged rows were swept on an H200; a row
// tagged with a card's L2 size takes precedence on that card, where its sweep found a different winner by a margin
// well above the noise.
struct Sm90Winner {
  int64_t M, N, K;
  int plain, gated;
  int l2_mib = 0;
};
constexpr Sm90Winner kSm90Winners[] = {
    // Measured by bench/gemm_sweep.py on an H200 (2026-11-26, bf16; docs/benchmarks.md): the fastest configuration
    // per shape, {M, N, K, plain, gated}. Times: fastdm vs cuBLAS (gated: vs torch's linear + mul + add; gelu_tanh:
    // vs linear + gelu_tanh), one sweep; differences under ~4% are run-to-run noise. Rows marked "s13" were re-swept
    // in session 13 with the hand-written kernels (configs 24-28; ratios torch/fastdm, > 1 = fastdm faster).
    // FLUX.1 1024x1024: 4096 image + 512 text tokens
    {4608, 9216, 3072, 24, -1},    // qkv, s13: 0.98x (CUTLASS 22: 0.88x)
    {4608, 12288, 3072, 12, -1},   // mlp up, s13: 0.94x, gelu_tanh 1.04x (wgmma 27: 0.94 / 1.00x; 22: 0.89 / 0.90x)
    {4608, 3072, 12288, 26, 5},    // mlp down, s13: 1.02x (CUTLASS 16: 0.94x); gated 1.14x
    {4608, 3072, 15360, 26, 5},    // single-block out, s13: 1.01x (CUTLASS 20: 0.97x); gated 1.05x
    {4608, 3072, 3072, 26, 14},    // attention out, s13: 0.98x (CUTLASS 14: 0.96x); gated 1.40x
    // FLUX.1 1024x1024 double-stream blocks, image stream (4096 rows) and text stream (512 rows) apart; the rule
    // picked configurations 5 / 10 here, 5-40% slower
    {4096, 9216, 3072, 24, -1},    // img qkv, s13: 0.99x (CUTLASS 12: 0.98x)
    {4096, 12288, 3072, 12, -1},   // img mlp up, s13: 0.98x, gelu_tanh 1.11x (wgmma 24: 0.98 / 1.01x)
    {4096, 3072, 12288, 24, 5},    // img mlp down, s13: 1.06x (CUTLASS 8: 0.96x); gated 1.08x
    {4096, 3072, 3072, 24, 12},    // img attention out, s13: 1.02x (CUTLASS 12: 1.01x); gated 1.41x
    {512, 9216, 3072, 28, -1},     // txt qkv, s13: 0.91x (CUTLASS 11: 0.81x)
    {512, 12288, 3072, 12, -1},    // txt mlp up: 0.058 vs 0.056; gelu_tanh 0.059 vs 0.064 (rule: 0.083)
    {512, 3072, 12288, 11, 11},    // txt mlp down: 0.061 vs 0.055; gated 0.062 vs 0.064
    {512, 3072, 3072, 9, 10},      // txt attention out: 0.022 vs 0.016; gated 0.022 vs 0.025
    // SDXL 1024x1024, batch 2 (CFG). Gated: the UNet's residual projections (gate = ones, batch folded into rows)
    {8192, 5120, 640, 24, -1},     // 64x64 ff up, s13: 1.03x (CUTLASS 12: 1.02x); H100 s17: 0.0881 ms with one-row
                                   // bands (bands of 16, config 25, the H100 row until s17: 0.0898)
    {2048, 10240, 1280, 13, -1},   // 32x32 ff up: 0.077 vs 0.076 (s13: 1.00x; wgmma 24: 0.99x)
    {2048, 1280, 5120, 28, 17},    // 32x32 ff down, s13: 0.94x (CUTLASS 17: 0.90x); gated 1.22x
    {8192, 640, 640, 28, 12},      // 64x64 attention projections, s13: 0.96x (CUTLASS 12: 0.80x); gated 1.74x
    {2048, 1280, 1280, 28, 17},    // 32x32 attention projections, s13: 0.86x (CUTLASS 17: 0.75x); gated 1.44x
    {2048, 3840, 1280, 12, -1},    // 32x32 qkv: 0.033 vs 0.032 (s13: 0.93x; wgmma 28: 0.94x)
    {8192, 1920, 640, 28, -1},     // 64x64 qkv, s13: 0.93x (CUTLASS 14: 0.91x)
    {8192, 640, 2560, 28, 18},     // 64x64 ff down, s13: 0.94x (CUTLASS 18: 0.88x); gated 1.31x
    // Wan2.2-TI2V-5B 704x1280x121
    {27280, 14336, 3072, 26, -1},  // ff up, s13: 0.96x (CUTLASS 14: 0.91x)
    {27280, 3072, 14336, 16, -1},  // ff down: 3.531 vs 3.478 (s13: 0.99x; wgmma 24: 0.99x)
    // H100 80GB HBM3 (50 MiB L2), session 13, where the H100's winner differs from the row above: the mean
    // torch/fastdm ratio over two or three H100 sweeps (single sweeps move +-5%; docs/benchmarks.md "session 13").
    {4608, 12288, 3072, 27, -1, 50},   // FLUX mlp up: 0.97 / 0.95 / 0.89x; gelu_tanh 1.00 / 1.07 / 1.00x
    {4608, 3072, 3072, 26, 26, 50},    // FLUX attention out: 0.97 / 0.97x (CUTLASS 22: 0.96 / 0.96x); gated s16
    {4096, 12288, 3072, 24, -1, 50},   // FLUX double img mlp up: 0.96 / 0.97x; gelu_tanh 1.14 / 1.03x
    // Session 16, gated forms after the hand-written 192x192 kernels stopped spilling: medians of 12 interleaved
    // rounds (every candidate in turn, so clock and power drift hit all alike), ms, vs the previous choice.
    {4608, 3072, 12288, 26, 26, 50},   // FLUX mlp down gated: 0.470 (CUTLASS 5: 0.488, 21: 0.485)
    {4608, 3072, 15360, 26, 26, 50},   // FLUX single out gated: 0.594 (CUTLASS 5: 0.615, 21: 0.601)
    {4096, 3072, 12288, 24, -1, 50},   // FLUX double img mlp down gated: 0.416 (CUTLASS 5: 0.426)
    {4096, 3072, 3072, 24, -1, 50},    // FLUX double img attention out gated: 0.115 (CUTLASS 12: 0.131)
    // (8192 x 640 -> 640 above: gated 0.0193, CUTLASS 17: 0.0215, 12: 0.0211)
    {2048, 1280, 1280, 28, -1, 50},    // SDXL 32x32 attention projections gated: 0.0152 (CUTLASS 17: 0.0161)
    {2048, 10240, 1280, 25, -1, 50},   // SDXL 32x32 ff up: 0.94 / 0.96x (CUTLASS 16: 0.90x)
    {8192, 640, 640, 28, -1, 50},      // SDXL 64x64 attention projections: 1.00x (CUTLASS 12: 0.70 / 0.82x); gated s16
    {2048, 3840, 1280, 28, -1, 50},    // SDXL 32x32 qkv: 0.94x (wgmma 128x256: 0.90 / 0.93x; CUTLASS 16: 0.88x)
    {8192, 1920, 640, 24, -1, 50},     // SDXL 64x64 qkv: 1.01 / 1.00x (CUTLASS 14: 0.96x)
    {8192, 640, 2560, 28, 17, 50},     // SDXL 64x64 ff down: 0.90x (CUTLASS 17: 0.88 / 0.89x)
    {1976, 1280, 1280, 28, -1, 50},    // SDXL 832x1216 26x38 attention projections: 0.80x (CUTLASS 17: 0.72x)
    {1976, 3840, 1280, 25, -1, 50},    // SDXL 832x1216 26x38 qkv: 0.87 / 0.90 / 0.90x (CUTLASS 16: 0.85x)
    {7904, 640, 2560, 28, -1, 50},     // SDXL 832x1216 52x76 ff down: 0.91x (CUTLASS 17: 0.88 / 0.89x)
    // Session 23, Wan ff (three interleaved sweeps, 6 / 12 / 8 rounds, two machine starts): up, the hand-written
    // 128x256 0.976 / 0.974 / 1.000x against the untagged row's 192x192 0.974 / 0.960 / 0.982x; down now goes by the
    // untagged row (CUTLASS 128x256 lean stream-K: 0.995 / 0.992 / 0.989x), which session 13's H100 sweeps had not
    // compared with the hand-written 128x256 (0.954 / 0.968 / 0.973x here).
    {27280, 14336, 3072, 24, -1, 50},  // Wan ff up: 0.976 / 0.974 / 1.000x (192x192 ptx 26: 0.974 / 0.960 / 0.982x)
    // Session 17, FLUX's double-block text stream (6 interleaved rounds, ms): the H200's CUTLASS picks above ran
    // 6-25% behind ping-pong 128x128 in clusters of two here.
    {512, 3072, 12288, 14, 14, 50},    // txt mlp down: 0.0685 (11: 0.0849); gated 0.0686 (11: 0.0860)
    {512, 12288, 3072, 14, -1, 50},    // txt mlp up: 0.0577 (12: 0.0615); gelu_tanh 0.0604 (12: 0.0630)
};

constexpr bool winners_valid() {
  for (const Sm90Winner& w : kSm90Winners) {
    if (w.plain < 0 || w.plain >= kSm90ConfigCount || w.gated < -1 || w.gated >= kSm90ConfigCount) return false;
    if (w.gated >= 0 && !sm90_config_takes_gate(kSm90Configs[w.gated])) return false;
  }
  return true;
}
static_assert(winners_valid(), "kSm90Winners names a configuration that does not exist or cannot take a gate");

// Shapes without a measured winner.
int sm90_rule(const LinearProblem& p, int sm_count) {
  // Narrow outputs in whole 160-column tiles (SDXL's 640 and 1280): 128x160 tiles make 16-25% more CTAs than
  // 128x256 ones could fill and waste no columns. The hand-written 128x160 kernel was the fastest on 6 of 7 such
  // SDXL shapes in session 13's H100 sweep; its gated form (session 14) was within 3% of the best CUTLASS gated
  // configuration on SDXL's four residual projections.
  if (p.N % 160 == 0 && p.N <= 1280) return kCfgWgmma128x160;
  const int64_t big_tiles = ceil_div(p.M, 128) * ceil_div(p.N, 256);
  // At least a wave of large tiles with 1024+ rows: the hand-written kernels, 128x256 unless 192x192 tiles fill
  // their last wave clearly better (both are data-parallel: a partial last wave idles SMs).
  if (p.M >= 1024 && big_tiles >= sm_count) {
    const int64_t square_tiles = ceil_div(p.M, 192) * ceil_div(p.N, 192);
    const auto last_wave_fill = [&](int64_t tiles) {
      return double(tiles) / double(ceil_div(tiles, sm_count) * sm_count);
    };
    return last_wave_fill(square_tiles) > last_wave_fill(big_tiles) + 0.02 ? kCfgWgmma192x192 : kCfgWgmma128x256;
  }
  // Short K (at most 40 k-blocks of 64) leaves few MMAs per tile to hide a cooperative kernel's epilogue behind;
  // ping-pong overlaps one tile's epilogue with the other warp group's MMAs. In the 2026-11-26 sweep it was within
  // 0-2% of the fastest configuration on every SDXL shape with K <= 2560 (plain and gated), where the previous
  // rules' picks (cluster-2 ping-pong, stream-K cooperative) were up to 8% and 14-40% slower.
  if (p.K <= 2560) return kCfgPingpong128x128;
  // Stream-K spreads a mostly empty last wave over all SMs (e.g. 432 tiles on 132 SMs: 3.3 waves, not 4).
  if (big_tiles >= sm_count) return kCfgCoop128x256Sk;
  // Under a wave of large tiles: smaller tiles for more CTAs, and stream-K for the rest.
  return kCfgCoop128x128Sk;
}

// The configuration with the same scheduling on the C-reading kernel, for gated problems whose plain choice is a
// lean CUTLASS kernel (every other configuration takes a gate itself).
int gated_sibling(int config) {
  if (sm90_config_takes_gate(kSm90Configs[config])) return config;
  const Sm90Config& c = kSm90Configs[config];
  const Sm90Kernel full = sm90_full_kernel(c.kernel);
  for (int i = 0; i < kSm90ConfigCount; ++i) {
    const Sm90Config& d = kSm90Configs[i];
    if (d.kernel == full && d.decomp == c.decomp && d.raster == c.raster && d.swizzle == c.swizzle) return i;
  }
  return kCfgCoop128x256Dp;
}

// The winners-table row for p on this card: one tagged with the card's L2 size first, else an untagged one.
const Sm90Winner* find_winner(const LinearProblem& p, const DeviceFacts& dev) {
  const Sm90Winner* any = nullptr;
  for (const Sm90Winner& w : kSm90Winners) {
    if (w.M != p.M || w.N != p.N || w.K != p.K) continue;
    if (w.l2_mib != 0 && w.l2_mib == dev.l2_mib) return &w;
    if (w.l2_mib == 0 && !any) any = &w;
  }
  return any;
}

// Configurations measured on this machine for exact problems (scripts/tune_gemm.py writes them to a cache file;
// runtime/ops/cuda/gemm_tuning.py hands them over with fdm_gemm_sm90_set_tuned): they win over the table.
struct TunedChoice {
  int64_t M, N, K;
  bool gated;
  int config;
};
std::mutex g_tuned_mutex;
std::vector<TunedChoice> g_tuned;

int tuned_config(const LinearProblem& p) {
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  for (const TunedChoice& t : g_tuned)
    if (t.M == p.M && t.N == p.N && t.K == p.K && t.gated == (p.gate != nullptr)) return t.config;
  return -1;
}

// The automatic choice: a tuned configuration for p, else the winners-table row for p on this card, else sm90_rule.
int auto_sm90_config(const LinearProblem& p, const DeviceFacts& dev) {
  if (const int tuned = tuned_config(p); tuned >= 0) return tuned;
  if (const Sm90Winner* w = find_winner(p, dev)) {
    if (p.gate && w->gated >= 0) return w->gated;
    return p.gate ? gated_sibling(w->plain) : w->plain;
  }
  const int config = sm90_rule(p, dev.sm_count);
  return p.gate ? gated_sibling(config) : config;
}

int choose_sm90_config(const LinearProblem& p, const DeviceFacts& dev) {
  if (g_sm90_force_config >= 0) return g_sm90_force_config;  // may not take p: the caller then moves on
  return auto_sm90_config(p, dev);
}

int run_config(const LinearProblem& p, int config, int sm_count, cudaStream_t stream) {
  const int st = linear_sm90(p, kSm90Configs[config], sm_count, stream);
  if (st != kGemmNotSupported) g_sm90_last_config = config;
  return st;
}

// Gated problems with at most this many batches run fused on sm90, one launch per batch; more batches
// (small per-batch row counts) run as one GEMM plus an elementwise pass.
constexpr int64_t kMaxFusedGateLaunches = 8;

const void* offset(const void* p, int64_t elements, int dtype) {
  return p ? static_cast<const char*>(p) + elements * element_size(dtype) : nullptr;
}

int run_sm90(const LinearProblem& p, const DeviceFacts& dev, cudaStream_t stream) {
  const int sm_count = dev.sm_count;
  if (!p.gate) return run_config(p, choose_sm90_config(p, dev), sm_count, stream);
  const int64_t batches = p.M / p.rows_per_gate;
  if (batches <= kMaxFusedGateLaunches) {
    const int64_t S = p.rows_per_gate;
    int config = -1;
    for (int64_t b = 0; b < batches; ++b) {
      LinearProblem q = p;
      q.M = S;
      q.x = offset(p.x, b * S * p.K, p.dtype);
      q.residual = offset(p.residual, b * S * p.N, p.dtype);
      q.out = const_cast<void*>(offset(p.out, b * S * p.N, p.dtype));
      q.gate = offset(p.gate, b * p.N, p.dtype);
      if (config < 0) config = choose_sm90_config(q, dev);
      const int st = run_config(q, config, sm_count, stream);
      if (st) return st;  // kGemmNotSupported can only come from the first launch: all share one shape
    }
    return 0;
  }
  LinearProblem q = p;
  q.gate = q.residual = nullptr;
  const int st = run_config(q, choose_sm90_config(q, dev), sm_count, stream);
  if (st) return st;
  return gated_residual_inplace(p.out, p.gate, p.residual, p.M, p.N, p.rows_per_gate, p.dtype, stream);
}
#endif

int run_sm80(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  // The CUTLASS 2.x epilogue sees no coordinates, so the gate is a second, elementwise pass.
  LinearProblem q = p;
  q.gate = q.residual = nullptr;
  const int st = linear_sm80(q, sm_count, stream);
  if (st || !p.gate) return st;
  return gated_residual_inplace(p.out, p.gate, p.residual, p.M, p.N, p.rows_per_gate, p.dtype, stream);
}

int check_dtype(int dtype) {
  if (dtype == FDM_F32 || is_16bit(dtype)) return 0;
  return arg_error("gemm: unsupported dtype code %d (want f32, f16 or bf16)", dtype);
}

}  // namespace

int current_device_facts(DeviceFacts* facts) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  std::lock_guard<std::mutex> lock(g_facts_mutex);
  if (dev < kMaxDevices && g_facts_known[dev]) {
    *facts = g_facts[dev];
    return 0;
  }
  DeviceFacts f;
  if ((e = cudaDeviceGetAttribute(&f.cc_major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess ||
      (e = cudaDeviceGetAttribute(&f.cc_minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess ||
      (e = cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
      (e = cudaDeviceGetAttribute(&f.l2_mib, cudaDevAttrL2CacheSize, dev)) != cudaSuccess ||
      (e = cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
    return static_cast<int>(e);
  f.l2_mib >>= 20;  // bytes -> MiB
  if (dev < kMaxDevices) {
    g_facts[dev] = f;
    g_facts_known[dev] = true;
  }
  *facts = f;
  return 0;
}

int linear_dispatch(const LinearProblem& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return 0;
  DeviceFacts dev;
  if (const int st = current_device_facts(&dev)) return st;
  const int force = g_force_path;
  const bool tensor_cores = is_16bit(p.dtype) && p.K > 0;

  // A few rows of x: the time is reading W, which the GEMV streams at memory bandwidth; a tensor-core tile would
  // be 1/64 full (FLUX's modulation, 1 x 3072 -> 18432, H200: GEMV 0.030 ms, cuBLAS 0.032, best sm90 tile 0.051).
  if ((force == kPathAuto || force == kPathGemv) && gemv_takes(p)) {
    g_last_path = kPathGemv;
    return linear_gemv(p, dev.sm_count, stream);
  }
  if (force == kPathGemv) return arg_error("gemm: the gemv path was forced but cannot take this problem");

#ifdef FASTDM_HAS_SM90
  if (tensor_cores && dev.cc_major == 9 && (force == kPathAuto || force == kPathSm90)) {
    const int st = run_sm90(p, dev, stream);
    if (st != kGemmNotSupported) {
      g_last_path = kPathSm90;
      return st;
    }
  }
#endif
  if (force == kPathSm90) return arg_error("gemm: the sm90 path was forced but cannot take this problem or device");

  if (tensor_cores && dev.cc_major >= 8 && (force == kPathAuto || force == kPathSm80)) {
    const int st = run_sm80(p, dev.sm_count, stream);
    if (st != kGemmNotSupported) {
      g_last_path = kPathSm80;
      return st;
    }
  }
  if (force == kPathSm80) return arg_error("gemm: the sm80 path was forced but cannot take this problem or device");

  g_last_path = kPathSimt;
  return gemm_simt(simt_linear(p), stream);
}

}  // namespace fdm

using namespace fdm;

// out[M, N] = act(x[M, K] @ w[N, K]^T + bias[N]); bias may be null; act: 0 none, 1 gelu_tanh, 2 gelu, 3 silu.
FDM_API int fdm_linear(const void* x, const void* w, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                       int act, int dtype, cudaStream_t stream) {
  if (const int st = check_dtype(dtype)) return st;
  if (act < kActNone || act > kActSilu) return arg_error("unknown activation code %d", act);
  if (M < 0 || N < 0 || K < 0) return arg_error("negative size (M=%lld N=%lld K=%lld)", (long long)M,
                                                (long long)N, (long long)K);
  LinearProblem p;
  p.x = x;
  p.w = w;
  p.bias = bias;
  p.out = out;
  p.M = M;
  p.N = N;
  p.K = K;
  p.act = act;
  p.dtype = dtype;
  return linear_dispatch(p, stream);
}

// out[b, s, :] = residual[b, s, :] + gate[b, :] * (x[b, s, :] @ w^T + bias); x [B, S, K], w [N, K], gate [B, N],
// residual and out [B, S, N]. out must not overlap x, w or residual.
FDM_API int fdm_linear_gated_residual(const void* x, const void* w, const void* bias, const void* gate,
                                      const void* residual, void* out, int64_t B, int64_t S, int64_t N, int64_t K,
                                      int dtype, cudaStream_t stream) {
  if (const int st = check_dtype(dtype)) return st;
  if (B < 0 || S < 0 || N < 0 || K < 0) return arg_error("negative size");
  if (!gate || !residual) return arg_error("gate and residual are required");
  if (B == 0 || S == 0) return 0;
  LinearProblem p;
  p.x = x;
  p.w = w;
  p.bias = bias;
  p.gate = gate;
  p.residual = residual;
  p.out = out;
  p.M = B * S;
  p.N = N;
  p.K = K;
  p.rows_per_gate = S;
  p.dtype = dtype;
  return linear_dispatch(p, stream);
}

// c[b] = a[b] @ bm[b]: a [batch, M, K], bm [batch, K, N] (b_shared = 0) or [K, N] (b_shared = 1), c [batch, M, N];
// all packed row-major.
FDM_API int fdm_matmul(const void* a, const void* bm, void* c, int64_t batch, int64_t M, int64_t N, int64_t K,
                       int b_shared, int dtype, cudaStream_t stream) {
  if (const int st = check_dtype(dtype)) return st;
  if (batch < 0 || M < 0 || N < 0 || K < 0) return arg_error("negative size");
  if (batch == 0 || M == 0 || N == 0) return 0;
  int64_t b_batch = K * N;
  if (b_shared) {  // one B for all: the batch folds into M (a and c are packed)
    M *= batch;
    batch = 1;
    b_batch = 0;
  }
  DeviceFacts dev;
  if (const int st = current_device_facts(&dev)) return st;
  const int force = g_force_path;
  // No sm90 matmul kernel yet: a forced sm90 path means "tensor cores", which is the sm80 kernel here.
  if (is_16bit(dtype) && K > 0 && dev.cc_major >= 8 && force != kPathSimt) {
    const int st = matmul_sm80(a, bm, c, batch, M, N, K, b_batch, dtype, stream);
    if (st != kGemmNotSupported) {
      g_last_path = kPathSm80;
      return st;
    }
  }
  if (force == kPathSm80) return arg_error("the sm80 path was forced but cannot take this problem");
  SimtProblem s;
  s.a = a;
  s.b = bm;
  s.d = c;
  s.M = M;
  s.N = N;
  s.K = K;
  s.batch = batch;
  s.a_m = K;
  s.a_k = 1;
  s.a_batch = M * K;
  s.b_k = N;
  s.b_n = 1;
  s.b_batch = b_batch;
  s.d_m = N;
  s.d_batch = M * N;
  s.dtype = dtype;
  g_last_path = kPathSimt;
  return gemm_simt(s, stream);
}

// Test hook: 0 picks the path by device and shape; 1 sm90, 2 sm80, 3 simt, 4 gemv force one (a forced path that cannot
// take a problem fails with an argument error instead of falling back).
FDM_API int fdm_gemm_set_path(int path) {
  if (path < kPathAuto || path > kPathGemv) return arg_error("unknown path %d", path);
  g_force_path = path;
  return 0;
}

// The path (1 sm90, 2 sm80, 3 simt, 4 gemv) that ran the last GEMM on any thread; a query, not a status.
FDM_API int fdm_gemm_last_path() { return g_last_path; }

// Test/benchmark hook: run every sm90 linear with configuration `config` (an index into kSm90Configs, gemm.cuh),
// or -1 to choose per problem. A forced configuration that cannot take a problem (a gate on the lean kernel)
// passes it on like any unsupported problem: to the sm80 path, or an error where fdm_gemm_set_path forces sm90.
FDM_API int fdm_gemm_sm90_set_config(int config) {
  if (config < -1 || config >= kSm90ConfigCount)
    return arg_error("sm90 GEMM configuration %d does not exist (want -1 or 0..%d)", config, kSm90ConfigCount - 1);
  g_sm90_force_config = config;
  return 0;
}

// The configuration the automatic choice picks (a forced one aside) for an M x K -> N linear, gated or not, on a
// card with `sm_count` SMs and `l2_mib` MiB of L2; a query, not a status. Host-only: tests check per-card rows with
// it, and that it agrees with what a real linear ran.
FDM_API int fdm_gemm_sm90_auto_config(int64_t M, int64_t N, int64_t K, int gated, int sm_count, int l2_mib) {
#ifdef FASTDM_HAS_SM90
  static const char kGate = 0;  // only its presence matters here
  LinearProblem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.gate = gated ? &kGate : nullptr;
  DeviceFacts dev;
  dev.sm_count = sm_count;
  dev.l2_mib = l2_mib;
  return auto_sm90_config(p, dev);
#else
  (void)M, (void)N, (void)K, (void)gated, (void)sm_count, (void)l2_mib;
  return -1;
#endif
}

// The band height (cluster rows) the hand-written sm90 kernels walk for a grid of block_rows x block_cols clusters
// of block_m x block_n outputs with wave_blocks clusters resident, depth k, on a card with l2_mib MiB of L2
// (sm90::wgmma_band_rows); -1 without sm90 code. Host-only: tests check the rule with it.
FDM_API int fdm_gemm_sm90_wgmma_band_rows(int64_t block_rows, int64_t block_cols, int64_t block_m, int64_t block_n,
                                          int64_t wave_blocks, int64_t k, int l2_mib) {
#ifdef FASTDM_HAS_SM90
  return sm90::wgmma_band_rows(block_rows, block_cols, block_m, block_n, wave_blocks, k, int64_t(l2_mib) << 20);
#else
  (void)block_rows, (void)block_cols, (void)block_m, (void)block_n, (void)wave_blocks, (void)k, (void)l2_mib;
  return -1;
#endif
}

// A configuration measured on this machine for the exact problem M x K -> N (gated: a linear_gated_residual with
// that many rows a batch), chosen ahead of the winners table from now on in this process; config -1 forgets it.
// Loaded from scripts/tune_gemm.py's cache by runtime/ops/cuda/gemm_tuning.py.
FDM_API int fdm_gemm_sm90_set_tuned(int64_t M, int64_t N, int64_t K, int gated, int config) {
#ifdef FASTDM_HAS_SM90
  if (M < 1 || N < 1 || K < 1) return arg_error("tuned GEMM M, N, K must be >= 1, got %lld, %lld, %lld", (long long)M,
                                                (long long)N, (long long)K);
  if (config < -1 || config >= kSm90ConfigCount)
    return arg_error("sm90 GEMM configuration %d does not exist (want -1 or 0..%d)", config, kSm90ConfigCount - 1);
  if (gated && config >= 0 && !sm90_config_takes_gate(kSm90Configs[config]))
    return arg_error("sm90 GEMM configuration %d cannot run a gated residual (its epilogue reads no C)", config);
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  for (size_t i = 0; i < g_tuned.size(); ++i)
    if (g_tuned[i].M == M && g_tuned[i].N == N && g_tuned[i].K == K && g_tuned[i].gated == (gated != 0)) {
      if (config < 0)
        g_tuned.erase(g_tuned.begin() + static_cast<std::ptrdiff_t>(i));
      else
        g_tuned[i].config = config;
      return 0;
    }
  if (config >= 0) g_tuned.push_back({M, N, K, gated != 0, config});
  return 0;
#else
  (void)M, (void)N, (void)K, (void)gated, (void)config;
  return 0;  // no sm90 kernels here: nothing to choose between
#endif
}

// Forgets every tuned configuration (fdm_gemm_sm90_set_tuned).
FDM_API int fdm_gemm_sm90_clear_tuned() {
#ifdef FASTDM_HAS_SM90
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  g_tuned.clear();
#endif
  return 0;
}

// The number of sm90 configurations; a query, not a status.
FDM_API int fdm_gemm_sm90_config_count() { return kSm90ConfigCount; }

// The configuration that ran the last sm90 linear on any thread (-1 before any); a query, not a status.
FDM_API int fdm_gemm_sm90_last_config() { return g_sm90_last_config; }

// A readable name of configuration `config`, NUL-terminated into buf[len], e.g.
// "coop 128x256 c2x1 | stream-k heuristic | raster auto".
FDM_API int fdm_gemm_sm90_config_name(int config, char* buf, int64_t len) {
  if (config < 0 || config >= kSm90ConfigCount)
    return arg_error("sm90 GEMM configuration %d does not exist (want 0..%d)", config, kSm90ConfigCount - 1);
  if (!buf || len < 1) return arg_error("config name buffer is empty");
  static const char* const kernels[] = {
      "coop 128x256 c2x1",     "coop 256x128 c1x2",         "coop 128x128 c1x1",
      "pingpong 128x128 c1x1", "pingpong 128x128 c2x1",     "coop 128x256 c2x1 lean",
      "coop 128x160 c1x1",     "coop 192x192 c2x1 n-split", "coop 192x192 c2x1 n-split lean",
      "wgmma 128x256 c2x1 ptx",   "wgmma 192x192 c2x1 n-split ptx", "wgmma 128x160 c2x1 ptx",
      "wgmma 128x160 c2x2 ptx"};
  static const char* const decomps[] = {"data-parallel", "stream-k heuristic", "stream-k"};
  static_assert(sizeof(kernels) / sizeof(kernels[0]) == kSm90KernelCount);
  const Sm90Config& c = kSm90Configs[config];
  char order[32];
  if (c.raster == kRasterAuto)
    snprintf(order, sizeof(order), "raster auto");
  else if (c.kernel >= kSm90Wgmma128x256 && c.swizzle == 0)  // the hand-written kernels (the last in Sm90Kernel)
    snprintf(order, sizeof(order), "along M bands per launch");
  else if (c.kernel >= kSm90Wgmma128x256)
    snprintf(order, sizeof(order), "along M bands of %d", c.swizzle);
  else
    snprintf(order, sizeof(order), "along %s swizzle %d", c.raster == kRasterAlongM ? "M" : "N", c.swizzle);
  snprintf(buf, size_t(len), "%s | %s | %s", kernels[c.kernel], decomps[c.decomp], order);
  return 0;
}
