// Fused attention on Hopper (sm_90a): the FlashAttention-3-style mainloop of the CUTLASS Hopper FMHA example
// (examples/88_hopper_fmha in the nvidia-cutlass package), instantiated here with our own output epilogue.
//
// out[b, i, h, :] = sum_j softmax_j(q[b, i, h, :] . k[b, j, h, :] * scale) v[b, j, h, :]     (no mask)
//
// One CTA = one producer warpgroup (TMA loads of Q, K, V) + two math warpgroups of 64 query rows each running
// wgmma for S = Q K^T and O += P V, with the online softmax in fp32 between them. The schedule is persistent
// (one CTA per SM walks the (query tile, batch, head) list) so the next tile's loads overlap this tile's
// epilogue. Sequence tails need no padding: TMA zero-fills rows past Sq / Sk on load and clips them on store,
// and ResidualFusion sets the scores of key columns >= Sk to -inf in the last key tile.
//
// Two tile configurations, each for bf16 and fp16 (4 kernels in all): 128 queries x 128 keys a step for D = 128 and
// for D = 64 (the example validates 128 x 64 for D = 64). Three math warpgroups over 192 queries for D = 64 (FA3's
// shape; the collective takes kNumMmaWarpGroups = 3) measured mixed on the H100 (session 25, us, two warpgroups /
// three): S = 4429 H = 24 277 / 272, SDXL S = 1024 H = 20 B = 2 33.3 / 32.2, but S = 4096 H = 10 B = 2 184 / 200
// (4096 rows are 21.3 tiles of 192): not taken.
//
// This file is compiled with -ftz=true (CMakeLists.txt): the softmax's exp2f is then one MUFU.EX2 instead of a
// range check and two predicated multiplies around it (D = 64 kernel 3104 -> 2480 SASS instructions; H100: 6-8%
// faster at D = 64, D = 128 unchanged).
//
// Why our own epilogue: the example's writes the row log-sum-exp to a float buffer unconditionally, which
// inference never reads; this one only stores O (TMA store through smem), so no workspace is needed.
#include "common.cuh"
#include "cutlass_launch.cuh"

#include <climits>
#include <cmath>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"

#include "88_hopper_fmha/collective/fmha_collective_tma_warpspecialized.hpp"
#include "88_hopper_fmha/collective/fmha_fusion.hpp"
#include "88_hopper_fmha/kernel/fmha_kernel_tma_warpspecialized.hpp"
#include "88_hopper_fmha/kernel/fmha_options.hpp"
#include "88_hopper_fmha/kernel/fmha_tile_scheduler.hpp"

namespace fdm {
namespace {

using namespace cute;
using cutlass::fmha::kernel::Option;
using cutlass::fmha::kernel::Tag;

// Element strides of q, k, v and out as the collective sees them: (seq, head dim, (batch, head)).
using Stride3 = cute::tuple<int, _1, cute::tuple<int, int>>;

// Problem shape of the FMHA kernel: (B, H, Sq, Sk, D).
using FmhaProblem = cute::tuple<int, int, int, int, int>;

// Stores one math warpgroup's output tile [64, D] through smem with TMA (rows past Sq are clipped by TMA).
// It has the interface FmhaKernelTmaWarpSpecialized expects of its epilogue.
template <typename Element, typename TileShapeWG>
struct StoreOutput {
  static constexpr int kAlign = 16 / sizeof(Element);
  // D = acc (alpha 1, no source tensor).
  using Tma = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShapeWG, Shape<_1, _1, _1>,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, Stride3, kAlign, Element, Stride3,
      kAlign, cutlass::epilogue::TmaWarpSpecialized,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>::CollectiveOp;

  using TensorStorage = typename Tma::TensorStorage;
  using PipelineStorage = typename Tma::PipelineStorage;
  using LoadPipeline = typename Tma::LoadPipeline;
  static constexpr int TmaTransactionBytes = Tma::TmaTransactionBytes;

  struct Arguments {
    Element* out;
    Stride3 stride;
  };
  struct Params {
    typename Tma::Params tma;
  };

  // The output as the GEMM epilogue's (M, N, K, L) problem: (Sq, D, 1, (B, H)).
  template <typename Problem, typename K>
  CUTLASS_HOST_DEVICE static auto mnkl(Problem const& p, K k) {
    return make_shape(get<2>(p), get<4>(p), k, make_shape(get<0>(p), get<1>(p)));
  }

  template <typename Problem>
  static Params to_underlying_arguments(Problem const& problem, Arguments const& args, void* workspace) {
    typename Tma::Arguments tma_args{{}, args.out, args.stride, args.out, args.stride};
    return Params{Tma::to_underlying_arguments(mnkl(problem, 1), tma_args, workspace)};
  }

  // result = (O accumulators, row log-sum-exp) from the mainloop; only O is kept.
  template <typename TileShape, typename BlkCoord, typename Result, typename TiledMma, typename Problem>
  CUTLASS_DEVICE void operator()(TileShape const& tile_shape, BlkCoord const& blk_coord, Result const& result,
                                 TiledMma const& tiled_mma, Problem const& problem, Params const& params,
                                 LoadPipeline load_pipeline, TensorStorage& storage) {
    using StorePipeline = typename Tma::StorePipeline;
    typename StorePipeline::Params store_params;
    store_params.always_wait = true;  // the smem tile is reused by the next tile of this warpgroup
    StorePipeline store_pipeline(store_params);

    Tma tma(params.tma, storage);
    auto acc = get<0>(result);
    auto [load_state, store_state] =
        tma.store(load_pipeline, typename Tma::LoadPipelineState{}, store_pipeline,
                  cutlass::make_producer_start_state<StorePipeline>(), mnkl(problem, _1{}), tile_shape,
                  make_coord(get<0>(blk_coord), _0{}, _0{}, get<2>(blk_coord)), acc, tiled_mma,
                  threadIdx.x % cutlass::NumThreadsPerWarpGroup, storage);
    tma.store_tail(load_pipeline, load_state, store_pipeline, store_state);
  }
};

template <typename Element, typename TileShape>
struct Sm90Attention {
  // The example's "ping-pong" configuration: persistent, with Q loaded by its own producer warp.
  using Persistent = Option<Tag::kIsPersistent, true_type>;
  using SeparateQ = Option<Tag::kLoadsQSeparately, true_type>;

  using Mainloop = cutlass::fmha::collective::FmhaMainloopTmaWarpSpecialized<
      Element, float, float, TileShape, Stride3, Stride3, Stride3, cutlass::fmha::collective::ResidualFusion,
      Persistent, SeparateQ>;
  using Epilogue = StoreOutput<Element, typename Mainloop::TileShapePV>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<
      Mainloop, Epilogue, cutlass::fmha::kernel::PersistentTileScheduler, Persistent, SeparateQ>;

  static constexpr int kSmemBytes = Kernel::SharedStorageSize;
  static_assert(kSmemBytes <= 227 * 1024, "shared storage exceeds the sm_90 per-block limit");

  static int run(const void* q, const void* k, const void* v, void* out, const FmhaProblem& problem,
                 const Stride3& sq, const Stride3& sk, const Stride3& sv, const Stride3& so, float scale,
                 int sm_count, cudaStream_t stream) {
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;
    if (const cudaError_t e = cudaGetDevice(&hw.device_id); e != cudaSuccess) return static_cast<int>(e);

    typename Kernel::Arguments args{
        problem,
        {static_cast<const Element*>(q), sq, static_cast<const Element*>(k), sk, static_cast<const Element*>(v),
         sv},
        {static_cast<Element*>(out), so},
        hw};
    // Builds the TMA descriptors of q, k, v and out. Kernel::can_implement is not consulted: besides D it asks
    // Sq % 8 == 0, which nothing in the forward pass needs (TMA bounds rows at any length); attention_sm90 checks
    // what TMA does need. With NDEBUG a descriptor that fails to encode is not reported, hence those checks.
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    // The collective fixes scale = D^-1/2; set ours. The softmax takes the row max of the unscaled scores and
    // scales it afterwards, which is only right for scale > 0 (the caller guarantees that).
    params.mainloop.scale_softmax = scale;
    params.mainloop.scale_softmax_log2 = scale * 1.4426950408889634f;

    // Cluster shape is 1x1x1 (every CTA is its own cluster).
    return launch_cutlass<Kernel>(params, dim3(1, 1, 1), stream);
  }
};

template <typename Element>
using Sm90AttentionD128 = Sm90Attention<Element, Shape<_128, _128, _128>>;
template <typename Element>
using Sm90AttentionD64 = Sm90Attention<Element, Shape<_128, _128, _64>>;

// TMA reads a tensor through a descriptor with one byte stride per dim: each must be a positive multiple of
// 16 bytes (8 elements here) below 2^40, and the collective holds strides as int. A dim of size 1 is never
// stepped along, so its stride is replaced by a valid one (callers pass 0 there). False where a stride cannot
// be expressed.
bool tma_stride(int64_t size, int64_t stride, int64_t substitute, int* result) {
  if (size == 1) stride = substitute;
  if (stride <= 0 || stride % 8 != 0 || stride > INT_MAX) return false;
  *result = static_cast<int>(stride);
  return true;
}

}  // namespace

// Declared in kernels/attention.cu, which dispatches here on sm_90 devices for calls without a mask.
// q, k, v: [B, S, H, D] with element strides (b, s, h) and a contiguous head dim; out: [B, Sq, H, D]
// contiguous. Returns 0 or a cudaError_t once launched; a negative status (with the reason in
// fdm_last_error_message) when this kernel cannot take the call, before touching the GPU.
int attention_sm90(const void* q, const void* k, const void* v, void* out, int64_t B, int64_t Sq, int64_t Sk,
                   int64_t H, int64_t D, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t k_sb, int64_t k_ss,
                   int64_t k_sh, int64_t v_sb, int64_t v_ss, int64_t v_sh, float scale, int dtype, int sm_count,
                   cudaStream_t stream) {
  if (dtype != FDM_BF16 && dtype != FDM_F16) return arg_error("sm90 attention: dtype code %d is not 16-bit", dtype);
  if (D != 64 && D != 128) return arg_error("sm90 attention: head dim %lld is not 64 or 128", (long long)D);
  // Sk = 0 (all rows masked, zeros out) is the mma.sync kernel's case: the collective always reads one key tile.
  if (B < 1 || Sq < 1 || Sk < 1 || H < 1) return arg_error("sm90 attention: empty problem");
  if (!(scale > 0.f) || !std::isfinite(scale)) {
    return arg_error("sm90 attention: scale %g is not positive and finite", static_cast<double>(scale));
  }
  if (B > INT_MAX || Sk > INT_MAX || H > INT_MAX / D || Sq > INT_MAX / (H * D)) {  // out's batch stride is int
    return arg_error("sm90 attention: sizes exceed 32-bit indexing");
  }
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out)) {
    return arg_error("sm90 attention: q, k, v and out must be 16-byte aligned");
  }
  int s[9];
  const int64_t in[9] = {q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh};
  for (int t = 0; t < 3; ++t) {
    const int64_t sizes[3] = {B, t == 0 ? Sq : Sk, H};
    for (int i = 0; i < 3; ++i) {
      if (!tma_stride(sizes[i], in[3 * t + i], D, &s[3 * t + i])) {
        return arg_error("sm90 attention: stride %lld (dim %d of %s) is not a positive multiple of 8 below 2^31",
                         (long long)in[3 * t + i], i, t == 0 ? "q" : t == 1 ? "k" : "v");
      }
    }
  }
  const Stride3 sq = make_stride(s[1], _1{}, make_stride(s[0], s[2]));
  const Stride3 sk = make_stride(s[4], _1{}, make_stride(s[3], s[5]));
  const Stride3 sv = make_stride(s[7], _1{}, make_stride(s[6], s[8]));
  const int hd = static_cast<int>(H * D);
  const Stride3 so = make_stride(hd, _1{}, make_stride(static_cast<int>(Sq) * hd, static_cast<int>(D)));
  const FmhaProblem problem{static_cast<int>(B), static_cast<int>(H), static_cast<int>(Sq), static_cast<int>(Sk),
                            static_cast<int>(D)};

  if (dtype == FDM_BF16) {
    using E = cutlass::bfloat16_t;
    return D == 128 ? Sm90AttentionD128<E>::run(q, k, v, out, problem, sq, sk, sv, so, scale, sm_count, stream)
                    : Sm90AttentionD64<E>::run(q, k, v, out, problem, sq, sk, sv, so, scale, sm_count, stream);
  }
  using E = cutlass::half_t;
  return D == 128 ? Sm90AttentionD128<E>::run(q, k, v, out, problem, sq, sk, sv, so, scale, sm_count, stream)
                  : Sm90AttentionD64<E>::run(q, k, v, out, problem, sq, sk, sv, so, scale, sm_count, stream);
}

}  // namespace fdm
