// GroupNorm (+ SiLU) in one pass on Hopper (sm_90a only): NCHW, called from kernels/norms.cu, and channels-last,
// called from kernels/group_norm_nhwc.cu; those own the C ABI and run their multi-pass kernels where these decline.
//
// The two-pass form (norms.cu) reads x twice, statistics then normalize. Here a thread block cluster holds one whole
// group on chip: each CTA pulls its piece of the group (a contiguous run of x) into shared memory with bulk TMA
// copies, plus a register-held tail, takes the piece's exact moments stage by stage as the copies land, the CTAs
// merge their moments through distributed shared memory, and every CTA normalizes its piece from chip and writes y.
// x is read from DRAM once, in one launch with no workspace.
//
// Group n*G + g of x [N, C, HW] is the contiguous run of L = (C / G) * HW elements at (n*G + g) * L; CTA r of the
// group's cluster takes elements [r * piece, min(L, (r+1) * piece)). Four CTAs share an SM, and SDXL's GroupNorm
// inputs are on chip in a single wave (a second wave of a few clusters, which ran alone after the first, cost
// ~7 us). What it does not reach: every CTA needs its whole group's statistics before its first store, so a group's
// reads all come before its writes, and a cluster waits for its slowest CTA's copies; the later half of the groups
// pace their copies so that the earlier half's stores overlap their reads (group_norm_cluster_kernel). At
// [2, 512, 128, 128] bf16 + SiLU it runs ~27.8 us on the H100 against a 25.7 us copy of the same bytes and ~37 us
// for the two-pass kernels; docs/kernel_notes.md, session 11, has the traces and the variants tried, session 18 two
// designs that took groups in rounds and lost, session 20 the pacing, session 21 the inbox exchange of the cluster's
// moments. With fewer groups than a quarter of the SMs the two-pass kernels mostly win and take the call
// (launch_cluster).
//
// Channels-last: a group is a Cg-channel column of every pixel row, so each CTA copies rows in with 4-16 byte
// cp.async units instead of bulk copies, and writes them back the same way. It pays only where those rows are wide
// and every cluster fits at once (SDXL's 1280- and 2560-channel 32x32 tensors: 1.4-1.5x the three-kernel path);
// narrower rows read a 20-40 byte column out of every 0.6-1 KB pixel row and lose (launch_nhwc_any_unit).
#include <cooperative_groups.h>

#include "bulk_copy.cuh"
#include "cluster.cuh"
#include "cluster_occupancy.cuh"
#include "common.cuh"
#include "group_norm.cuh"
#include "pdl.cuh"
#include "vec.cuh"

namespace cg = cooperative_groups;

namespace fdm {

namespace {

constexpr int kGnoThreads = 256;
constexpr int kStageBytes = 16384;  // one bulk copy and one mbarrier each; statistics start as each lands
constexpr int kMaxCluster = 16;     // non-portable above 8: granted where the GPU can co-schedule it
constexpr int kRegPacks = 6;        // 16-byte packs a thread holds in registers: 24 KB of a CTA's piece

// Shared memory: the piece's held part (rounded up to 16 bytes), then its stage barriers, the per-warp moments, the
// inbox of every cluster rank's moments with its barrier, and each channel's (scale, shift).
struct GnoLayout {
  uint32_t stages, bars, warp_moments, inbox, inbox_bar, coef, bytes;
  __host__ __device__ GnoLayout(uint32_t held_bytes, int threads, int channels) {
    stages = (held_bytes + kStageBytes - 1) / kStageBytes;
    bars = (held_bytes + 15) / 16 * 16;
    warp_moments = bars + 8 * stages;
    inbox = (warp_moments + sizeof(Moments) * (threads / 32) + 15) / 16 * 16;
    inbox_bar = inbox + 16 * kMaxCluster;
    coef = inbox_bar + 8;
    bytes = coef + 8 * channels;
  }
};

// The cluster's exchange of moments (group_coefficients): every CTA sends its moments into every CTA's inbox with
// st.async, which completes bytes on the receiver's inbox barrier. Set up by thread 0 at kernel start, before the
// cluster barrier arrival (cluster_arrive_relaxed) that every thread makes there and waits on before sending:
// the barrier expects one 16-byte entry from each of `ranks` CTAs.
__device__ __forceinline__ void inbox_init(uint64_t* bar, uint32_t ranks) {
  mbar_init(bar, 1);
  mbar_expect_tx(bar, 16 * ranks);
}

// y = act(x * a + c) of one pack.
template <typename T, int V, bool kSilu>
__device__ __forceinline__ Pack<T, V> normalize(const Pack<T, V>& p, float2 ac) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    float v = fmaf(pack_f32(p, e), ac.x, ac.y);
    if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_pack_element(v, e);
    out.v[e] = from_f32<T>(v);
  }
  return out;
}

// This thread's moments of a piece in shared memory (nvec packs), stage by stage as each stage's barrier completes;
// landed(s) runs in every thread right after stage s is seen complete (the NCHW kernel issues a later stage there).
template <typename T, int V, typename Landed>
__device__ __forceinline__ void staged_moments(const Pack<T, V>* packs, uint64_t* bars, int stages, uint32_t nvec,
                                               Moments& acc, Landed&& landed) {
  constexpr int kStagePacks = kStageBytes / 16, kPacksPerThread = kStagePacks / kGnoThreads;
  for (int s = 0; s < stages; ++s) {
    mbar_wait(&bars[s], 0);
    landed(s);
    Pack<T, V> p[kPacksPerThread];
    const uint32_t j0 = s * kStagePacks + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k)
      if (j0 + k * kGnoThreads < nvec) p[k] = packs[j0 + k * kGnoThreads];
    packs_moments<T, V, kPacksPerThread, kGnoThreads>(p, j0, nvec, acc);
  }
}

// Each of the group's Cg channels' (weight, bias) as floats into coef[c] (channel ch0 + c; 1 and 0 where w or b is
// null), for group_coefficients to turn into (scale, shift) in place. Called at kernel start by the threads past
// warp 0 (the bulk copies' issuer), so the loads' latency passes while the piece arrives instead of after the
// cluster barrier, where it sat in every cluster's path from its last copy to its first store. H100, bf16 + SiLU:
// NCHW [2, 512, 128, 128] 28.41 / 28.43 -> 28.23 / 28.12 us; channels-last [2, 32, 32, 1280] 12.28 / 12.31 ->
// 12.45 / 12.38 (kept there too, one way for both kernels). Visible to warp 0 after block_merge's barrier.
template <typename T>
__device__ __forceinline__ void preload_affine(float2* coef, const T* w, const T* b, int ch0, int Cg) {
  for (int c = static_cast<int>(threadIdx.x) - 32; c >= 0 && c < Cg; c += kGnoThreads - 32)
    coef[c] = make_float2(w ? to_f32(w[ch0 + c]) : 1.f, b ? to_f32(b[ch0 + c]) : 0.f);
}

// The group's statistics from each thread's moments of its values: merged over the CTA (per-warp results in
// warp_m), then over the cluster by sending the CTA's result into every CTA's inbox (inbox_init; rank r's at
// inbox[r]), and each of the group's Cg channels' (scale, shift) written to coef over the (weight, bias)
// preload_affine put there, channel ch0 + c at coef[c]. Every thread of every CTA calls, having arrived at the
// cluster barrier at kernel start; on return coef is complete and this CTA has arrived at the cluster barrier its
// exit must wait on. The inbox replaced a cluster.sync() and reads of each rank's result through distributed shared
// memory: that barrier's release waited for this SM's outstanding global stores (other groups' y) before any CTA
// could read a peer's moments.
__device__ __forceinline__ void group_coefficients(Moments acc, Moments* warp_m, float4* inbox, uint64_t* inbox_bar,
                                                   float2* coef, int Cg, float count, float eps) {
  cg::cluster_group cluster = cg::this_cluster();
  const Moments block = block_merge(acc, warp_m);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t ranks = cluster.num_blocks();
  cluster_wait();  // every CTA's inbox barrier is set up
  if (threadIdx.x < ranks)
    st_async_f4(peer_addr(&inbox[cluster.block_rank()], threadIdx.x), make_float4(block.n, block.mean, block.m2, 0.f),
                peer_addr(inbox_bar, threadIdx.x));
  if (warp == 0) {
    // Every CTA merges the same values in the same lane order, so all of them get the same bits.
    mbar_wait_cluster(inbox_bar, 0);
    Moments m{0.f, 0.f, 0.f};
    if (lane < static_cast<int>(ranks)) {
      const float4 v = inbox[lane];
      m = Moments{v.x, v.y, v.z};
    }
    m = group_merge(m, 32);
    const float rstd = rsqrtf(m.m2 / count + eps);
    for (int c = lane; c < Cg; c += 32) {
      const float2 wb = coef[c];
      const float a = rstd * wb.x;
      coef[c] = make_float2(a, wb.y - m.mean * a);
    }
  }
  cluster_arrive_relaxed();  // the exit barrier (every CTA's inbox is complete once its warp 0 passed the wait)
  __syncthreads();           // coef is written
}

// grid (ranks, N * G), cluster (ranks, 1, 1): CTA r of group n*G + g's cluster holds elements
// [r * piece, min(L, (r+1) * piece)) of it (piece a multiple of V; L: the group's elements), the first `held` of
// them in shared memory and the rest (at most kRegPacks packs a thread) in registers, so four CTAs fit an SM and the
// SDXL shapes' whole tensor is on chip at once.
//
// Groups from `late` on keep one bulk copy in flight a CTA (the next issued as one lands) instead of issuing all at
// once. DRAM then serves the earlier groups first, so their statistics are ready and their stores run while the
// later groups still arrive, rather than every group's reads finishing together before any store. H100, bf16 +
// SiLU, [2, 512, 128, 128]: 28.96 -> 28.40 us with the second half of the groups so paced (two machine starts);
// pacing a quarter, three quarters or five eighths of them, or letting them keep two copies in flight, measured
// 28.4-28.9; pacing every group (one copy in flight each) 28.9. A gate that held each cluster's copies until the
// cluster `window` groups earlier had landed (a counter in global memory) cost ~3 us a step of the chain instead.
template <typename T, bool kSilu>
__global__ void __launch_bounds__(kGnoThreads, 4)
group_norm_cluster_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                          T* __restrict__ y, uint32_t L, uint32_t HW, int Cg, int G, uint32_t piece, uint32_t held,
                          int64_t late, float eps) {
  constexpr int V = vec16<T>();
  extern __shared__ __align__(128) unsigned char smem[];
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t ng = blockIdx.y;
  const uint32_t p0 = cluster.block_rank() * piece, n = L - p0 < piece ? L - p0 : piece;
  const uint32_t n_smem = n < held ? n : held, nvec = n_smem / V, nvec_regs = (n - n_smem) / V;
  const uint32_t bytes = n_smem * sizeof(T);
  const GnoLayout lay(held * sizeof(T), kGnoThreads, Cg);
  const int stages = static_cast<int>((bytes + kStageBytes - 1) / kStageBytes);
  auto* bars = reinterpret_cast<uint64_t*>(smem + lay.bars);
  auto* warp_m = reinterpret_cast<Moments*>(smem + lay.warp_moments);
  auto* inbox = reinterpret_cast<float4*>(smem + lay.inbox);
  auto* inbox_bar = reinterpret_cast<uint64_t*>(smem + lay.inbox_bar);
  auto* coef = reinterpret_cast<float2*>(smem + lay.coef);
  const auto* packs = reinterpret_cast<const Pack<T, V>*>(smem);

  const auto* src = reinterpret_cast<const unsigned char*>(x + ng * L + p0);
  const uint64_t evict_first = l2_evict_first_policy();  // x is read once
  auto issue = [&](int s) { bulk_load_stage(smem, src, bytes, kStageBytes, s, bars, evict_first); };
  const int in_flight = ng >= late && stages > 1 ? 1 : stages;  // copies issued up front
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[s], 1);
    inbox_init(inbox_bar, cluster.num_blocks());
    fence_barrier_init();
    for (int s = 0; s < in_flight; ++s) issue(s);
  }
  __syncthreads();  // the barriers are initialized before anyone waits on them
  cluster_arrive_relaxed();  // waited on in group_coefficients, before the inbox is written
  preload_affine(coef, w, b, static_cast<int>(ng % G) * Cg, Cg);

  // The register part: pack tid + k * kGnoThreads of it for this thread, loaded once the shared memory part has
  // landed (issued with the bulk copies it was ~2 us slower at [2, 512, 128, 128] on the H100).
  const T* xr = x + ng * L + p0 + held;
  Pack<T, V> regs[kRegPacks];
  auto load_regs = [&]() {
#pragma unroll
    for (int k = 0; k < kRegPacks; ++k)
      if (threadIdx.x + k * kGnoThreads < nvec_regs)
        regs[k] = load_pack_cs<T, V>(xr + static_cast<int64_t>(threadIdx.x + k * kGnoThreads) * V);
  };
  Moments acc{0.f, 0.f, 0.f};
  staged_moments<T, V>(packs, bars, stages, nvec, acc, [&](int s) {
    if (threadIdx.x == 0 && s + in_flight < stages) issue(s + in_flight);
  });
  load_regs();
  packs_moments<T, V, kRegPacks, kGnoThreads>(regs, threadIdx.x, nvec_regs, acc);
  group_coefficients(acc, warp_m, inbox, inbox_bar, coef, Cg, static_cast<float>(L), eps);

  // The register part first (its stores go out while the shared memory part is read). V divides HW, so a pack
  // never straddles two channels.
  T* yp = y + ng * L + p0;
#pragma unroll
  for (int k = 0; k < kRegPacks; ++k) {
    const uint32_t j = threadIdx.x + k * kGnoThreads;
    if (j < nvec_regs) {
      const uint32_t e = held + j * V;
      store_pack_cs<T, V>(yp + e, normalize<T, V, kSilu>(regs[k], coef[(p0 + e) / HW]));
    }
  }
  // This thread's shared memory packs step by kStride elements: their channel (within the group) and offset in it
  // follow by adding, not dividing.
  constexpr uint32_t kStride = kGnoThreads * V;
  const uint32_t e0 = p0 + threadIdx.x * V, step_c = kStride / HW, step_r = kStride % HW;
  uint32_t ch = e0 / HW, r = e0 % HW;
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < nvec; j += kGnoThreads) {
    store_pack_cs<T, V>(yp + static_cast<int64_t>(j) * V, normalize<T, V, kSilu>(packs[j], coef[ch]));
    ch += step_c;
    r += step_r;
    if (r >= HW) r -= HW, ++ch;
  }
  cluster_wait();
}

// U bytes global -> shared by this thread (U = 16: L2 only; 4 or 8: the only sizes cp.async has besides 16).
template <int U>
__device__ __forceinline__ void copy_unit(void* dst, const void* src) {
  if constexpr (U == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(smem_addr(dst)), "l"(src), "n"(U) : "memory");
}
// An arrival on bar once all of this thread's cp.async copies so far have landed.
__device__ __forceinline__ void copies_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// (row, column) of this thread's k-th unit j = threadIdx.x + k * kGnoThreads of a piece of `per_row`-unit rows,
// stepped without dividing.
struct UnitWalk {
  uint32_t row, col, step_rows, step_cols, per_row;
  __device__ UnitWalk(uint32_t per_row_units) : per_row(per_row_units) {
    row = threadIdx.x / per_row;
    col = threadIdx.x % per_row;
    step_rows = kGnoThreads / per_row;
    step_cols = kGnoThreads % per_row;
  }
  __device__ void next() {
    row += step_rows;
    col += step_cols;
    if (col >= per_row) col -= per_row, ++row;
  }
};

// Channels-last x [N, S, C]: group n*G + g is the Cg-channel column [g*Cg, (g+1)*Cg) of sample n's S rows (pixels).
// grid (ranks, N * G), cluster (ranks, 1, 1): CTA r holds rows [r * rows, min(S, (r+1) * rows)) of the column,
// packed (Cg elements a row) in shared memory, copied in as U-byte units by every thread (the row stride is C, so
// no bulk copy), with a stage barrier each 16 KB. The statistics run over the packed piece as 16-byte packs, as the
// NCHW kernel's; the piece is normalized in place and leaves as U-byte units.
template <typename T, bool kSilu, int U>
__global__ void __launch_bounds__(kGnoThreads, 3)
group_norm_cluster_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               T* __restrict__ y, uint32_t S, uint32_t C, int Cg, int G, uint32_t rows, float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  using Unit = std::conditional_t<U == 16, uint4, std::conditional_t<U == 8, uint2, uint32_t>>;
  constexpr int V = vec16<T>();
  constexpr int kUnitsPerThread = kStageBytes / U / kGnoThreads;  // a stage's units, per thread
  extern __shared__ __align__(128) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t ng = blockIdx.y;
  const int g = static_cast<int>(ng % G);
  const uint32_t r0 = cluster.block_rank() * rows, nrows = S - r0 < rows ? S - r0 : rows;
  const uint32_t row_units = Cg * sizeof(T) / U, units = nrows * row_units;
  const uint32_t nvec = nrows * Cg / V, bytes = nrows * Cg * sizeof(T);
  const GnoLayout lay(rows * Cg * sizeof(T), kGnoThreads, Cg);
  const int stages = static_cast<int>((bytes + kStageBytes - 1) / kStageBytes);
  auto* bars = reinterpret_cast<uint64_t*>(smem + lay.bars);
  auto* warp_m = reinterpret_cast<Moments*>(smem + lay.warp_moments);
  auto* inbox = reinterpret_cast<float4*>(smem + lay.inbox);
  auto* inbox_bar = reinterpret_cast<uint64_t*>(smem + lay.inbox_bar);
  auto* coef = reinterpret_cast<float2*>(smem + lay.coef);
  auto* packs = reinterpret_cast<Pack<T, V>*>(smem);
  auto* unit_buf = reinterpret_cast<Unit*>(smem);
  const int64_t row_stride = C;  // elements
  const T* xg = x + (ng / G * S + r0) * row_stride + int64_t{g} * Cg;  // row 0 of this piece's column
  T* yg = y + (ng / G * S + r0) * row_stride + int64_t{g} * Cg;

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[s], kGnoThreads);
    inbox_init(inbox_bar, cluster.num_blocks());
    fence_barrier_init();
  }
  __syncthreads();  // the barriers are initialized before anyone arrives on them
  cluster_arrive_relaxed();  // waited on in group_coefficients, before the inbox is written
  {
    UnitWalk at(row_units);
    for (int s = 0; s < stages; ++s) {
#pragma unroll
      for (int k = 0; k < kUnitsPerThread; ++k) {
        const uint32_t j = s * (kStageBytes / U) + k * kGnoThreads + threadIdx.x;
        if (j < units) copy_unit<U>(unit_buf + j, xg + at.row * row_stride + at.col * (U / sizeof(T)));
        at.next();
      }
      copies_arrive(&bars[s]);
    }
  }
  preload_affine(coef, w, b, g * Cg, Cg);

  Moments acc{0.f, 0.f, 0.f};
  staged_moments<T, V>(packs, bars, stages, nvec, acc, [](int) {});
  group_coefficients(acc, warp_m, inbox, inbox_bar, coef, Cg, static_cast<float>(S) * static_cast<float>(Cg), eps);

  // Normalize in place: element i of the packed piece is channel i % Cg; this thread's packs step by kStride.
  constexpr uint32_t kStride = kGnoThreads * V;
  const uint32_t step_c = kStride % Cg;
  uint32_t c0 = threadIdx.x * V % Cg;
  for (uint32_t j = threadIdx.x; j < nvec; j += kGnoThreads) {
    const Pack<T, V> p = packs[j];
    Pack<T, V> out;
    uint32_t c = c0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float2 ac = coef[c];
      float v = fmaf(pack_f32(p, e), ac.x, ac.y);
      if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_pack_element(v, e);
      out.v[e] = from_f32<T>(v);
      if (++c == static_cast<uint32_t>(Cg)) c = 0;
    }
    packs[j] = out;
    c0 += step_c;
    if (c0 >= static_cast<uint32_t>(Cg)) c0 -= Cg;
  }
  __syncthreads();
  UnitWalk at(row_units);
  for (uint32_t j = threadIdx.x; j < units; j += kGnoThreads, at.next()) {
    Unit* dst = reinterpret_cast<Unit*>(yg + at.row * row_stride + at.col * (U / sizeof(T)));
    if constexpr (U == 16)
      __stcs(dst, unit_buf[j]);
    else
      *dst = unit_buf[j];
  }
  cluster_wait();
}

// CTAs a group for a group of `group_bytes`: pieces of at most 76 KB (52 KB of shared memory, so four CTAs an SM,
// and 24 KB of registers), so SDXL's largest GroupNorm input, [2, 512, 128, 128] (64 groups of 512 KB), is on chip
// at once: 64 clusters of 7 CTAs. (With 8 CTAs a group, 64 KB pieces, an H100 held only 62 of the 64 clusters at
// once and the last two ran alone after the rest: 37 us instead of ~28.) 0 where a group needs more than 16.
inline int64_t group_ranks(int64_t group_bytes) {
  const int64_t r = ceil_div(group_bytes, 76 << 10);
  return r > kMaxCluster ? 0 : r;
}

// Launches kKernel on grid (ranks, groups) in clusters of `ranks` CTAs with `smem` bytes of dynamic shared memory;
// declines (nothing launched) where the device cannot hold such a cluster, or, with one_wave, all of them at once.
template <auto kKernel, typename... Args>
int launch_clusters(int64_t ranks, int64_t groups, uint32_t smem, bool one_wave, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ranks), static_cast<unsigned>(groups));
  cfg.blockDim = dim3(kGnoThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2] = {cluster_attribute(dim3(static_cast<unsigned>(ranks)))};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const int resident = resident_clusters<kKernel>(cfg);
  if (resident < 1 || (one_wave && groups > resident)) {
    cudaGetLastError();  // a query's failure is not the caller's error
    return kGroupNormSm90Declined;
  }
  cfg.numAttrs += pdl_attribute(&attr[1]);
  return static_cast<int>(cudaLaunchKernelEx(&cfg, kKernel, args...));
}

template <typename T, bool kSilu>
int launch_cluster(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t HW, int Cg, int G, float eps,
                   cudaStream_t stream) {
  constexpr int V = vec16<T>();
  const int64_t L = int64_t{Cg} * HW, ranks = group_ranks(L * static_cast<int64_t>(sizeof(T)));
  if (ranks == 0) return kGroupNormSm90Declined;
  // With fewer clusters (groups) than a quarter of the SMs the two-pass kernels, which spread any tensor over every
  // SM, were faster. H100, bf16 + SiLU, us here / two-pass (session 18): 32 groups: [1, 320, 64, 64] 8.6 / 7.5,
  // [1, 640, 32, 32] 8.2 / 6.6, [1, 512, 64, 64] 11.0 / 8.1, [1, 256, 128, 128] 14.1 / 12.0, [1, 512, 128, 128]
  // 18.4 / 18.1; 64 groups: [2, 320, 64, 64] 9.6 / 10.6, [2, 1280, 32, 32] 9.8 / 10.6, [2, 512, 64, 64] 12.0 /
  // 12.0, [2, 512, 128, 128] 31.3 / 36.9. After the inbox exchange (session 21) the 32-group shapes read 7.5 / 7.5,
  // 7.2 / 6.6, 9.5 / 8.2, 12.5 / 11.9 and 17.1 / 17.9, [1, 1280, 32, 32] 7.5 / 7.6: still mostly the two-pass
  // kernels', so the rule stays. (Not applied when a test forces this kernel.)
  DeviceFacts dev;
  if (const int e = current_device_facts(&dev)) return e;
  if (g_gn_force_path != kGnOnePass && 4 * N * G < dev.sm_count) return kGroupNormSm90Declined;
  const int64_t piece = ceil_div(ceil_div(L, ranks), V) * V;
  if ((ranks - 1) * piece >= L) return kGroupNormSm90Declined;  // a rank would get nothing (tiny groups)
  const int64_t in_regs = int64_t{kRegPacks} * kGnoThreads * V, held = piece > in_regs ? piece - in_regs : 0;
  const GnoLayout lay(static_cast<uint32_t>(held * sizeof(T)), kGnoThreads, Cg);
  return launch_clusters<group_norm_cluster_kernel<T, kSilu>>(
      ranks, N * G, lay.bytes, false, stream, x, w, b, y, static_cast<uint32_t>(L), static_cast<uint32_t>(HW), Cg, G,
      static_cast<uint32_t>(piece), static_cast<uint32_t>(held), N * G / 2, eps);
}

// Channels-last: rows of a piece a CTA, at most 64 KB of them (three CTAs an SM; no register part), every piece a
// whole number of 16-byte packs; the unit the rows move in is the widest of 16, 8 and 4 bytes dividing a row. Only
// where every cluster is resident at once: [2, 64, 64, 1920] (64 groups of 480 KB, two waves) ran 0.74x of the
// three-kernel path on the H100, while one-wave shapes ran 1.40-1.54x.
template <typename T, bool kSilu, int U>
int launch_cluster_nhwc(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t S, int64_t C, int G, float eps,
                        cudaStream_t stream) {
  const int64_t Cg = C / G, row_bytes = Cg * static_cast<int64_t>(sizeof(T));
  int64_t align = 1;  // rows a piece is a multiple of, so that it is whole 16-byte packs
  while (align * row_bytes % 16) align *= 2;
  const int64_t ranks = ceil_div(S * row_bytes, 64 << 10);
  if (S % align || ranks > kMaxCluster) return kGroupNormSm90Declined;
  const int64_t rows = ceil_div(ceil_div(S, ranks), align) * align;
  if ((ranks - 1) * rows >= S) return kGroupNormSm90Declined;  // a rank would get nothing (tiny groups)
  const GnoLayout lay(static_cast<uint32_t>(rows * row_bytes), kGnoThreads, static_cast<int>(Cg));
  return launch_clusters<group_norm_cluster_nhwc_kernel<T, kSilu, U>>(
      ranks, N * G, lay.bytes, true, stream, x, w, b, y, static_cast<uint32_t>(S), static_cast<uint32_t>(C),
      static_cast<int>(Cg), G, static_cast<uint32_t>(rows), eps);
}

// The widest unit (16, 8 or 4 bytes) that divides a group's row of Cg channels. Rows under kMinNhwcRowBytes
// decline: each CTA then reads a narrow column of every 1-2 KB pixel row, and on the H100 that ran 0.91x (32-byte
// rows, C = 512), 0.92x (40 bytes, C = 640) and 0.44x (20 bytes in 4-byte units, C = 320) of the three-kernel
// path; at 80 bytes (C = 1280) it ran 1.54x.
constexpr int64_t kMinNhwcRowBytes = 64;
template <typename T, bool kSilu>
int launch_nhwc_any_unit(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t S, int64_t C, int G,
                         float eps, cudaStream_t stream) {
  const int64_t row_bytes = C / G * static_cast<int64_t>(sizeof(T));
  if (row_bytes < kMinNhwcRowBytes) return kGroupNormSm90Declined;
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(b);
  T* yt = static_cast<T*>(y);
  if (row_bytes % 16 == 0) return launch_cluster_nhwc<T, kSilu, 16>(xt, wt, bt, yt, N, S, C, G, eps, stream);
  if (row_bytes % 8 == 0) return launch_cluster_nhwc<T, kSilu, 8>(xt, wt, bt, yt, N, S, C, G, eps, stream);
  if (row_bytes % 4 == 0) return launch_cluster_nhwc<T, kSilu, 4>(xt, wt, bt, yt, N, S, C, G, eps, stream);
  return kGroupNormSm90Declined;
}

}  // namespace

// GroupNorm (+ SiLU) of x [N, C, HW] (contiguous) in one pass, as fdm_group_norm defines it. Declines (returns
// kGroupNormSm90Declined, nothing launched) where a group does not fit a cluster's shared memory, where HW is not a
// multiple of the 16-byte pack or a pointer is not 16-byte aligned, where the device cannot schedule the cluster, or
// (unless a test forces this kernel) where there are fewer groups than a quarter of the SMs.
int group_norm_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t C, int64_t HW, int G,
                    float eps, bool silu_act, int dtype, cudaStream_t stream) {
  const int64_t Cg = C / G;
  if (!aligned16(x) || !aligned16(y) || N * G > 65535 || Cg * HW > INT32_MAX / 2) return kGroupNormSm90Declined;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    if (HW % vec16<T>() != 0) return kGroupNormSm90Declined;
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(w);
    const T* bt = static_cast<const T*>(b);
    T* yt = static_cast<T*>(y);
    return silu_act ? launch_cluster<T, true>(xt, wt, bt, yt, N, HW, static_cast<int>(Cg), G, eps, stream)
                    : launch_cluster<T, false>(xt, wt, bt, yt, N, HW, static_cast<int>(Cg), G, eps, stream);
  });
  return kGroupNormSm90Declined;
}

// GroupNorm (+ SiLU) of channels-last x [N, S, C] (contiguous) in one pass, as fdm_group_norm_nhwc defines it.
// Declines (kGroupNormSm90Declined, nothing launched) where a group's column does not fit a cluster's shared memory,
// where a group's row is under 64 bytes or not a whole number of 4-byte units, where the clusters do not all fit
// the device at once, where S does not split into pieces of whole 16-byte packs, or where a pointer is not 16-byte
// aligned.
int group_norm_nhwc_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t S, int64_t C, int G,
                         float eps, bool silu_act, int dtype, cudaStream_t stream) {
  if (!aligned16(x) || !aligned16(y) || N * G > 65535 || N * S * C > (int64_t{1} << 40) || S > INT32_MAX ||
      C > INT32_MAX)
    return kGroupNormSm90Declined;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    return silu_act ? launch_nhwc_any_unit<T, true>(x, w, b, y, N, S, C, G, eps, stream)
                    : launch_nhwc_any_unit<T, false>(x, w, b, y, N, S, C, G, eps, stream);
  });
  return kGroupNormSm90Declined;
}

}  // namespace fdm
