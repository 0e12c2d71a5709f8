// GroupNorm (+ SiLU) over NCHW x in one pass on Hopper (sm_90a only; called from kernels/norms.cu, which owns the
// C ABI and runs its two-pass kernels where this one declines).
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
// ~7 us). What it does not reach: every CTA needs its whole group's statistics before its first store, so the
// ~33 MB of reads all come before the writes, and a cluster waits for its slowest CTA's copies (load completion
// spreads over ~8 us). At [2, 512, 128, 128] bf16 it runs ~35 us on the H100 against a 25.5 us copy of the same
// bytes and ~39 us for the two-pass kernels; docs/kernel_notes.md, session 11, has the traces and the variants tried.
#include <cooperative_groups.h>

#include <mutex>
#include <vector>

#include "common.cuh"
#include "vec.cuh"

namespace cg = cooperative_groups;

namespace fdm {

// Must equal kGroupNormSm90Declined in norms.cu, which declares group_norm_sm90.
constexpr int kGroupNormSm90Declined = -1000;

namespace {

constexpr int kGnoThreads = 256;
constexpr int kStageBytes = 16384;  // one bulk copy and one mbarrier each; statistics start as each lands
constexpr int kMaxCluster = 16;     // non-portable above 8: granted where the GPU can co-schedule it
constexpr int kRegPacks = 6;        // 16-byte packs a thread holds in registers: 24 KB of a CTA's piece

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// The barrier inits visible to the async (TMA) proxy before any copy signals them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// Global -> this CTA's shared memory, `bytes` (a multiple of 16, both addresses 16-byte aligned), completing on bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "WAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT;\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Shared memory: the piece's held part (rounded up to 16 bytes), then its stage barriers, the per-warp and per-CTA moments, and
// each channel's (scale, shift).
struct GnoLayout {
  uint32_t stages, bars, warp_moments, cta_moments, coef, bytes;
  __host__ __device__ GnoLayout(uint32_t held_bytes, int threads, int channels) {
    stages = (held_bytes + kStageBytes - 1) / kStageBytes;
    bars = (held_bytes + 15) / 16 * 16;
    warp_moments = bars + 8 * stages;
    cta_moments = warp_moments + sizeof(Moments) * (threads / 32);
    coef = (cta_moments + sizeof(Moments) + 7) / 8 * 8;
    bytes = coef + 8 * channels;
  }
};

// Exact moments of this thread's packs p[k] (pack index j0 + k * kThreads, those below nvec), merged into acc.
template <typename T, int V, int K, int kThreads>
__device__ __forceinline__ void packs_moments(const Pack<T, V> (&p)[K], uint32_t j0, uint32_t nvec, Moments& acc) {
  float cnt = 0.f, s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (j0 + k * kThreads < nvec) {
      cnt += V;
#pragma unroll
      for (int e = 0; e < V; ++e) s += pack_f32(p[k], e);
    }
  if (cnt == 0.f) return;
  const float mean = __fdividef(s, cnt);
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (j0 + k * kThreads < nvec) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float c = pack_f32(p[k], e) - mean;
        q = fmaf(c, c, q);
      }
    }
  acc = merge(acc, Moments{cnt, mean, q});
}

// y = act(x * a + c) of one pack.
template <typename T, int V, bool kSilu>
__device__ __forceinline__ Pack<T, V> normalize(const Pack<T, V>& p, float2 ac) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    float v = fmaf(pack_f32(p, e), ac.x, ac.y);
    if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_fast(v);
    out.v[e] = from_f32<T>(v);
  }
  return out;
}

// grid (ranks, N * G), cluster (ranks, 1, 1): CTA r of group n*G + g's cluster holds elements
// [r * piece, min(L, (r+1) * piece)) of it (piece a multiple of V; L: the group's elements), the first `held` of
// them in shared memory and the rest (at most kRegPacks packs a thread) in registers, so four CTAs fit an SM and the
// SDXL shapes' whole tensor is on chip at once.
template <typename T, bool kSilu>
__global__ void __launch_bounds__(kGnoThreads, 4)
group_norm_cluster_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                          T* __restrict__ y, uint32_t L, uint32_t HW, int Cg, int G, uint32_t piece, uint32_t held,
                          float eps) {
  constexpr int V = vec16<T>();
  constexpr int kStagePacks = kStageBytes / 16;
  constexpr int kPacksPerThread = kStagePacks / kGnoThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), ranks = cluster.num_blocks();
  const int64_t ng = blockIdx.y;
  const uint32_t p0 = rank * piece, n = L - p0 < piece ? L - p0 : piece;
  const uint32_t n_smem = n < held ? n : held, nvec = n_smem / V, nvec_regs = (n - n_smem) / V;
  const uint32_t bytes = n_smem * sizeof(T);
  const GnoLayout lay(held * sizeof(T), kGnoThreads, Cg);
  const int stages = static_cast<int>((bytes + kStageBytes - 1) / kStageBytes);
  auto* bars = reinterpret_cast<uint64_t*>(smem + lay.bars);
  auto* warp_m = reinterpret_cast<Moments*>(smem + lay.warp_moments);
  auto* cta_m = reinterpret_cast<Moments*>(smem + lay.cta_moments);
  auto* coef = reinterpret_cast<float2*>(smem + lay.coef);
  const auto* packs = reinterpret_cast<const Pack<T, V>*>(smem);

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[s], 1);
    fence_barrier_init();
    const auto* src = reinterpret_cast<const unsigned char*>(x + ng * L + p0);
    for (int s = 0; s < stages; ++s) {
      const uint32_t off = s * kStageBytes, sz = bytes - off < kStageBytes ? bytes - off : kStageBytes;
      mbar_expect_tx(&bars[s], sz);
      bulk_load(smem + off, src + off, sz, &bars[s]);
    }
  }
  __syncthreads();  // the barriers are initialized before anyone waits on them

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
  for (int s = 0; s < stages; ++s) {
    mbar_wait(&bars[s], 0);
    Pack<T, V> p[kPacksPerThread];
    const uint32_t j0 = s * kStagePacks + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k)
      if (j0 + k * kGnoThreads < nvec) p[k] = packs[j0 + k * kGnoThreads];
    packs_moments<T, V, kPacksPerThread, kGnoThreads>(p, j0, nvec, acc);
  }
  load_regs();
  packs_moments<T, V, kRegPacks, kGnoThreads>(regs, threadIdx.x, nvec_regs, acc);
  acc = group_merge(acc, 32);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_m[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    Moments m = lane < kGnoThreads / 32 ? warp_m[lane] : Moments{0.f, 0.f, 0.f};
    m = group_merge(m, 32);
    if (lane == 0) *cta_m = m;
  }
  cluster.sync();  // every CTA's moments are written (release / acquire across the cluster)
  if (warp == 0) {
    // Every CTA merges the same values in the same lane order, so all of them get the same bits.
    Moments m{0.f, 0.f, 0.f};
    if (lane < static_cast<int>(ranks)) m = *cluster.map_shared_rank(cta_m, lane);
    m = group_merge(m, 32);
    const float rstd = rsqrtf(m.m2 / static_cast<float>(L) + eps);
    const int ch0 = static_cast<int>(ng % G) * Cg;
    for (int c = lane; c < Cg; c += 32) {
      const float a = rstd * (w ? to_f32(w[ch0 + c]) : 1.f);
      coef[c] = make_float2(a, (b ? to_f32(b[ch0 + c]) : 0.f) - m.mean * a);
    }
  }
  cluster.barrier_arrive();  // done reading the other CTAs' shared memory: they may exit once all have arrived
  __syncthreads();           // coef is written

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
  cluster.barrier_wait();
}

// CTAs a group for a group of `group_bytes`: pieces of at most 76 KB (52 KB of shared memory, so four CTAs an SM,
// and 24 KB of registers), so SDXL's largest GroupNorm input, [2, 512, 128, 128] (64 groups of 512 KB), is on chip
// at once: 64 clusters of 7 CTAs. (With 8 CTAs a group, 64 KB pieces, an H100 held only 62 of the 64 clusters at
// once and the last two ran alone after the rest: 37 us instead of ~28.) 0 where a group needs more than 16.
inline int64_t group_ranks(int64_t group_bytes) {
  const int64_t r = ceil_div(group_bytes, 76 << 10);
  return r > kMaxCluster ? 0 : r;
}

// Whether the device can run `cfg` (a cluster shape and shared memory size) of the kernel at all, asked once per
// (device, cluster size, shared memory) and kept: the occupancy query is host work on a hot path. The first time on
// a device also lets the kernel take the largest shared memory and clusters over 8.
template <typename T, bool kSilu>
bool cluster_fits(const cudaLaunchConfig_t& cfg) {
  auto kernel = group_norm_cluster_kernel<T, kSilu>;
  struct Entry {
    int dev;
    unsigned ranks;
    size_t smem;
    bool fits;
  };
  static std::mutex mutex;
  static std::vector<Entry> known;
  static uint64_t prepared = 0;  // devices (bit per ordinal) where the attributes are set
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  const unsigned ranks = cfg.attrs[0].val.clusterDim.x;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : known)
    if (e.dev == dev && e.ranks == ranks && e.smem == cfg.dynamicSmemBytes) return e.fits;
  if (!(prepared >> dev & 1)) {
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin) != cudaSuccess ||
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      return false;
    prepared |= uint64_t{1} << dev;
  }
  int clusters = 0;
  const bool fits = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
  if (known.size() < 256) known.push_back({dev, ranks, cfg.dynamicSmemBytes, fits});
  return fits;
}

template <typename T, bool kSilu>
int launch_cluster(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t HW, int Cg, int G, float eps,
                   cudaStream_t stream) {
  constexpr int V = vec16<T>();
  const int64_t L = int64_t{Cg} * HW, ranks = group_ranks(L * static_cast<int64_t>(sizeof(T)));
  if (ranks == 0) return kGroupNormSm90Declined;
  const int64_t piece = ceil_div(ceil_div(L, ranks), V) * V;
  if ((ranks - 1) * piece >= L) return kGroupNormSm90Declined;  // a rank would get nothing (tiny groups)
  const int64_t in_regs = int64_t{kRegPacks} * kGnoThreads * V, held = piece > in_regs ? piece - in_regs : 0;
  const GnoLayout lay(static_cast<uint32_t>(held * sizeof(T)), kGnoThreads, Cg);

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ranks), static_cast<unsigned>(N * G));
  cfg.blockDim = dim3(kGnoThreads);
  cfg.dynamicSmemBytes = lay.bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(ranks);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (!cluster_fits<T, kSilu>(cfg)) {
    cudaGetLastError();  // a query's failure is not the caller's error
    return kGroupNormSm90Declined;
  }
  return static_cast<int>(cudaLaunchKernelEx(&cfg, group_norm_cluster_kernel<T, kSilu>, x, w, b, y,
                                             static_cast<uint32_t>(L), static_cast<uint32_t>(HW), Cg, G,
                                             static_cast<uint32_t>(piece), static_cast<uint32_t>(held), eps));
}

}  // namespace

// GroupNorm (+ SiLU) of x [N, C, HW] (contiguous) in one pass, as fdm_group_norm defines it. Declines (returns
// kGroupNormSm90Declined, nothing launched) where a group does not fit a cluster's shared memory, where HW is not a
// multiple of the 16-byte pack or a pointer is not 16-byte aligned, or where the device cannot schedule the cluster.
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

}  // namespace fdm
