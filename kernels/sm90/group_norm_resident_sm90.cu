// Channels-last GroupNorm (+ SiLU) with the whole tensor on chip (sm_90a only), called from kernels/group_norm_nhwc.cu
// before the cluster kernel of group_norm_sm90.cu and the three-kernel path.
//
// x [N, S, C]: every group is a narrow column of every pixel row (SDXL: 20-80 bytes of a 0.6-2.5 KB row), so a
// kernel that owns a group reads scattered sectors (the cluster kernel), and one that reads whole rows must read x
// twice (statistics, then normalize: the three-kernel path). Here one CTA per SM holds a contiguous run of whole
// rows of one sample on chip — bulk TMA copies into shared memory (a stage and an mbarrier per two packs a thread)
// plus up to kResRegPacks 16-byte packs a thread in registers — takes per-channel moments as the stages land, folds
// them into per-group partial moments, and after one grid-wide barrier (a cooperative launch: every CTA is resident)
// each CTA merges its sample's partials for all groups, then normalizes its rows from chip and writes y. x is read
// from DRAM once, with perfectly contiguous copies, in one launch. It applies where the tensor fits the chips of
// the device (~36 MB on an H100 or H200: SDXL's [2, 128, 128, 512] and smaller).
//
// Statistics are exact in the same way as the other GroupNorm kernels: each thread takes two-pass moments of each
// tile of its values per channel and merges them into running (count, mean, M2) (Chan et al.); channels fold into
// groups, threads into the CTA's partial, and CTAs into the group's moments by the same merges. Every CTA of a
// sample merges the same partials in the same order, so all of them normalize with the same bits.
#include <cooperative_groups.h>

#include "bulk_copy.cuh"
#include "common.cuh"
#include "group_norm.cuh"
#include "pdl.cuh"
#include "vec.cuh"

namespace cg = cooperative_groups;

namespace fdm {

namespace {

constexpr int kResMaxThreads = 512;
constexpr int kResRegPacks = 8;    // 16-byte packs a thread may hold in registers (64 KB of a 512-thread CTA)
constexpr int kResStagePacks = 2;  // 16-byte packs a thread a stage (one bulk copy and one mbarrier each)
// Bulk copies a CTA keeps in flight (the next issued as one lands) instead of issuing every stage at once: DRAM then
// serves the SMs more evenly and the last CTA's rows land sooner. H100, bf16 + SiLU, six shapes: 0.1-0.7 us faster
// with two or three in flight ([2, 128, 128, 512] 31.88 -> 31.22 / 31.27 us, [2, 64, 64, 1280] 24.73 -> 24.09 /
// 24.10), slower with one (32.18 -> 33.48).
constexpr int kResInFlightStages = 3;

// Running moments of a thread's V channels; every channel has seen the same number of values, n.
template <int V>
struct ChannelMoments {
  float n, mean[V], m2[V];

  __device__ ChannelMoments() : n(0.f) {
#pragma unroll
    for (int e = 0; e < V; ++e) mean[e] = m2[e] = 0.f;
  }

  // Merges packs p[0, nb) (nb >= 1) exactly: per channel, the tile's mean, its squared deviations, then Chan's merge.
  template <typename T, int K>
  __device__ __forceinline__ void add(const Pack<T, V> (&p)[K], int nb) {
    const float nbf = static_cast<float>(nb), tot = n + nbf, fb = __fdividef(nbf, tot), coef = n * fb;
    const float inv_nb = __fdividef(1.f, nbf);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (k < nb) s += pack_f32(p[k], e);
      const float tm = s * inv_nb;
      float q = 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (k < nb) {
          const float c = pack_f32(p[k], e) - tm;
          q = fmaf(c, c, q);
        }
      const float d = tm - mean[e];
      mean[e] = fmaf(d, fb, mean[e]);
      m2[e] += q + d * d * coef;
    }
    n = tot;
  }

  // The moments of channels [e0, e1) together: the mean of their means, and M2 = sum of M2 + n * sum of the
  // squared deviations of the means. Empty for e0 == e1.
  __device__ __forceinline__ Moments fold(int e0, int e1) const {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (e >= e0 && e < e1) s += mean[e];
    const int cnt = e1 - e0;
    if (cnt <= 0 || n == 0.f) return {0.f, 0.f, 0.f};
    const float gm = __fdividef(s, static_cast<float>(cnt));
    float q = 0.f, dev = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (e >= e0 && e < e1) {
        const float d = mean[e] - gm;
        q += m2[e];
        dev = fmaf(d, d, dev);
      }
    return {n * static_cast<float>(cnt), gm, fmaf(n, dev, q)};
  }
};

// Shared memory: the held rows, the stage barriers, two Moments a thread (its channels folded into at most two
// groups), and each group's (mean, rstd).
struct ResidentLayout {
  uint32_t bars, slots, gstat, bytes;
  __host__ __device__ ResidentLayout(uint32_t held_bytes, uint32_t stage_bytes, int threads, int groups) {
    const uint32_t stages = (held_bytes + stage_bytes - 1) / stage_bytes;
    bars = (held_bytes + 15) / 16 * 16;
    slots = (bars + 8 * stages + 15) / 16 * 16;
    gstat = slots + 2 * threads * static_cast<uint32_t>(sizeof(Moments));
    gstat = (gstat + 7) / 8 * 8;
    bytes = gstat + 8 * groups;
  }
};

// act(x * a + c) of one pack, a per-channel (a, c).
template <typename T, int V, bool kSilu>
__device__ __forceinline__ Pack<T, V> normalize_channels(const Pack<T, V>& p, const float2 (&ac)[V]) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    float v = fmaf(pack_f32(p, e), ac[e].x, ac[e].y);
    if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_pack_element(v, e);
    out.v[e] = from_f32<T>(v);
  }
  return out;
}

// grid (B, N), cooperative (all CTAs resident), blockDim = `active` rounded up to whole warps. CTA blk of sample n
// holds rows [blk * rows, min(S, (blk + 1) * rows)) of it: the first `held_rows` in shared memory, the rest in
// registers. Active thread t always takes column t % cols (cols = C / V packs a row; active is a multiple of cols,
// and so is every stage), so its V channels are fixed. partials: float2 [N, G, B] (mean, M2 of each CTA's rows).
template <typename T, bool kSilu>
__global__ void __launch_bounds__(kResMaxThreads, 1)
group_norm_resident_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                T* __restrict__ y, float2* __restrict__ partials, uint32_t S, uint32_t C, int Cg,
                                int G, uint32_t rows, uint32_t held_rows, int active, float eps) {
  constexpr int V = vec16<T>();
  extern __shared__ __align__(128) unsigned char smem[];
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const uint32_t cols = C / V, n = blockIdx.y, blk = blockIdx.x, B = gridDim.x;
  const uint32_t r0 = blk * rows, nrows = S - r0 < rows ? S - r0 : rows, hr = nrows < held_rows ? nrows : held_rows;
  const uint32_t stage_bytes = static_cast<uint32_t>(active) * kResStagePacks * 16;
  const uint32_t bytes = hr * C * static_cast<uint32_t>(sizeof(T)), nvec = bytes / 16;
  const uint32_t nvec_regs = (nrows - hr) * cols;
  const int stages = static_cast<int>((bytes + stage_bytes - 1) / stage_bytes);
  const ResidentLayout lay(held_rows * C * static_cast<uint32_t>(sizeof(T)), stage_bytes, blockDim.x, G);
  auto* bars = reinterpret_cast<uint64_t*>(smem + lay.bars);
  auto* slots = reinterpret_cast<Moments*>(smem + lay.slots);
  auto* gstat = reinterpret_cast<float2*>(smem + lay.gstat);
  auto* packs = reinterpret_cast<const Pack<T, V>*>(smem);
  const int t = threadIdx.x;
  const bool on = t < active;
  const uint32_t col = static_cast<uint32_t>(t) % cols;
  const int64_t base = (static_cast<int64_t>(n) * S + r0) * C;  // the chunk's first element

  // This thread's channels' weight and bias (one pack each, read as they are needed at the end).
  const int c0 = static_cast<int>(col) * V;
  Pack<T, V> wp, bp;
  if (on && w) wp = load_pack<T, V>(w + c0);
  if (on && b) bp = load_pack<T, V>(b + c0);

  const auto* src = reinterpret_cast<const unsigned char*>(x + base);
  const uint64_t evict_first = l2_evict_first_policy();  // x is read once
  auto issue = [&](int s) { bulk_load_stage(smem, src, bytes, stage_bytes, s, bars, evict_first); };
  const int in_flight = stages < kResInFlightStages ? stages : kResInFlightStages;
  if (t == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[s], 1);
    fence_barrier_init();
    for (int s = 0; s < in_flight; ++s) issue(s);
  }
  __syncthreads();  // the barriers are initialized before anyone waits on them

  ChannelMoments<V> cm;
  for (int s = 0; s < stages; ++s) {
    mbar_wait(&bars[s], 0);
    if (t == 0 && s + in_flight < stages) issue(s + in_flight);
    const uint32_t j0 = s * static_cast<uint32_t>(active) * kResStagePacks + t;
    if (on && j0 < nvec) {
      Pack<T, V> p[kResStagePacks];
      int nb = 0;
#pragma unroll
      for (int k = 0; k < kResStagePacks; ++k)
        if (j0 + k * active < nvec) p[k] = packs[j0 + k * active], nb = k + 1;
      cm.add(p, nb);
    }
  }
  // The register part (rows past the held ones), loaded once the shared memory part has landed (issuing it with
  // the bulk copies measured the same on the H100).
  Pack<T, V> regs[kResRegPacks];
  const T* xr = x + base + static_cast<int64_t>(hr) * C;
#pragma unroll
  for (int k = 0; k < kResRegPacks; ++k)
    if (on && t + k * active < static_cast<int>(nvec_regs))
      regs[k] = load_pack_cs<T, V>(xr + static_cast<int64_t>(t + k * active) * V);
  if (on && static_cast<uint32_t>(t) < nvec_regs) {
    int nb = 0;
#pragma unroll
    for (int k = 0; k < kResRegPacks; ++k)
      if (t + k * active < static_cast<int>(nvec_regs)) nb = k + 1;
    cm.add(regs, nb);
  }

  // This thread's channels [col * V, col * V + V) fall in group g0 and, past `split`, in g0 + 1 (Cg >= V).
  const int g0 = c0 / Cg;
  const int split = (g0 + 1) * Cg - c0 < V ? (g0 + 1) * Cg - c0 : V;
  slots[2 * t] = on ? cm.fold(0, split) : Moments{0.f, 0.f, 0.f};
  slots[2 * t + 1] = on ? cm.fold(split, V) : Moments{0.f, 0.f, 0.f};
  __syncthreads();

  // Every group at once: `width` threads a group (a power of two, G * width <= blockDim), each merging every
  // width-th of the group's entries, then a shuffle merge within the group's aligned lanes.
  int width = 32;
  while (width > 1 && G * width > static_cast<int>(blockDim.x)) width >>= 1;
  const int g = t / width, sub = t % width, lanes = active / static_cast<int>(cols);
  const bool has_group = g < G;
  const int64_t prow = (static_cast<int64_t>(n) * G + (has_group ? g : 0)) * B;  // this group's partials

  // The CTA's partial of group g over the (row lane, column) pairs that touch it.
  {
    const int ca = has_group ? g * Cg / V : 0, cb = has_group ? ((g + 1) * Cg - 1) / V : -1, ncol = cb - ca + 1;
    Moments m{0.f, 0.f, 0.f};
    for (int i = sub; i < lanes * ncol; i += width) {
      const int c = ca + i % ncol, th = (i / ncol) * static_cast<int>(cols) + c;
      m = merge(m, slots[2 * th + (c * V / Cg == g ? 0 : 1)]);
    }
    m = group_merge(m, width);
    if (has_group && sub == 0) partials[prow + blk] = make_float2(m.mean, m.m2);
  }
  cg::this_grid().sync();  // every CTA's partials are written and visible

  // Group g's moments from its B partials, in the same order in every CTA of the sample.
  {
    // kBatch loads in flight at a time (predicated, not branched around), then their merges. Nine, so that one batch
    // covers a sample's partials on a 132-SM card where a group has 16 lanes (B <= 144: one sample, C = 512) or 8
    // lanes and two samples or more (B <= 72: the 480-thread CTAs of C = 320, 640, 1280); a second dependent round
    // trip to L2 cost 0.3-0.6 us. H100, bf16 + SiLU, us, eight / nine: [1, 128, 128, 512] 21.43 / 20.86,
    // [2, 64, 64, 1280] 24.40 / 23.95, [2, 64, 64, 640] 17.35 / 17.05, [2, 128, 128, 320] 24.41 / 23.97,
    // [2, 128, 128, 512] 31.32 / 31.30 (B = 66, one batch either way); 17 spills (bf16 + SiLU), 12 was no better.
    constexpr int kBatch = 9;
    Moments m{0.f, 0.f, 0.f};
    for (uint32_t i0 = sub; has_group && i0 < B; i0 += kBatch * width) {
      float2 p[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        p[k] = i0 + k * width < B ? partials[prow + i0 + k * width] : make_float2(0.f, 0.f);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const uint32_t i = i0 + k * width, ri = i < B ? (S - i * rows < rows ? S - i * rows : rows) : 0;
        m = merge(m, Moments{static_cast<float>(ri) * static_cast<float>(Cg), p[k].x, p[k].y});
      }
    }
    m = group_merge(m, width);
    const float inv_count = static_cast<float>(1.0 / (static_cast<double>(S) * Cg));
    if (has_group && sub == 0) gstat[g] = make_float2(m.mean, rsqrtf(fmaxf(m.m2 * inv_count, 0.f) + eps));
  }
  __syncthreads();
  if (!on) return;

  float2 ac[V];  // this thread's channels' scale and shift
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float2 st = gstat[(c0 + e) / Cg];
    const float a = st.y * (w ? pack_f32(wp, e) : 1.f);
    ac[e] = make_float2(a, fmaf(-st.x, a, b ? pack_f32(bp, e) : 0.f));
  }
  // The register part first (its stores go out while the shared memory part is read).
  T* yr = y + base + static_cast<int64_t>(hr) * C;
#pragma unroll
  for (int k = 0; k < kResRegPacks; ++k)
    if (t + k * active < static_cast<int>(nvec_regs))
      store_pack_cs<T, V>(yr + static_cast<int64_t>(t + k * active) * V, normalize_channels<T, V, kSilu>(regs[k], ac));
  T* yp = y + base;
#pragma unroll 4
  for (uint32_t j = t; j < nvec; j += active)
    store_pack_cs<T, V>(yp + static_cast<int64_t>(j) * V, normalize_channels<T, V, kSilu>(packs[j], ac));
}

// How the kernel covers x: threads, CTAs a sample, rows a CTA and how many of them shared memory holds.
struct ResidentPlan {
  int active = 0, threads = 0;
  uint32_t ctas = 0, rows = 0, held_rows = 0, smem = 0;
};

// The plan for x [N, S, C] on a device of `sms` SMs allowing `optin` bytes of shared memory a CTA, with workspace
// for `chunks` partials a (sample, group); false where the kernel cannot take it.
inline bool plan_resident(int64_t N, int64_t S, int64_t C, int G, int elem, int sms, int optin, int64_t chunks,
                          ResidentPlan* plan) {
  const int V = 16 / elem;
  const int64_t Cg = C / G, cols = C / V;
  if (C % V || Cg < V || cols > kResMaxThreads || N < 1 || N > sms) return false;
  ResidentPlan p;
  p.active = static_cast<int>(cols * (kResMaxThreads / cols));
  p.threads = static_cast<int>(ceil_div(p.active, 32) * 32);
  const int64_t per_sample = sms / N < chunks ? sms / N : chunks, rows = ceil_div(S, per_sample);
  const int64_t ctas = ceil_div(S, rows);  // <= per_sample, none empty
  const int64_t row_bytes = C * elem, stage_bytes = int64_t{p.active} * kResStagePacks * 16;
  // The most rows shared memory holds beside the barriers, slots and group statistics (layout computed exactly).
  int64_t held = rows;
  while (held > 0 && ResidentLayout(static_cast<uint32_t>(held * row_bytes), static_cast<uint32_t>(stage_bytes),
                                    p.threads, G).bytes > static_cast<uint32_t>(optin))
    --held;
  if ((rows - held) * cols > int64_t{p.active} * kResRegPacks) return false;  // the rest does not fit registers
  p.ctas = static_cast<uint32_t>(ctas);
  p.rows = static_cast<uint32_t>(rows);
  p.held_rows = static_cast<uint32_t>(held);
  p.smem = ResidentLayout(static_cast<uint32_t>(held * row_bytes), static_cast<uint32_t>(stage_bytes), p.threads, G)
               .bytes;
  *plan = p;
  return true;
}

// Whether the device holds `ctas` CTAs of kKernel at (threads, smem) at once; the first call on a device lets the
// kernel take the largest shared memory. Occupancy is asked once per (device, threads, smem) (resident_blocks).
template <auto kKernel>
bool all_resident(int threads, uint32_t smem, int64_t ctas, const DeviceFacts& facts) {
  int dev = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || allow_smem_optin<kKernel>(dev, facts.smem_optin, false) != cudaSuccess ||
      resident_blocks<kKernel>(threads, smem, &per_sm) != cudaSuccess)
    return false;
  return ctas <= int64_t{per_sm} * facts.sm_count;
}

template <typename T, bool kSilu>
int launch_resident(const void* x, const void* w, const void* b, void* y, float* ws, int64_t chunks, int64_t N,
                    int64_t S, int64_t C, int G, float eps, cudaStream_t stream) {
  DeviceFacts dev;
  if (current_device_facts(&dev) != 0) return kGroupNormSm90Declined;
  ResidentPlan p;
  if (!plan_resident(N, S, C, G, static_cast<int>(sizeof(T)), dev.sm_count, dev.smem_optin, chunks, &p))
    return kGroupNormSm90Declined;
  constexpr auto kKernel = group_norm_resident_nhwc_kernel<T, kSilu>;
  if (!all_resident<kKernel>(p.threads, p.smem, int64_t{p.ctas} * N, dev)) {
    cudaGetLastError();  // a query's failure is not the caller's error
    return kGroupNormSm90Declined;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.ctas, static_cast<unsigned>(N));
  cfg.blockDim = dim3(p.threads);
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  // Programmatic-dependent too: the CTAs take their SMs as the previous grid's blocks leave, and all are resident
  // once it completes, which is all the grid barrier needs (the previous grid never waits for this one).
  cfg.numAttrs = 1 + pdl_attribute(&attr[1]);
  return static_cast<int>(cudaLaunchKernelEx(
      &cfg, kKernel, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<T*>(y),
      reinterpret_cast<float2*>(ws), static_cast<uint32_t>(S), static_cast<uint32_t>(C), static_cast<int>(C / G), G,
      p.rows, p.held_rows, p.active, eps));
}

}  // namespace

// GroupNorm (+ SiLU) of channels-last x [N, S, C] (contiguous) in one pass with the whole tensor on chip, as
// fdm_group_norm_nhwc defines it; ws: its workspace, sized for `chunks` statistics chunks a sample (the partials
// here take N * G * CTAs-a-sample float2, CTAs <= chunks). Declines (kGroupNormSm90Declined, nothing launched) where
// x does not fit the device's shared memory and registers in one wave of one CTA an SM, where a group has fewer
// channels than a 16-byte pack or C is not whole packs, or where a pointer is not 16-byte aligned.
int group_norm_nhwc_resident_sm90(const void* x, const void* w, const void* b, void* y, void* ws, int chunks,
                                  int64_t N, int64_t S, int64_t C, int G, float eps, bool silu_act, int dtype,
                                  cudaStream_t stream) {
  if (!aligned16(x) || !aligned16(y) || !aligned16(ws) || (w && !aligned16(w)) || (b && !aligned16(b)) ||
      S * C > int64_t{INT32_MAX})
    return kGroupNormSm90Declined;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    auto wsf = static_cast<float*>(ws);
    return silu_act ? launch_resident<T, true>(x, w, b, y, wsf, chunks, N, S, C, G, eps, stream)
                    : launch_resident<T, false>(x, w, b, y, wsf, chunks, N, S, C, G, eps, stream);
  });
  return kGroupNormSm90Declined;
}

}  // namespace fdm
