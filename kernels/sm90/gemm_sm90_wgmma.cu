// sm90 linear kernels written directly in PTX (no CUTLASS), 16-bit:
//   plain linear:    out = act(x @ w^T + bias)
//   gated residual:  out = residual + gate[n] * (x @ w^T + bias)   (one gate row a launch, as gemm.cu splits them)
//
// Why a second kernel family beside the CUTLASS ones: at the FLUX / SDXL / Wan shapes the CUTLASS cooperative
// kernels ran 5-10% behind cuBLAS with the same wgmma shapes, executing ~25% more instructions (session 9 ncu),
// most of it pipeline bookkeeping. These kernels are the same dataflow with nothing else in it.
//
// Shape of the work (Tiling below: 128x256 and 128x160 split along M, 192x192 along N). A cluster of two CTAs (one
// an SM, persistent, as many clusters as fit) walks output tile pairs: CTA rank r takes the tile at tile row
// 2 pm + r, tile column tn, so both need the same kN x K slice of w. Per 64-wide k-block:
//   - producer (warp 0 of warp group 0, one thread): waits until the stage is free in both CTAs, then TMA-loads
//     its kM x 64 x-tile and half of the kN x 64 w-tile, the latter multicast into both CTAs;
//   - consumers (warp groups 1 and 2): each owns 64 rows x kN (split along M) or kM x kN/2 (split along N) of the
//     tile, waits for the stage, issues its wgmmas from shared memory (128B-swizzled K-major operands, 16 of K a
//     step), keeps one k-block of wgmmas in flight and frees the previous stage in both CTAs (the peer's producer
//     writes into it too).
// Epilogue (consumers, per tile): acc + bias, activation, rounded to 16 bits, one 64 x 32 box at a time into a ring
// of shared buffers that TMA stores drain while later boxes are written and the next tile's mainloop runs. The bias
// (and gate) pairs are loaded at the tile's start, so they land during the mainloop; the 192x192 tiling holds only
// one box column's (its 144 accumulators leave no room for a tile's under the 168 registers a 384-thread CTA
// compiles to: that spilled 8-190 bytes) and loads the next column's while storing the current one's three boxes.
// The producer is already loading the next tile's stages. The gated form reads the residual through the
// same ring: a loader thread (warp 1 of warp group 0) TMA-loads each residual box into the slot its output box will
// be written to, as soon as that slot's previous store has left it (so the first boxes of a tile arrive during its
// mainloop), and each thread reads its residual pairs from the positions it then overwrites.
// Edges cost nothing: TMA zero-fills out-of-range loads and clips stores, so any M, any K % 8 == 0 and N % 8 == 0
// work.
#include "bulk_copy.cuh"
#include "cluster.cuh"
#include "cluster_occupancy.cuh"
#include "epilogue_act.cuh"
#include "gemm_sm90_dispatch.cuh"
#include "pdl.cuh"

#include <cuda.h>

#include <type_traits>

namespace fdm {
namespace sm90 {
namespace {

constexpr int kTileK = 64;
constexpr int kThreads = 384;          // producer warp group + two consumer warp groups
constexpr int kBoxBytes = 64 * 32 * 2; // an epilogue store box: 64 rows x 32 columns of 16-bit values
// Epilogue boxes in flight per consumer (a ring of shared buffers). A slot is refilled two boxes after its store was
// issued, so a gated kernel has kRing - 2 residual boxes loaded ahead of the epilogue while the mainloop runs.
constexpr int kRing = 4;
constexpr int kSmemOptin = 232448;     // the most dynamic shared memory an sm90 CTA may opt into (227 KiB)

// A CTA tile of kM x kN, k-blocks of 64. The two consumer warp groups split it along M (64 rows each, one
// wgmma of 64 x kN a k-step) or along N (kN/2 columns each, kM/64 wgmmas of 64 x kN/2 a k-step). A cluster is
// kClusterM x kClusterN tiles: the kClusterM CTAs of a tile column share its w tile, each loading a 1/kClusterM
// share multicast to all of them, and the kClusterN CTAs of a tile row likewise share the x tile.
template <int kM_, int kN_, bool kSplitN_, int kClusterM_ = 2, int kClusterN_ = 1>
struct Tiling {
  static constexpr int kM = kM_, kN = kN_;
  static constexpr bool kSplitN = kSplitN_;
  static constexpr int kClusterM = kClusterM_, kClusterN = kClusterN_, kClusterSize = kClusterM * kClusterN;
  static constexpr int kEmptyArrivals = kClusterSize * 8;  // every consumer warp of the cluster frees a stage
  static constexpr int kRows = kSplitN ? kM : 64;     // a consumer's rows
  static constexpr int kCols = kSplitN ? kN / 2 : kN;  // a consumer's columns (the wgmma N)
  // Where consumer c's rows and columns start within the tile.
  static __device__ __forceinline__ int consumer_row0(int c) { return kSplitN ? 0 : 64 * c; }
  static __device__ __forceinline__ int consumer_col0(int c) { return kSplitN ? kCols * c : 0; }
  static constexpr int kAtoms = kRows / 64;            // wgmmas a k-step
  static constexpr int kAccPerAtom = kCols / 2;        // fp32 accumulators a thread holds per atom
  // Store-box columns (32 wide) whose bias / gate pairs a consumer thread holds at once: all of the tile's where one
  // atom leaves the registers (their loads land during the mainloop); one where three atoms' 144 accumulators do
  // not, refilled a box column ahead, under that column's kAtoms store boxes.
  static constexpr int kParamBoxes = kAtoms == 1 ? kCols / 32 : 1;
  static constexpr int kStageBytesA = kM * kTileK * 2;
  static constexpr int kStageBytesB = kN * kTileK * 2;
  static constexpr int kShareBytesA = kStageBytesA / kClusterN;  // one CTA's multicast share of the x tile
  static constexpr int kShareBytesB = kStageBytesB / kClusterM;  // ... and of the w tile
  static constexpr int kEpilogueBytes = 2 * kRing * kBoxBytes;
  // As many stages as fit beside the epilogue ring, the barriers and the base alignment slack.
  static constexpr int kStages = (kSmemOptin - 1024 - kEpilogueBytes - 512) / (kStageBytesA + kStageBytesB);
  static constexpr int kOffsetB = kStages * kStageBytesA;
  static constexpr int kOffsetEpilogue = kOffsetB + kStages * kStageBytesB;
  static constexpr int kOffsetBarriers = kOffsetEpilogue + kEpilogueBytes;
  // full / empty per stage, then residual full / empty per epilogue ring slot of each consumer
  static constexpr int kBarrierBytes = (2 * kStages + 2 * 2 * kRing) * 8;
  static constexpr int kSmemBytes = kOffsetBarriers + kBarrierBytes + 1024;
  static_assert(kStages >= 3 && kSmemBytes <= kSmemOptin, "too little shared memory for a pipeline");
  static_assert(kM % 64 == 0 && kCols % 32 == 0 && (kN / 2) % 8 == 0);
  static_assert(kShareBytesA % 1024 == 0 && kShareBytesB % 1024 == 0 && (kCols * 128) % 1024 == 0,
                "operand tiles must start on the 1024-byte period of the 128B swizzle");
};

// ---- PTX wrappers --------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Brings a tensor map (a kernel parameter, so not memory another grid writes) into the descriptor cache ahead of
// its first use; legal before wait_for_prior_grids().
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}
// The same box into every CTA of `mask`, at dst's offset, completing on bar's offset in each.
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(map),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes visible to the TMA (async proxy) before a store reads them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor of a K-major operand in 128B-swizzled rows of 64 16-bit values (what the TMA
// writes with CU_TENSOR_MAP_SWIZZLE_128B): start address, stride of 1024 bytes between 8-row core-matrix groups,
// swizzle mode 1 (128B). The leading-byte offset is unused for swizzled K-major layouts. Adding 2 moves the start
// by 32 bytes: the next 16 values of K.
__device__ __forceinline__ uint64_t sw128_desc(const void* tile) {
  const uint64_t addr = smem_addr(tile);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

#define FDM_WGMMA_D48                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47}"
#define FDM_WGMMA_D80 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, " \
  "%68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79}"
#define FDM_WGMMA_D128                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, "  \
  "%68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, "  \
  "%90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, "  \
  "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define FDM_F8(d, i)                                                                     \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define FDM_F48(d, i) FDM_F8(d, i), FDM_F8(d, i + 8), FDM_F8(d, i + 16), FDM_F8(d, i + 24), FDM_F8(d, i + 32), \
                      FDM_F8(d, i + 40)
#define FDM_F80(d, i) FDM_F48(d, i), FDM_F8(d, i + 48), FDM_F8(d, i + 56), FDM_F8(d, i + 64), FDM_F8(d, i + 72)
#define FDM_F64(d, i) FDM_F8(d, i), FDM_F8(d, i + 8), FDM_F8(d, i + 16), FDM_F8(d, i + 24), \
                      FDM_F8(d, i + 32), FDM_F8(d, i + 40), FDM_F8(d, i + 48), FDM_F8(d, i + 56)
// `ops`: the asm operand numbers of a, b and accumulate, which follow the accumulators.
#define FDM_WGMMA(pa, pb, pc, type, list, ...)                                                  \
  asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, " pc ", 0;\n\t"                            \
               "wgmma.mma_async.sync.aligned.m64n" type " " list ", " pa ", " pb ", p, 1, 1, 0, 0;\n}" \
               : __VA_ARGS__                                                                    \
               : "l"(a), "l"(b), "r"(accumulate))

// d[64 x N] (+)= a[64 x 16] b[N x 16]^T, both operands K-major in shared memory; accumulate == 0 overwrites d.
// N = 2 x the accumulator count (96, 160 or 256).
template <typename E, int kAcc>
__device__ __forceinline__ void wgmma_k16(float (&d)[kAcc], uint64_t a, uint64_t b, int accumulate) {
  constexpr bool bf16 = std::is_same_v<E, __nv_bfloat16>;
  if constexpr (kAcc == 128 && bf16) {
    FDM_WGMMA("%128", "%129", "%130", "256k16.f32.bf16.bf16", FDM_WGMMA_D128, FDM_F64(d, 0), FDM_F64(d, 64));
  } else if constexpr (kAcc == 128) {
    FDM_WGMMA("%128", "%129", "%130", "256k16.f32.f16.f16", FDM_WGMMA_D128, FDM_F64(d, 0), FDM_F64(d, 64));
  } else if constexpr (kAcc == 80 && bf16) {
    FDM_WGMMA("%80", "%81", "%82", "160k16.f32.bf16.bf16", FDM_WGMMA_D80, FDM_F80(d, 0));
  } else if constexpr (kAcc == 80) {
    FDM_WGMMA("%80", "%81", "%82", "160k16.f32.f16.f16", FDM_WGMMA_D80, FDM_F80(d, 0));
  } else if constexpr (kAcc == 48 && bf16) {
    FDM_WGMMA("%48", "%49", "%50", "96k16.f32.bf16.bf16", FDM_WGMMA_D48, FDM_F48(d, 0));
  } else if constexpr (kAcc == 48) {
    FDM_WGMMA("%48", "%49", "%50", "96k16.f32.f16.f16", FDM_WGMMA_D48, FDM_F48(d, 0));
  } else {
    static_assert(kAcc == 128 || kAcc == 80 || kAcc == 48, "wgmma N of 96, 160 or 256 only");
  }
}
#undef FDM_WGMMA
#undef FDM_F64
#undef FDM_F80
#undef FDM_F48
#undef FDM_F8
#undef FDM_WGMMA_D128
#undef FDM_WGMMA_D80
#undef FDM_WGMMA_D48

template <typename E>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
}

// The block of cluster tiles a cluster works on at step `block`: blocks walk down `group` block rows, then along
// N, then to the next band of block rows, so a wave of clusters shares few x-rows and few w-columns (L2 reuse).
struct TileWalk {
  int block_rows, block_cols, group;
  __device__ __forceinline__ void locate(int block, int* bm, int* bn) const {
    const int band = block / (group * block_cols);
    const int first = band * group;
    const int rows = min(group, block_rows - first);
    const int q = block - first * block_cols;
    *bm = first + q % rows;
    *bn = q / rows;
  }
};

// The bias pairs (and the gated form's gate pairs) a consumer thread applies to one store box: one pair for each
// of the box's four 8-column groups.
template <bool kGated>
struct BoxParams {
  uint32_t bias[4];
  uint32_t gate[kGated ? 4 : 1];
};

struct KernelArgs {
  const void* bias;  // [N] or null
  const void* gate;  // [N] (the gated form only)
  int N, k_blocks, blocks;
  TileWalk walk;
};

// kGated: out = residual + gate * (acc + bias) with the residual read through map_res (Act is none); otherwise
// out = act(acc + bias) and map_res is unused.
template <typename T, typename E, int Act, bool kGated>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_linear_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
                        const __grid_constant__ CUtensorMap map_out, const __grid_constant__ CUtensorMap map_res,
                        const KernelArgs args) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kOffsetBarriers);
  uint64_t* empty = full + T::kStages;
  uint64_t* res_full = empty + T::kStages;  // [consumer * kRing + slot]: the slot holds its residual box
  uint64_t* res_empty = res_full + 2 * kRing;  // [consumer * kRing + slot]: the slot's last store has left it
  // Epilogue ring slot `slot` of consumer c.
  const auto ring_slot = [smem](int c, int slot) {
    return smem + T::kOffsetEpilogue + (c * kRing + slot) * kBoxBytes;
  };

  const int warp_group = threadIdx.x / 128;
  const uint32_t rank = cluster_rank();
  if (threadIdx.x == 0) {
    prefetch_tensormap(&map_x);
    prefetch_tensormap(&map_w);
    prefetch_tensormap(&map_out);
    if constexpr (kGated) prefetch_tensormap(&map_res);
    for (int s = 0; s < T::kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], T::kEmptyArrivals);
    }
    for (int i = 0; i < 2 * kRing; ++i) {
      mbar_init(&res_full[i], 1);
      mbar_init(&res_empty[i], 1);
    }
    fence_barrier_init();
  }
  cluster_sync();  // every CTA's barriers exist before anyone signals them
  wait_for_prior_grids();  // launched programmatic-dependent: no global access before the previous grid completes
  allow_dependent_grids();

  const int cluster = blockIdx.x / T::kClusterSize, clusters = gridDim.x / T::kClusterSize;
  // This CTA's place in the cluster's tiles, and the cluster CTAs it shares its x tile (same row) and w tile (same
  // column) with, as multicast masks.
  const int rm = int(rank) % T::kClusterM, rn = int(rank) / T::kClusterM;
  uint16_t row_mask = 0, col_mask = 0;
#pragma unroll
  for (int i = 0; i < T::kClusterN; ++i) row_mask |= uint16_t(1u << (rm + i * T::kClusterM));
#pragma unroll
  for (int i = 0; i < T::kClusterM; ++i) col_mask |= uint16_t(1u << (i + rn * T::kClusterM));
  // The first row and column of this CTA's tile in the cluster's block `block`.
  const auto tile_origin = [&args, rm, rn](int block, int* m0, int* n0) {
    int bm, bn;
    args.walk.locate(block, &bm, &bn);
    *m0 = (bm * T::kClusterM + rm) * T::kM;
    *n0 = (bn * T::kClusterN + rn) * T::kN;
  };
  if (warp_group == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int s = 0;
      uint32_t phase = 0;
      for (int block = cluster; block < args.blocks; block += clusters) {
        int m0, n0;
        tile_origin(block, &m0, &n0);
        for (int kb = 0; kb < args.k_blocks; ++kb) {
          mbar_wait(&empty[s], phase ^ 1);
          mbar_expect_tx(&full[s], T::kStageBytesA + T::kStageBytesB);
          uint8_t* a_share = smem + s * T::kStageBytesA + rn * T::kShareBytesA;
          const int a_row = m0 + rn * (T::kM / T::kClusterN);
          if constexpr (T::kClusterN == 1)
            tma_load(a_share, &map_x, &full[s], kb * kTileK, a_row);
          else
            tma_load_multicast(a_share, &map_x, &full[s], kb * kTileK, a_row, row_mask);
          tma_load_multicast(smem + T::kOffsetB + s * T::kStageBytesB + rm * T::kShareBytesB, &map_w, &full[s],
                             kb * kTileK, n0 + rm * (T::kN / T::kClusterM), col_mask);
          if (++s == T::kStages) {
            s = 0;
            phase ^= 1;
          }
        }
      }
    } else if (kGated && threadIdx.x == 32) {
      // The residual loader: every epilogue box of every tile, in the order the consumers write them (column box by
      // column box, its atoms in turn, the two consumers in turn), each into its consumer's ring slot once the
      // slot's previous store has left.
      uint32_t issued = 0;  // boxes issued to each consumer
      for (int block = cluster; block < args.blocks; block += clusters) {
        int m0, n0;
        tile_origin(block, &m0, &n0);
        for (int box = 0; box < T::kCols / 32; ++box) {
          for (int a = 0; a < T::kAtoms; ++a, ++issued) {
            const int slot = int(issued % kRing);
            const uint32_t parity = ((issued / kRing) & 1) ^ 1;
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int row0 = T::consumer_row0(c), col0 = T::consumer_col0(c);
              mbar_wait(&res_empty[c * kRing + slot], parity);
              mbar_expect_tx(&res_full[c * kRing + slot], kBoxBytes);
              tma_load(ring_slot(c, slot), &map_res,
                       &res_full[c * kRing + slot], n0 + col0 + 32 * box, m0 + row0 + 64 * a);
            }
          }
        }
      }
    }
  } else {
    setmaxnreg_inc<232>();
    const int consumer = warp_group - 1;
    // Every CTA of the cluster waits for every consumer warp of the cluster before refilling a stage (a CTA's
    // stage holds shares from its row's and its column's CTAs; one count for all keeps the barriers uniform).
    const auto release_stage = [](uint64_t* bar) {
#pragma unroll
      for (int r = 0; r < T::kClusterSize; ++r) mbar_arrive_cluster(bar, r);
    };
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
    // This consumer's rows and columns within the tile, and its slices of the stage buffers.
    const int row0 = T::consumer_row0(consumer), col0 = T::consumer_col0(consumer);
    const E* bias = static_cast<const E*>(args.bias);
    const E* gate = static_cast<const E*>(args.gate);
    // The bias (and gate) pairs of the store box whose first column is n: for its 8-column group g, columns
    // n + 8 g + 2 (lane % 4) + {0, 1}.
    const auto box_params = [&](int n) {
      BoxParams<kGated> p;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int col = n + 8 * g + 2 * (lane % 4);
        p.bias[g] = bias && col < args.N ? __ldg(reinterpret_cast<const unsigned int*>(bias + col)) : 0u;
        if constexpr (kGated) p.gate[g] = col < args.N ? __ldg(reinterpret_cast<const unsigned int*>(gate + col)) : 0u;
      }
      return p;
    };
    float acc[T::kAtoms][T::kAccPerAtom];
    int s = 0;
    uint32_t phase = 0;
    uint32_t boxes = 0;  // epilogue boxes this consumer has stored: the next one goes to ring slot boxes % kRing
    for (int block = cluster; block < args.blocks; block += clusters) {
      int m0, n0;
      tile_origin(block, &m0, &n0);
      // The first kParamBoxes box columns' bias (and gate) pairs, fetched now so the loads land during the mainloop.
      BoxParams<kGated> params[T::kParamBoxes];
#pragma unroll
      for (int i = 0; i < T::kParamBoxes; ++i) params[i] = box_params(n0 + col0 + 32 * i);

      int prev = -1;
      for (int kb = 0; kb < args.k_blocks; ++kb) {
        mbar_wait(&full[s], phase);
        const uint64_t da = sw128_desc(smem + s * T::kStageBytesA + row0 * 128);
        const uint64_t db = sw128_desc(smem + T::kOffsetB + s * T::kStageBytesB + col0 * 128);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < kTileK / 16; ++j) {
#pragma unroll
          for (int a = 0; a < T::kAtoms; ++a)
            wgmma_k16<E>(acc[a], da + (a * 64 * 128 >> 4) + 2 * j, db + 2 * j, kb | j);
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous k-block's wgmmas are done: free its stage in every CTA that writes to it
        if (prev >= 0 && lane == 0) release_stage(&empty[prev]);
        prev = s;
        if (++s == T::kStages) {
          s = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
      if (prev >= 0 && lane == 0) release_stage(&empty[prev]);

      // Epilogue, one store box (64 rows x 32 columns) at a time through a ring of kRing shared buffers, so
      // boxes are written while earlier ones drain to global memory; column box by column box, so that one box's
      // bias and gate pairs serve every atom. In atom a, thread (warp, lane) holds rows warp*16 + lane/4 (+8) and,
      // for 8-column group i, acc[a][4 i + {0, 1}] on the first row and acc[a][4 i + {2, 3}] on the second. One
      // barrier a box: when every thread has passed box j's barrier, thread 0 has seen the stores of boxes up to
      // j + 2 - kRing leave their buffers (it waits right after issuing each store), so the slots of boxes j + 1
      // and j + 2 are free.
      const int row = warp * 16 + lane / 4;
#pragma unroll
      for (int box = 0; box < T::kCols / 32; ++box) {
#pragma unroll
        for (int a = 0; a < T::kAtoms; ++a) {
          const int slot = int(boxes % kRing);
          uint8_t* buf = ring_slot(consumer, slot);
          if constexpr (kGated) mbar_wait(&res_full[consumer * kRing + slot], (boxes / kRing) & 1);
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            const BoxParams<kGated>& p = params[box % T::kParamBoxes];
            const float2 b = unpack2<E>(p.bias[g]);
            const float* v = &acc[a][4 * (4 * box + g)];
            // 16-byte chunk g of the row's 64 bytes, swizzled (64B) by bits 1-2 of the row; rows r and r + 8 share
            // the pattern.
            const int chunk = ((g ^ ((row / 2) % 4)) * 16) + 4 * (lane % 4);
            uint32_t* lo_at = reinterpret_cast<uint32_t*>(buf + row * 64 + chunk);
            uint32_t* hi_at = reinterpret_cast<uint32_t*>(buf + (row + 8) * 64 + chunk);
            if constexpr (kGated) {
              const float2 gt = unpack2<E>(p.gate[g]), r_lo = unpack2<E>(*lo_at), r_hi = unpack2<E>(*hi_at);
              *lo_at = pack2<E>(r_lo.x + gt.x * (v[0] + b.x), r_lo.y + gt.y * (v[1] + b.y));
              *hi_at = pack2<E>(r_hi.x + gt.x * (v[2] + b.x), r_hi.y + gt.y * (v[3] + b.y));
            } else {
              *lo_at = pack2<E>(epilogue_act<Act>(v[0] + b.x), epilogue_act<Act>(v[1] + b.y));
              *hi_at = pack2<E>(epilogue_act<Act>(v[2] + b.x), epilogue_act<Act>(v[3] + b.y));
            }
          }
          // A box column kParamBoxes ahead takes this one's registers, loaded under this box's barrier and store.
          if (a + 1 == T::kAtoms && box + T::kParamBoxes < T::kCols / 32)
            params[box % T::kParamBoxes] = box_params(n0 + col0 + 32 * (box + T::kParamBoxes));
          fence_proxy_async();
          named_barrier(1 + consumer, 128);
          if (t == 0) {
            tma_store(&map_out, buf, n0 + col0 + 32 * box, m0 + row0 + 64 * a);
            bulk_commit();
            bulk_wait_read<kRing - 2>();
            // The store of box boxes - (kRing - 2) has left its slot: the loader may refill it.
            if (kGated && boxes >= kRing - 2)
              mbar_arrive(&res_empty[consumer * kRing + (boxes - (kRing - 2)) % kRing]);
          }
          ++boxes;
        }
      }
    }
    if (t == 0) bulk_wait<0>();
  }
  cluster_sync();  // peers may still signal our barriers or multicast into our stages until they are done
}

// ---- host side ---------------------------------------------------------------------------------------------------
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A row-major [rows, cols] 16-bit matrix moved in boxes of box_rows x box_cols: operands in 64 columns (128-byte
// rows, 128B swizzle, as wgmma reads them), the epilogue's output and residual in 32 (64-byte rows, 64B swizzle, as
// the epilogue writes them).
bool make_map(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int box_rows, bool bf16, bool operand) {
  EncodeTiled encode = encode_tiled();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  const cuuint32_t box[2] = {operand ? 64u : 32u, cuuint32_t(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                operand ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                operand ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, typename E, int Act, bool kGated>
int launch(const LinearProblem& p, const Sm90Config& c, cudaStream_t stream) {
  const bool bf16 = std::is_same_v<E, __nv_bfloat16>;
  CUtensorMap map_x, map_w, map_out, map_res;
  if (!make_map(&map_x, p.x, p.M, p.K, T::kM / T::kClusterN, bf16, true) ||
      !make_map(&map_w, p.w, p.N, p.K, T::kN / T::kClusterM, bf16, true) ||
      !make_map(&map_out, p.out, p.M, p.N, 64, bf16, false) ||
      !make_map(&map_res, kGated ? p.residual : p.out, p.M, p.N, 64, bf16, false))
    return kGemmNotSupported;

  const int tiles_m = int(ceil_div(p.M, T::kM)), tiles_n = int(ceil_div(p.N, T::kN));
  KernelArgs args = {};
  args.bias = p.bias;
  args.gate = p.gate;
  args.N = int(p.N);
  args.k_blocks = int(ceil_div(p.K, kTileK));
  args.walk.block_rows = int(ceil_div(tiles_m, T::kClusterM));
  args.walk.block_cols = int(ceil_div(tiles_n, T::kClusterN));
  args.blocks = args.walk.block_rows * args.walk.block_cols;

  cudaLaunchAttribute attrs[2] = {cluster_attribute(dim3(T::kClusterSize))};
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = T::kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = 1;
  cfg.gridDim = dim3(T::kClusterSize);  // one cluster for the occupancy query; the grid is sized by its answer
  constexpr auto kKernel = wgmma_linear_kernel<T, E, Act, kGated>;
  const int resident = resident_clusters<kKernel>(cfg);
  if (resident <= 0) {
    cudaGetLastError();  // a query's failure is not the caller's error
    return kGemmNotSupported;
  }
  DeviceFacts dev;
  if (current_device_facts(&dev) != 0) dev.l2_mib = 0;  // then the band goes by the reads alone
  args.walk.group = c.swizzle > 0 ? c.swizzle
                                   : wgmma_band_rows(args.walk.block_rows, args.walk.block_cols, T::kM * T::kClusterM,
                                                     T::kN * T::kClusterN, resident, p.K, int64_t(dev.l2_mib) << 20);
  cfg.gridDim = dim3(T::kClusterSize * (args.blocks < resident ? args.blocks : resident));
  cfg.numAttrs += pdl_attribute(&attrs[1]);
  if (cudaLaunchKernelEx(&cfg, kKernel, map_x, map_w, map_out, map_res, args) != cudaSuccess) return launch_status();
  return 0;
}

template <typename T, typename E>
int launch_act(const LinearProblem& p, const Sm90Config& c, cudaStream_t stream) {
  switch (p.act) {
    case kActNone: return launch<T, E, kActNone, false>(p, c, stream);
    case kActGeluTanh: return launch<T, E, kActGeluTanh, false>(p, c, stream);
    case kActGelu: return launch<T, E, kActGelu, false>(p, c, stream);
    case kActSilu: return launch<T, E, kActSilu, false>(p, c, stream);
    default: return kGemmNotSupported;
  }
}

template <typename T>
int launch_tiling(const LinearProblem& p, const Sm90Config& c, cudaStream_t stream) {
  // A gated residual needs both operands and no activation (linear_sm90 also keeps it to one gate row a launch).
  if ((p.gate != nullptr) != (p.residual != nullptr) || p.K <= 0 || p.M <= 0 || p.N <= 0) return kGemmNotSupported;
  if (p.gate) {
    if (p.act != kActNone) return kGemmNotSupported;
    if (p.dtype == FDM_BF16) return launch<T, __nv_bfloat16, kActNone, true>(p, c, stream);
    if (p.dtype == FDM_F16) return launch<T, __half, kActNone, true>(p, c, stream);
    return kGemmNotSupported;
  }
  if (p.dtype == FDM_BF16) return launch_act<T, __nv_bfloat16>(p, c, stream);
  if (p.dtype == FDM_F16) return launch_act<T, __half>(p, c, stream);
  return kGemmNotSupported;
}

}  // namespace

// The grid is as many clusters as the device holds at once, so sm_count is not needed.
int run_wgmma128x256(const LinearProblem& p, const Sm90Config& c, int, cudaStream_t stream) {
  return launch_tiling<Tiling<128, 256, false>>(p, c, stream);
}
int run_wgmma192x192(const LinearProblem& p, const Sm90Config& c, int, cudaStream_t stream) {
  return launch_tiling<Tiling<192, 192, true>>(p, c, stream);
}
int run_wgmma128x160(const LinearProblem& p, const Sm90Config& c, int, cudaStream_t stream) {
  return launch_tiling<Tiling<128, 160, false>>(p, c, stream);
}
int run_wgmma128x160c2x2(const LinearProblem& p, const Sm90Config& c, int, cudaStream_t stream) {
  return launch_tiling<Tiling<128, 160, false, 2, 2>>(p, c, stream);
}

}  // namespace sm90
}  // namespace fdm
