// The sm90 linear kernel template shared by kernels/sm90/gemm_sm90_<kernel>.cu (one TU per kernel, so the
// configurations build in parallel): CUTLASS 3.x kernels from the CollectiveBuilder, TMA loads, warp-specialized
// persistent schedules, and an epilogue visitor tree (EVT) that serves every linear flavour:
//
//   out = beta * C + gate[n] * act(acc + bias[n])
//
//   plain linear:    beta = 0 (C never read), gate = null (reads as 1), bias null or set, act at run time
//   gated residual:  beta = 1, C = residual, gate = one row of the [B, N] gate, act = none
//
// The lean variant drops C and the gate (out = act(acc + bias[n])): no C staging buffers in shared memory and
// CUTLASS's delayed TMA store, for plain linears only.
//
// gemm.cu launches one problem per batch for the gated form, so a gate row is constant within a launch.
#pragma once
#include "epilogue_act.cuh"
#include "gemm_sm90_dispatch.cuh"
#include "cutlass_launch.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#include <type_traits>

namespace fdm {
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

struct ActArguments {
  int act = kActNone;
};

// EVT compute node: gate * act(acc + bias), with the activation picked by a kernel argument.
// Sm90Compute hands the node its Arguments when the functor declares them. CUTLASS calls the fragment
// specialisation below; the scalar form only completes the functor.
template <typename T>
struct GateActBias {
  using Arguments = ActArguments;
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& bias, T const& gate, Arguments const& args) const {
    return gate * apply_act(acc + bias, args.act);
  }
};

template <typename T, int N>
struct GateActBias<cutlass::Array<T, N>> {
  using Arguments = ActArguments;
  using Frag = cutlass::Array<T, N>;

  template <int Act>
  CUTLASS_DEVICE static void apply(Frag& y, Frag const& acc, Frag const& bias, Frag const& gate) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = gate[i] * epilogue_act<Act>(acc[i] + bias[i]);
  }

  CUTLASS_DEVICE Frag operator()(Frag const& acc, Frag const& bias, Frag const& gate, Arguments const& args) const {
    Frag y;
    // One uniform branch per fragment, with a fully unrolled loop in each arm.
    switch (args.act) {
      case kActGeluTanh: apply<kActGeluTanh>(y, acc, bias, gate); break;
      case kActGelu: apply<kActGelu>(y, acc, bias, gate); break;
      case kActSilu: apply<kActSilu>(y, acc, bias, gate); break;
      default: apply<kActNone>(y, acc, bias, gate); break;
    }
    return y;
  }
};

// EVT compute node of the lean epilogue: act(acc + bias).
template <typename T>
struct ActBias {
  using Arguments = ActArguments;
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& bias, Arguments const& args) const {
    return apply_act(acc + bias, args.act);
  }
};

template <typename T, int N>
struct ActBias<cutlass::Array<T, N>> {
  using Arguments = ActArguments;
  using Frag = cutlass::Array<T, N>;

  template <int Act>
  CUTLASS_DEVICE static void apply(Frag& y, Frag const& acc, Frag const& bias) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = epilogue_act<Act>(acc[i] + bias[i]);
  }

  CUTLASS_DEVICE Frag operator()(Frag const& acc, Frag const& bias, Arguments const& args) const {
    Frag y;
    switch (args.act) {
      case kActGeluTanh: apply<kActGeluTanh>(y, acc, bias); break;
      case kActGelu: apply<kActGelu>(y, acc, bias); break;
      case kActSilu: apply<kActSilu>(y, acc, bias); break;
      default: apply<kActNone>(y, acc, bias); break;
    }
    return y;
  }
};

// The largest dynamic shared memory an sm90 CTA may opt into (227 KiB).
constexpr int kMaxSmemBytes = 232448;

// Where Sm90Linear gets its mainloop and epilogue collectives: Apply<...>::CollectiveMainloop / CollectiveEpilogue,
// given the kernel's tiling, the EVT and the C element (void for the lean epilogue).
// The default asks CUTLASS's CollectiveBuilders; the stage count fills what the epilogue leaves of shared memory.
struct BuilderCollectives {
  template <typename Element, typename TileShape, typename ClusterShape, typename KernelSchedule,
            typename EpilogueSchedule, typename Evt, typename ElementC, int kAlign>
  struct Apply {
    using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, cutlass::layout::RowMajor, kAlign,
        Element, cutlass::layout::RowMajor, kAlign, EpilogueSchedule, Evt>::CollectiveOp;

    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
        cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;
  };
};

// Cooperative collectives whose two consumer warp groups split the CTA tile along N (each computes
// TILE_M x TILE_N/2 with TILE_M/64 wgmma atoms of 64 x TILE_N/2 down M), for tiles the builder cannot split along M
// (TILE_M = 192). Everything else is what the builders would pick, written out because they hard-wire the M split
// (mainloop AtomLayout 2x1x1, cooperative epilogue tiles of 128 rows):
//
// - B rows (output columns) go to the warp groups in interleaved groups of 8, group g to warp group g % 2, through
//   the TiledMma's N permutation. A wgmma operand may have any stride between 8-row core matrices (the
//   descriptor's SBO), so each warp group still reads its B half straight from the swizzled tile, and then the
//   first stmatrix of all 256 threads covers 32 contiguous output columns, as the TMA epilogue's register-to-smem
//   copy requires (with contiguous halves it would span columns 0-15 and N/2 to N/2+15, which no epilogue subtile
//   holds).
// - Epilogue subtiles of 64 x 64 (one wgmma atom's rows; 4096 elements, as the builder's 128 x 32), with the
//   builder's stage counts, copy ops and smem layouts for that subtile.
// - Mainloop: TMA loads (A multicast across a cluster's N extent, B across its M extent), the builder's swizzled
//   K-major smem atoms, and as many stages as fit next to the epilogue (StageCountAutoCarveout's arithmetic).
struct SplitNCollectives {
  template <typename Element, typename TileShape, typename ClusterShape, typename KernelSchedule,
            typename EpilogueSchedule, typename Evt, typename ElementC, int kAlign>
  struct Apply {
    static_assert(std::is_same_v<KernelSchedule, cutlass::gemm::KernelTmaWarpSpecializedCooperative> &&
                  std::is_same_v<EpilogueSchedule, cutlass::epilogue::TmaWarpSpecializedCooperative>);
    static constexpr int kTileM = size<0>(TileShape{}), kTileN = size<1>(TileShape{});
    static_assert(kTileM % 64 == 0 && kTileN % 64 == 0, "64-row wgmma atoms, whole 64 x 64 epilogue subtiles");

    using EpilogueTile = Shape<_64, _64>;
    using EpiloguePolicy = decltype(cutlass::epilogue::collective::detail::sm90_get_tma_dispatch_policy<
                                    TileShape, EpilogueTile, ElementC, Element, EpilogueSchedule>());
    using CollectiveEpilogue = typename cutlass::epilogue::collective::detail::Sm90TmaBuilderImpl<
        TileShape, EpilogueTile, float, float, ElementC, cutlass::layout::RowMajor, kAlign, Element,
        cutlass::layout::RowMajor, kAlign, Evt, EpiloguePolicy>::CollectiveOp;

    // Logical column i + 8 g + (N/2) w of the tiled MMA (w: warp group, g: its 8-column group) is tile column
    // i + 16 g + 8 w.
    using PermuteN = Layout<Shape<_8, Int<kTileN / 16>, _2>, Stride<_1, _16, _8>>;
    using TiledMma = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kTileN / 2>, _64>, GMMA::Major::K,
                             GMMA::Major::K>(),
        Layout<Shape<_1, _2, _1>>{}, Tile<Underscore, PermuteN, Underscore>{}));

    using GmemTiledCopyA = decltype(cutlass::gemm::collective::detail::sm90_cluster_shape_to_tma_atom(
        shape<1>(ClusterShape{})));
    using GmemTiledCopyB = decltype(cutlass::gemm::collective::detail::sm90_cluster_shape_to_tma_atom(
        shape<0>(ClusterShape{})));
    using SmemLayoutAtomA = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, decltype(get<0>(TileShape{})),
                                     decltype(get<2>(TileShape{}))>());
    using SmemLayoutAtomB = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, decltype(get<1>(TileShape{})),
                                     decltype(get<2>(TileShape{}))>());
    static constexpr int kStages = cutlass::gemm::collective::detail::compute_stage_count_or_override<
        cutlass::gemm::collective::detail::sm90_smem_capacity_bytes, Element, Element, TileShape>(
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>{});

    using CollectiveMainloop = cutlass::gemm::collective::CollectiveMma<
        cutlass::gemm::MainloopSm90TmaGmmaWarpSpecialized<kStages, ClusterShape, KernelSchedule>, TileShape,
        Element, cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>, Element,
        cutlass::gemm::TagToStrideB_t<cutlass::layout::ColumnMajor>, TiledMma, GmemTiledCopyA, SmemLayoutAtomA,
        void, cute::identity, GmemTiledCopyB, SmemLayoutAtomB, void, cute::identity>;
  };
};

template <typename Element, typename TileShape, typename ClusterShape, typename KernelSchedule,
          typename EpilogueSchedule, typename SchedulerTag, bool Lean, typename Collectives = BuilderCollectives>
struct Sm90Linear {
  static constexpr int kAlign = 16 / sizeof(Element);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr bool kStreamK = std::is_same_v<SchedulerTag, cutlass::gemm::StreamKScheduler>;

  // A [N] vector broadcast over rows; a null pointer reads as null_default.
  using RowVector = fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>, kAlign>;
  using GatedBranch = fusion::Sm90EVT<fusion::Sm90Compute<GateActBias, float, float, kRound>,
                                      fusion::Sm90AccFetch, RowVector /*bias*/, RowVector /*gate*/>;
  // beta * C + branch: this node shape is the one CUTLASS specialises to skip loading C when beta == 0.
  using FullEvt = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Element, float, kRound>,
                                  fusion::Sm90ScalarBroadcast<float>, fusion::Sm90SrcFetch<Element>, GatedBranch>;
  using LeanEvt = fusion::Sm90EVT<fusion::Sm90Compute<ActBias, Element, float, kRound>, fusion::Sm90AccFetch,
                                  RowVector /*bias*/>;
  using Evt = std::conditional_t<Lean, LeanEvt, FullEvt>;
  using ElementC = std::conditional_t<Lean, void, Element>;

  using Collective = typename Collectives::template Apply<Element, TileShape, ClusterShape, KernelSchedule,
                                                          EpilogueSchedule, Evt, ElementC, kAlign>;
  using CollectiveEpilogue = typename Collective::CollectiveEpilogue;
  using CollectiveMainloop = typename Collective::CollectiveMainloop;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, SchedulerTag>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(Kernel::SharedStorageSize <= kMaxSmemBytes, "configuration does not fit in shared memory");

  static typename Evt::Arguments epilogue_args(const LinearProblem& p) {
    using E = Element;
    if constexpr (Lean) {
      return {
          {},                                            // acc
          {static_cast<const E*>(p.bias), E(0.0f), {}},  // bias, 0 where null
          ActArguments{p.act},
      };
    } else {
      const bool gated = p.residual != nullptr;
      return {
          {{gated ? 1.0f : 0.0f}, {nullptr}, {}},  // beta
          {},                                      // C
          {
              {},                                            // acc
              {static_cast<const E*>(p.bias), E(0.0f), {}},  // bias, 0 where null
              {static_cast<const E*>(p.gate), E(1.0f), {}},  // gate, 1 where null
              ActArguments{p.act},
          },
          {},  // beta * C + branch
      };
    }
  }

  static int run(const LinearProblem& p, const Sm90Config& config, int sm_count, cudaStream_t stream) {
    if (Lean && (p.gate || p.residual)) return kGemmNotSupported;
    const int M = int(p.M), N = int(p.N), K = int(p.K);
    const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    const auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(M, N, 1));
    const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));

    using E = Element;
    using CPtr = std::conditional_t<Lean, const void*, const E*>;
    // C must name valid memory for its TMA descriptor even when it is never read.
    const CPtr c = Lean ? nullptr : static_cast<CPtr>(p.residual ? p.residual : p.out);

    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count;

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const E*>(p.x), stride_a, static_cast<const E*>(p.w), stride_b},
        {epilogue_args(p), c, stride_c, static_cast<E*>(p.out), stride_d},
        hw};

    TileOrder order{config.raster, config.swizzle};
    if (config.raster == kRasterAuto)
      order = auto_tile_order(p.M, p.N, size<0>(TileShape{}), size<1>(TileShape{}), size<0>(ClusterShape{}),
                              size<1>(ClusterShape{}), sm_count);
    using Raster = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = order.raster == kRasterAlongN ? Raster::AlongN : Raster::AlongM;
    args.scheduler.max_swizzle_size = order.swizzle;

    // Stream-K peers wait on each other's partial sums, so like CUTLASS we rely on the persistent grid (one CTA
    // per SM, sm_count CTAs) being resident at once, which holds on a GPU not shared with other work.
    void* workspace = nullptr;
    if constexpr (kStreamK) {
      using Decomp = decltype(args.scheduler.decomposition_mode);
      using Reduction = decltype(args.scheduler.reduction_mode);
      args.scheduler.splits = 1;
      args.scheduler.reduction_mode = Reduction::Deterministic;  // same sums in the same order on every run
      args.scheduler.decomposition_mode = config.decomp == kDecompStreamK     ? Decomp::StreamK
                                          : config.decomp == kDecompHeuristic ? Decomp::Heuristic
                                                                              : Decomp::DataParallel;
      const size_t bytes = Gemm::get_workspace_size(args);
      if (bytes != 0) {
        workspace = stream_workspace(bytes, stream);
        if (!workspace) args.scheduler.decomposition_mode = Decomp::DataParallel;
      }
    } else if (config.decomp != kDecompDataParallel) {
      return kGemmNotSupported;  // the persistent scheduler splits no tiles
    }

    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (!workspace && Gemm::get_workspace_size(args) != 0) return kGemmNotSupported;
    // The adapter's initialize() without its last step, which would reference (and so compile a second copy of)
    // the adapter's own kernel wrapper; launch_cutlass launches ours.
    if (Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) return kGemmNotSupported;
    return launch_cutlass<Kernel>(Kernel::to_underlying_arguments(args, workspace),
                                  dim3(size<0>(ClusterShape{}), size<1>(ClusterShape{}), 1), stream);
  }
};

// The kernel families, by tile shape, cluster shape and schedule.
template <typename E, typename Tile, typename Cluster, bool Lean = false>
using Cooperative = Sm90Linear<E, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                               cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, Lean>;
template <typename E, bool Lean = false>
using Coop128x256 = Cooperative<E, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Lean>;
template <typename E>
using Coop256x128 = Cooperative<E, Shape<_256, _128, _64>, Shape<_1, _2, _1>>;
template <typename E>
using Coop128x128 = Cooperative<E, Shape<_128, _128, _64>, Shape<_1, _1, _1>>;
template <typename E>
using Coop128x160 = Cooperative<E, Shape<_128, _160, _64>, Shape<_1, _1, _1>>;
// 192 x 192 split along N between the warp groups (192 x 96 each): cuBLAS's tiling for large FLUX GEMMs.
template <typename E, bool Lean = false>
using Coop192x192 = Sm90Linear<E, Shape<_192, _192, _64>, Shape<_2, _1, _1>,
                               cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                               cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, Lean,
                               SplitNCollectives>;
template <typename E, typename Cluster>
using Pingpong128x128 = Sm90Linear<E, Shape<_128, _128, _64>, Cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                   cutlass::epilogue::TmaWarpSpecialized, cutlass::gemm::PersistentScheduler, false>;

// Runs Family<bf16> or Family<f16> by p.dtype.
template <template <typename> class Family>
int run_by_dtype(const LinearProblem& p, const Sm90Config& c, int sm_count, cudaStream_t stream) {
  switch (p.dtype) {
    case FDM_BF16: return Family<cutlass::bfloat16_t>::run(p, c, sm_count, stream);
    case FDM_F16: return Family<cutlass::half_t>::run(p, c, sm_count, stream);
    default: return kGemmNotSupported;
  }
}

}  // namespace sm90
}  // namespace fdm
