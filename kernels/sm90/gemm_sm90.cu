// linear on Hopper (sm_90a): CUTLASS 3.x kernels from the CollectiveBuilder, TMA loads, warp-specialized
// persistent schedules, and one epilogue visitor tree (EVT) that serves every linear flavour:
//
//   out = beta * C + gate[n] * act(acc + bias[n])
//
//   plain linear:    beta = 0 (C never read), gate = null (reads as 1), bias null or set, act at run time
//   gated residual:  beta = 1, C = residual, gate = one row of the [B, N] gate, act = none
//
// gemm.cu launches one problem per batch for the gated form, so a gate row is constant within a launch.
// Two tile configurations per dtype (4 instantiations in all): 128x256 cooperative with 2x1 clusters for large
// problems, 128x128 ping-pong for the rest.
#include "gemm.cuh"

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

namespace fdm {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

struct ActArguments {
  int act = kActNone;
};

template <int Act>
__device__ __forceinline__ float act_of(float x) {
  return apply_act(x, Act);
}

// EVT compute node: gate * act(acc + bias), with the activation picked by a kernel argument.
// Sm90Compute hands the node its Arguments when the functor declares them.
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
    for (int i = 0; i < N; ++i) y[i] = gate[i] * act_of<Act>(acc[i] + bias[i]);
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

template <typename Element, typename TileShape, typename ClusterShape, typename KernelSchedule,
          typename EpilogueSchedule>
struct Sm90Linear {
  static constexpr int kAlign = 16 / sizeof(Element);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // A [N] vector broadcast over rows; a null pointer reads as null_default.
  using RowVector = fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>, kAlign>;
  using GatedBranch = fusion::Sm90EVT<fusion::Sm90Compute<GateActBias, float, float, kRound>,
                                      fusion::Sm90AccFetch, RowVector /*bias*/, RowVector /*gate*/>;
  // beta * C + branch: this node shape is the one CUTLASS specialises to skip loading C when beta == 0.
  using Evt = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Element, float, kRound>,
                              fusion::Sm90ScalarBroadcast<float>, fusion::Sm90SrcFetch<Element>, GatedBranch>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::RowMajor, kAlign,
      Element, cutlass::layout::RowMajor, kAlign, EpilogueSchedule, Evt>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const LinearProblem& p, int sm_count, cudaStream_t stream) {
    const int M = int(p.M), N = int(p.N), K = int(p.K);
    const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    const auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(M, N, 1));
    const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));

    using E = Element;
    const bool gated = p.residual != nullptr;
    typename Evt::Arguments evt{
        {{gated ? 1.0f : 0.0f}, {nullptr}, {}},  // beta
        {},                                      // C
        {
            {},                                             // acc
            {static_cast<const E*>(p.bias), E(0.0f), {}},   // bias, 0 where null
            {static_cast<const E*>(p.gate), E(1.0f), {}},   // gate, 1 where null
            ActArguments{p.act},
        },
        {},  // beta * C + branch
    };
    // C must name valid memory for its TMA descriptor even when it is never read.
    const E* c = static_cast<const E*>(gated ? p.residual : p.out);

    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count;

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const E*>(p.x), stride_a, static_cast<const E*>(p.w), stride_b},
        {evt, c, stride_c, static_cast<E*>(p.out), stride_d},
        hw};

    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (Gemm::get_workspace_size(args) != 0) return kGemmNotSupported;
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kGemmNotSupported;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorLaunchFailure);
    return 0;
  }
};

template <typename E>
using Big = Sm90Linear<E, Shape<_128, _256, _64>, Shape<_2, _1, _1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative>;
template <typename E>
using Small = Sm90Linear<E, Shape<_128, _128, _64>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                         cutlass::epilogue::TmaWarpSpecialized>;

template <typename E>
int run_linear(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  // Large tiles once they fill every SM at least once; otherwise smaller tiles for more parallelism.
  const int64_t big_tiles = ceil_div(p.M, 128) * ceil_div(p.N, 256);
  if (big_tiles >= sm_count) return Big<E>::run(p, sm_count, stream);
  return Small<E>::run(p, sm_count, stream);
}

}  // namespace

int linear_sm90(const LinearProblem& p, int sm_count, cudaStream_t stream) {
  if ((p.gate != nullptr) != (p.residual != nullptr)) return kGemmNotSupported;
  if (p.gate && (p.rows_per_gate < p.M || p.act != kActNone)) return kGemmNotSupported;
  if (p.K % 8 || p.N % 8 || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return kGemmNotSupported;
  for (const void* ptr : {p.x, p.w, p.bias, p.gate, p.residual, static_cast<const void*>(p.out)})
    if (ptr && !aligned16(ptr)) return kGemmNotSupported;
  switch (p.dtype) {
    case FDM_BF16: return run_linear<cutlass::bfloat16_t>(p, sm_count, stream);
    case FDM_F16: return run_linear<cutlass::half_t>(p, sm_count, stream);
    default: return kGemmNotSupported;
  }
}

}  // namespace fdm
