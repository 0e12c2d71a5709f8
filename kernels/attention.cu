// Fused multi-head attention forward, FlashAttention-2 style, on mma.sync tensor cores (sm_80 and later).
//
// out[b, i, h, :] = sum_j softmax_j(q[b, i, h, :] . k[b, j, h, :] * scale + mask[b, j]) v[b, j, h, :]
//
// One CTA computes a 128-row Q tile of one (batch, head): 8 warps, each owning 16 query rows whose Q fragments
// stay in registers for the whole key loop. K and V tiles of 64 keys stream through shared memory with cp.async,
// double buffered so the next tile loads while the current one is multiplied. Softmax runs online in fp32 in the
// exp2 domain (scale * log2(e) folded into one multiply); P is rounded to the input type and fed straight from
// the S accumulators into the P.V mma (the C layout of m16n8 equals the A layout of m16n8k16 for two n-blocks).
// Shared-memory rows are XOR-swizzled in 16-byte chunks so ldmatrix and cp.async are free of bank conflicts.
//
// On Hopper (sm_90) the calls the wgmma/TMA kernel of kernels/sm90/attention_sm90.cu can take go there instead
// (see fdm_attention); fdm_attention_set_path / fdm_attention_last_path let tests force and observe the choice.
#include "common.cuh"
#include "gemm.cuh"  // current_device_facts

#include <climits>
#include <cmath>

namespace {

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 64;   // keys per K/V tile
constexpr int kWarps = kBlockM / 16;
constexpr int kThreads = kWarps * 32;

template <int D>
struct Cfg {
  static constexpr int kChunks = D / 8;            // 16-byte chunks per row
  static constexpr int kTile = kBlockN * D;        // elements in one K or V tile
  // Smem: [K0][V0][K1][V1] then the key bias [2][kBlockN]. Q is staged in [K1][V1] before the loop and the
  // output in [K0][V0] after it, so both must fit in two tiles.
  static_assert(kBlockM * D <= 2 * kTile, "Q/O staging must fit in one K+V stage");
  static constexpr int kSmemBytes = 4 * kTile * 2 + 2 * kBlockN * 4;
  // D=64 fits two CTAs per SM in the register file (<=128 registers); D=128 needs more and runs one.
  static constexpr int kMinBlocks = D == 64 ? 2 : 1;
};

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;  // [B, Sk] row stride mask_sb, nonzero = attend; nullptr = attend everywhere
  void* out;            // [B, Sq, H, D] contiguous
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, mask_sb;
  int sq, sk, h;
  float scale_log2;  // scale * log2(e)
};

// Element offset of (row, col) in a [rows, D] tile whose 16-byte chunks are XOR-swizzled by row % 8.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros (rows past the end of the sequence) without reading src.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b on one m16n8k16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

using fdm::pack2;  // kernels/common.cuh

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per-thread part of the tile copies: a thread always moves chunk `c` of rows r, r + kStep, r + 2 kStep, ...
// (kStep is a multiple of 8, so the swizzle of its chunk is the same in every row it moves).
template <int D>
struct TileLoader {
  static constexpr int kChunks = Cfg<D>::kChunks;
  static constexpr int kStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kStep % 8 == 0, "loader rows must keep one swizzle per thread");
  int r;           // first row this thread moves
  int c;           // its 16-byte chunk within a row
  uint32_t s_off;  // byte offset of (r, c) in a swizzled tile

  __device__ __forceinline__ explicit TileLoader(int tid)
      : r(tid / kChunks),
        c(tid % kChunks),
        s_off(static_cast<uint32_t>(swz<D>(tid / kChunks, (tid % kChunks) * 8) * 2)) {}

  // Async copy of rows [row0, row0 + ROWS) of a [seq, D] matrix at `g` (row stride `stride` elements) into the
  // tile at smem address `s_tile`; rows at or past `seq` are zero-filled so they add nothing to P.V.
  template <int ROWS, typename T>
  __device__ __forceinline__ void load(uint32_t s_tile, const T* g, int64_t stride, int row0, int seq) const {
    static_assert(ROWS % kStep == 0, "tile rows must divide evenly among threads");
    const T* src = g + static_cast<int64_t>(row0 + r) * stride + c * 8;
#pragma unroll
    for (int i = 0; i < ROWS / kStep; ++i) {
      const bool valid = row0 + r + i * kStep < seq;
      cp_async16(s_tile + s_off + i * kStep * D * 2, valid ? src : g, valid ? 16 : 0);
      src += kStep * stride;
    }
  }
};

// Additive bias of key `col` in the exp2 domain: 0 where it may be attended, -inf where masked or past Sk.
__device__ __forceinline__ float key_bias(const uint8_t* mask_row, int col, int sk) {
  if (col >= sk) return -INFINITY;
  return (mask_row == nullptr || mask_row[col] != 0) ? 0.f : -INFINITY;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Cfg<D>::kMinBlocks) attention_fwd_kernel(const Params p) {
  using C = Cfg<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  T* const s_base = reinterpret_cast<T*>(smem);
  float* const s_bias = reinterpret_cast<float*>(s_base + 4 * C::kTile);  // [2][kBlockN]
  T* const s_q = s_base + 2 * C::kTile;                                   // aliases stage 1
  T* const s_o = s_base;                                                  // aliases stage 0

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // row within the 8-row half of an mma tile
  const int t = lane & 3;   // column pair within an n8 block
  const int q0 = blockIdx.x * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;

  // This (batch, head)'s q/k/v. The key loop recomputes the k/v addresses from the parameters rather than keep
  // kg/vg live: at D=64's 128-register cap that is what keeps ptxas from spilling (checked with -Xptxas -v).
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const uint8_t* mask_row = p.mask ? p.mask + b * p.mask_sb : nullptr;
  const bool has_mask = p.mask != nullptr;
  const int n_tiles = (p.sk + kBlockN - 1) / kBlockN;

  const uint32_t s_base_addr = smem_addr(s_base);
  constexpr uint32_t kTileBytes = C::kTile * 2;
  const TileLoader<D> loader(tid);

  // Prologue: Q (into stage 1) and tile 0 of K/V in one group.
  loader.template load<kBlockM>(s_base_addr + 2 * kTileBytes, qg, p.q_ss, q0, p.sq);
  loader.template load<kBlockN>(s_base_addr, kg, p.k_ss, 0, p.sk);
  loader.template load<kBlockN>(s_base_addr + kTileBytes, vg, p.v_ss, 0, p.sk);
  cp_async_commit();
  if (tid < kBlockN) s_bias[tid] = key_bias(mask_row, tid, p.sk);
  cp_async_wait<0>();
  __syncthreads();

  // Q fragments (A operand) of this warp's 16 rows, all of D.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    const int row = warp * 16 + (lane & 15);
    const int col = kd * 16 + (lane >> 4) * 8;
    ldmatrix_x4(qf[kd], smem_addr(s_q + swz<D>(row, col)));
  }
  __syncthreads();  // stage 1 (holding Q) is overwritten by the first prefetch

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (exp2 domain) of rows g and g + 8
  float l0 = 0.f, l1 = 0.f;              // this thread's share of the running row sums

  // Per-lane ldmatrix byte offsets: rows are fixed per lane; the chunk index is XORed with row % 8 = lane % 8.
  const uint32_t k_lane = ((lane & 7) + (lane >> 4) * 8) * D * 2;
  const int k_x = ((lane >> 3) & 1) ^ (lane & 7);
  const uint32_t v_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * D * 2;
  const int v_x = (lane >> 4) ^ (lane & 7);

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    const int n0 = j * kBlockN;

    // Prefetch tile j + 1 into the other stage; its mask bytes are read now and stored after the math so the
    // global-load latency hides under it.
    uint8_t next_keep = 0;
    if (j + 1 < n_tiles) {
      const uint32_t s_next = s_base_addr + (stage ^ 1) * 2 * kTileBytes;
      loader.template load<kBlockN>(s_next, static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh, p.k_ss,
                                    n0 + kBlockN, p.sk);
      loader.template load<kBlockN>(s_next + kTileBytes, static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh,
                                    p.v_ss, n0 + kBlockN, p.sk);
      const int col = n0 + kBlockN + tid;
      if (tid < kBlockN && col < p.sk) next_keep = mask_row ? mask_row[col] : 1;
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued: tile j is in smem
    __syncthreads();

    // S = Q K^T for 16 rows x 64 keys per warp.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, s_base_addr + stage * 2 * kTileBytes + np * (16 * D * 2) + k_lane + (((kd * 2) ^ k_x) << 4));
        mma16816<T>(s[2 * np], qf[kd], bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qf[kd], bk[2], bk[3]);
      }
    }

    // Online softmax in the exp2 domain. Scaling before the max keeps it right for any sign of scale.
    const bool masked_tile = has_mask || n0 + kBlockN > p.sk;
    const float* bias = s_bias + stage * kBlockN;
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] *= p.scale_log2;
    }
    if (masked_tile) {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
        const float2 bb = *reinterpret_cast<const float2*>(bias + i * 8 + 2 * t);
        s[i][0] += bb.x;
        s[i][1] += bb.y;
        s[i][2] += bb.x;
        s[i][3] += bb.y;
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
      mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][1]));
      mx1 = fmaxf(mx1, fmaxf(s[i][2], s[i][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {  // the 4 threads of a quad share a row
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float new0 = fmaxf(m0, mx0);
    const float new1 = fmaxf(m1, mx1);
    // A row with every key so far masked has max -inf: subtract 0 instead so exp2 gives 0, not NaN.
    const float base0 = new0 == -INFINITY ? 0.f : new0;
    const float base1 = new1 == -INFINITY ? 0.f : new1;
    const float alpha0 = ex2(m0 - base0);
    const float alpha1 = ex2(m1 - base1);
    m0 = new0;
    m1 = new1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= alpha0;
      o[i][1] *= alpha0;
      o[i][2] *= alpha1;
      o[i][3] *= alpha1;
    }
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
      s[i][0] = ex2(s[i][0] - base0);
      s[i][1] = ex2(s[i][1] - base0);
      s[i][2] = ex2(s[i][2] - base1);
      s[i][3] = ex2(s[i][3] - base1);
      l0 += s[i][0] + s[i][1];
      l1 += s[i][2] + s[i][3];
    }

    // O += P V: P comes from the S accumulators, V fragments through ldmatrix.trans.
    uint32_t pa[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, s_base_addr + stage * 2 * kTileBytes + kTileBytes + kk * (16 * D * 2) + v_lane +
                                  (((dp * 2) ^ v_x) << 4));
        mma16816<T>(o[2 * dp], pa[kk], bv[0], bv[1]);
        mma16816<T>(o[2 * dp + 1], pa[kk], bv[2], bv[3]);
      }
    }

    if (tid < kBlockN && j + 1 < n_tiles) {
      s_bias[(stage ^ 1) * kBlockN + tid] = next_keep ? 0.f : -INFINITY;
    }
    __syncthreads();  // stage `stage` is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // Normalise; a row whose keys were all masked has l = 0 and outputs zeros.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  // l >= 1 wherever a key was attended (the row max contributes exp2(0)), so the fast reciprocal is exact enough.
  const float inv0 = l0 > 0.f ? __fdividef(1.f, l0) : 0.f;
  const float inv1 = l1 > 0.f ? __fdividef(1.f, l1) : 0.f;

  // Stage the output tile in smem (stage 0, free after the loop's last barrier) for 16-byte global stores.
  const int r0 = warp * 16 + g;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(s_o + swz<D>(r0, col)) = pack2<T>(o[i][0] * inv0, o[i][1] * inv0);
    *reinterpret_cast<uint32_t*>(s_o + swz<D>(r0 + 8, col)) = pack2<T>(o[i][2] * inv1, o[i][3] * inv1);
  }
  __syncthreads();

  T* const og = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kBlockM * C::kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / C::kChunks;
    const int c = idx % C::kChunks;
    const int row = q0 + r;
    if (row < p.sq) {
      const int64_t off = ((static_cast<int64_t>(b) * p.sq + row) * p.h + h) * D + c * 8;
      *reinterpret_cast<uint4*>(og + off) = *reinterpret_cast<const uint4*>(s_o + swz<D>(r, c * 8));
    }
  }
}

template <typename T, int D>
int launch(const Params& p, int64_t batch, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, D>;
  constexpr int smem = Cfg<D>::kSmemBytes;
  // Above 48 KiB dynamic smem needs the opt-in; cheap enough to set on every call (and correct per device).
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const dim3 grid(static_cast<unsigned>(fdm::ceil_div(p.sq, kBlockM)), static_cast<unsigned>(p.h),
                  static_cast<unsigned>(batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return fdm::launch_status();
}

// Which kernel ran last / is forced (fdm_attention_set_path, fdm_attention_last_path; used by tests).
enum AttentionPath : int { kAttnAuto = 0, kAttnSm90 = 1, kAttnMma = 2 };
int g_force_path = kAttnAuto;
int g_last_path = kAttnAuto;

}  // namespace

#ifdef FASTDM_HAS_SM90
namespace fdm {
// kernels/sm90/attention_sm90.cu: the Hopper kernel for calls without a mask. Same q/k/v/out conventions and
// strides as fdm_attention. Returns 0 or a cudaError_t once it launched; a negative status, with the reason in
// fdm_last_error_message(), where it cannot take the call (it then touches nothing).
extern int attention_sm90(const void* q, const void* k, const void* v, void* out, int64_t B, int64_t Sq,
                          int64_t Sk, int64_t H, int64_t D, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t k_sb,
                          int64_t k_ss, int64_t k_sh, int64_t v_sb, int64_t v_ss, int64_t v_sh, float scale,
                          int dtype, int sm_count, cudaStream_t stream);
}  // namespace fdm
#endif

// q: [B, Sq, H, D], k, v: [B, Sk, H, D] with element strides (b, s, h) each and a contiguous last dim;
// key_padding_mask: [B, Sk] uint8/bool with batch stride mask_sb (contiguous keys), nonzero = attend, or null;
// out: [B, Sq, H, D] contiguous. dtype: FDM_F16 or FDM_BF16 for q, k, v and out; D: 64 or 128.
// Rows whose keys are all masked (or Sk = 0) come out as zeros, as ops.cpu.attention defines.
FDM_API int fdm_attention(const void* q, const void* k, const void* v, const void* key_padding_mask, void* out,
                          int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D, int64_t q_sb, int64_t q_ss,
                          int64_t q_sh, int64_t k_sb, int64_t k_ss, int64_t k_sh, int64_t v_sb, int64_t v_ss,
                          int64_t v_sh, int64_t mask_sb, float scale, int dtype, cudaStream_t stream) {
  if (dtype != FDM_F16 && dtype != FDM_BF16) {
    return fdm::arg_error("unsupported dtype code %d (want f16 or bf16)", dtype);
  }
  if (D != 64 && D != 128) {
    return fdm::arg_error("head dim %lld is not supported (want 64 or 128)", (long long)D);
  }
  if (B < 0 || Sq < 0 || Sk < 0 || H < 0) {
    return fdm::arg_error("negative size (B=%lld, Sq=%lld, Sk=%lld, H=%lld)", (long long)B,
                          (long long)Sq, (long long)Sk, (long long)H);
  }
  if (B == 0 || Sq == 0 || H == 0) return 0;
  if (Sq > INT_MAX - kBlockM || Sk > INT_MAX - kBlockN || H > 65535 || B > 65535) {
    return fdm::arg_error("sizes out of range (B=%lld and H=%lld must be <= 65535, Sq=%lld and "
                          "Sk=%lld < 2^31)", (long long)B, (long long)H, (long long)Sq, (long long)Sk);
  }
  // Sk = 0 is allowed: every row is fully masked and comes out as zeros (k and v are then never read).
  if (!q || !out || (Sk > 0 && (!k || !v))) return fdm::arg_error("null q, k, v or out pointer");
  // cp.async moves 16-byte chunks: every row start must be 16-byte aligned.
  const int64_t strides[9] = {q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh};
  for (int64_t s : strides) {
    if (s % 8 != 0) {
      return fdm::arg_error("q/k/v strides must be multiples of 8 elements (got %lld); pass "
                            "contiguous tensors", (long long)s);
    }
  }
  if (!fdm::aligned16(q) || !fdm::aligned16(k) || !fdm::aligned16(v) || !fdm::aligned16(out)) {
    return fdm::arg_error("q, k, v and out must be 16-byte aligned; pass contiguous tensors");
  }
  if (key_padding_mask && mask_sb < 0) return fdm::arg_error("negative mask batch stride");

  // Hopper: calls without a key padding mask on an sm_90 device go to the wgmma/TMA kernel. It refuses (negative
  // status with the reason, nothing launched) Sk = 0, a scale that is not positive and finite, Sq * H * D >= 2^31,
  // and q/k/v strides TMA cannot express (0 on a dim of size > 1, or >= 2^31); refused calls run on the mma.sync
  // kernel below unless the sm90 path is forced, which then fails with the reason instead.
  if (g_force_path != kAttnMma) {
#ifdef FASTDM_HAS_SM90
    fdm::DeviceFacts dev;
    if (const int e = fdm::current_device_facts(&dev)) return e;
    const bool sm90 = dev.cc_major == 9 && dev.cc_minor == 0;
    int st = -1;
    if (sm90 && !key_padding_mask) {
      st = fdm::attention_sm90(q, k, v, out, B, Sq, Sk, H, D, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss,
                               v_sh, scale, dtype, dev.sm_count, stream);
    }
    if (st >= 0) {
      g_last_path = kAttnSm90;
      return st;
    }
    if (g_force_path == kAttnSm90) {
      if (!sm90) {
        return fdm::arg_error("attention: the sm90 path was forced but the device is sm_%d%d", dev.cc_major,
                              dev.cc_minor);
      }
      if (key_padding_mask) {
        return fdm::arg_error("attention: the sm90 path was forced but it takes no key padding mask");
      }
      return st;  // attention_sm90's message says why
    }
#else
    if (g_force_path == kAttnSm90) {
      return fdm::arg_error("attention: the sm90 path was forced but the library was built without sm_90a");
    }
#endif
  }

  Params p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.mask = static_cast<const uint8_t*>(key_padding_mask);
  p.out = out;
  p.q_sb = q_sb;
  p.q_ss = q_ss;
  p.q_sh = q_sh;
  p.k_sb = k_sb;
  p.k_ss = k_ss;
  p.k_sh = k_sh;
  p.v_sb = v_sb;
  p.v_ss = v_ss;
  p.v_sh = v_sh;
  p.mask_sb = mask_sb;
  p.sq = static_cast<int>(Sq);
  p.sk = static_cast<int>(Sk);
  p.h = static_cast<int>(H);
  p.scale_log2 = scale * 1.4426950408889634f;

  g_last_path = kAttnMma;
  if (dtype == FDM_BF16) {
    return D == 64 ? launch<__nv_bfloat16, 64>(p, B, stream) : launch<__nv_bfloat16, 128>(p, B, stream);
  }
  return D == 64 ? launch<__half, 64>(p, B, stream) : launch<__half, 128>(p, B, stream);
}

// Test hook: 0 picks the kernel by device and call; 1 forces the sm90 (wgmma/TMA) kernel, 2 the mma.sync kernel.
// A forced sm90 path that cannot take a call fails with an argument error saying why instead of falling back.
FDM_API int fdm_attention_set_path(int path) {
  if (path < kAttnAuto || path > kAttnMma) return fdm::arg_error("unknown attention path %d", path);
  g_force_path = path;
  return 0;
}

// The kernel (1 sm90, 2 mma.sync) that ran the last attention call on any thread; a query, not a status.
FDM_API int fdm_attention_last_path() { return g_last_path; }
