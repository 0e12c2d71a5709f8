// GroupNorm (+ SiLU) over channels-last activations: x [N, S, C] (S = product of the spatial dims, C contiguous),
// C split into G groups of Cg = C / G consecutive channels; statistics per (sample, group) over S x Cg values.
//
// Three kernels, each a single streaming pass at memory bandwidth:
//   stats:    grid (chunks, N). A block reads rows [r0, r0 + rpc) of one sample (every channel) with 16-byte loads
//             along C and keeps per-CHANNEL (mean, M2) in registers: a thread stays on one column of V channels
//             and walks the rows r0 + lane, r0 + lane + R, ... (R row lanes per column). Row lanes are merged per
//             channel in shared memory, then the channels of each group are folded into the group's
//             (mean, M2) for this chunk: stats [N, G, chunks, 2] in the workspace. Plain loads: the apply pass
//             re-reads x, which for the 10-40 MB UNet tensors is still in the 50 MB L2.
//   finalize: a warp per (sample, group) merges the group's chunks (Chan et al.) and writes per-channel
//             scale a = rstd * w[c], shift b = bias[c] - (mean - k) * a and the reference k (below), float32
//             [N, C] each, to the workspace.
//   apply:    y = (x - k) * a + b (+ SiLU). A thread keeps one column (its V channels' k, a, b in registers) and
//             walks rows; streaming (evict-first) loads and stores. Chunks run in the reverse of the stats order,
//             so the first ones read are those the stats pass touched last (the likeliest still in L2).
// A 16-byte pack may straddle two groups (Cg = 10, 4, ...): statistics are per channel until the group fold and
// the apply pass is per channel, so group boundaries never need to be pack-aligned.
// Statistics are float32 and never E[x^2] - E[x]^2: each thread takes exact two-pass moments of every tile of
// kTile rows it holds in registers and merges them into its running (mean, M2) with Chan's formula; every later
// combination (row lanes, channels of a group, chunks) is a Chan merge too. All of it is on x - k, k a reference
// per (sample, group): its first value x[n, 0, g * Cg]. With a mean far from 0 (x = 1000 + randn) a float32 mean
// near 1000 is only good to ~3e-5 absolute, and so would be y = x * a + b with b ~ -1000 a; x - k is exact there
// (Sterbenz) and every float32 quantity after it is of the order of the spread of x.
//
// Workspace (float32, `ws_elems` elements, allocated by the caller; runtime/ops/cuda/norms.py computes the same
// size):  ws_elems >= N * G * chunks * 2 + 3 * N * C
//   [0, N*G*chunks*2)                 stats [N, G, chunks, 2] (mean of x - k, M2 of each chunk)
//   [N*G*chunks*2, + N*C)             a [N, C]
//   [N*G*chunks*2 + N*C, + N*C)       b [N, C]
//   [N*G*chunks*2 + 2*N*C, + N*C)     k [N, C] (the reference of the channel's group)
// `chunks` is the most row chunks per sample the caller allows (the workspace is sized for it). The kernel runs
// min(chunks, one full wave of resident stats blocks / N) of rpc = ceil(S / that) rows, ceil(S / rpc) in all
// (so none is empty).
//
// Statistics from the producer (fdm_add_group_stats_nhwc, then fdm_group_norm_nhwc_apply): the stats kernel also
// runs as the kernel that writes x, out = a + alpha * b (AddInto below), so the moments are taken on the way and
// GroupNorm itself is the finalize and apply kernels only: one read of x and one write of y with no dependency
// between them. The producer runs exactly `chunks` chunks (ceil(S / ceil(S / chunks))), which the apply entry,
// given the same number, finds again.
#include <initializer_list>
#include <type_traits>

#include "gemm.cuh"  // current_device_facts
#include "group_norm.cuh"
#include "pdl.cuh"
#include "vec.cuh"

namespace fdm {
namespace {

constexpr int kThreads = 256;  // upper bound of every block here
constexpr int kTile = 4;       // rows a thread loads (all in flight) before its math, stats and apply

// How a block covers a row of C channels: `cols` packs of V channels, handled as `nslab` slabs of `ct` column
// threads; R row lanes per column, so a block has ct * R active threads (rounded up to whole warps).
struct RowShape {
  int cols, ct, R, nslab, threads;
  int fold_w;  // lanes folding one group's channels in the stats kernel (a power of two <= 32)
};

RowShape row_shape(int64_t C, int G, int V) {
  RowShape s;
  s.cols = static_cast<int>(C / V);
  s.nslab = static_cast<int>(ceil_div(s.cols, kThreads));
  s.ct = static_cast<int>(ceil_div(s.cols, s.nslab));  // even slabs: 320 packs -> 2 x 160, not 256 + 64
  s.R = kThreads / s.ct;
  s.threads = static_cast<int>(ceil_div(int64_t{s.ct} * s.R, 32) * 32);  // whole warps for the shuffles
  s.fold_w = 1;  // as wide as still lets the block fold all G groups at once
  while (s.fold_w < 32 && int64_t{s.fold_w} * 2 * G <= s.threads) s.fold_w *= 2;
  return s;
}

// Rows of chunk k (all chunks but the last have rpc).
__device__ __forceinline__ int64_t chunk_rows(int64_t S, int64_t rpc, int64_t k) {
  const int64_t left = S - k * rpc;
  return left < rpc ? left : rpc;
}

// Rows a thread of row lane `rl` visits among `nr`: rl, rl + R, ...
__device__ __forceinline__ int64_t lane_rows(int64_t nr, int rl, int R) {
  return rl < nr ? (nr - rl - 1) / R + 1 : 0;
}

// Dynamic shared memory of the stats kernel: red [R][ct * V] float2 (per-thread channel moments), chan [C] float2
// (per-channel moments of the chunk), cnt [R] float (rows of each row lane).
size_t stats_smem_bytes(const RowShape& s, int V, int64_t C) {
  return (static_cast<size_t>(s.R) * s.ct * V + static_cast<size_t>(C)) * sizeof(float2) + s.R * sizeof(float);
}

// Where the statistics kernel's values come from. `row` is a row of the [N * S, C] tensor (n * S + s), n its sample
// and c the channel of the pack's first element. A tile is read in two steps: `fetch` issues a row's loads (Raw), and
// only once every row of the tile has been fetched does `take` turn each, in place, into its values, which
// `values(raw)` then are (a producer computes and stores them there: a store between two rows' loads would keep the
// compiler from issuing the next row's loads before it, since out may alias the inputs as far as it knows). `peek`
// (a pack) and `value` (one element) read values again for the references and store nothing.
// ReadX: x itself, GroupNorm's own statistics pass. Plain loads: the apply pass re-reads x, which for the 10-40 MB
// UNet tensors is still in the 50 MB L2.
template <typename T, int V>
struct ReadX {
  static constexpr int kMinBlocks = 3, kMaxRegs = 72;  // resident blocks an SM, registers a thread (see the kernel)
  const T* x;
  int64_t C;
  using Raw = Pack<T, V>;
  __device__ __forceinline__ Raw fetch(int64_t row, int64_t, int64_t c) const { return load_pack<T, V>(x + row * C + c); }
  __device__ __forceinline__ void take(Raw&, int64_t, int64_t) const {}
  static __device__ __forceinline__ const Pack<T, V>& values(const Raw& r) { return r; }
  __device__ __forceinline__ Pack<T, V> peek(int64_t row, int64_t n, int64_t c) const { return fetch(row, n, c); }
  __device__ __forceinline__ float value(int64_t row, int64_t, int64_t c) const { return to_f32(x[row * C + c]); }
};

// AddInto: out = a + alpha * b, written here, its statistics taken on the way (fdm_add_group_stats_nhwc). b is
// [N, S, C] like a, or one row of C a sample ([N, C], b_per_sample). Rounded to T exactly as fdm_binary's add
// rounds it, so the statistics describe the stored values and out matches ops.add bit for bit. a and a full b are
// read once (evict-first); out keeps the default policy, GroupNorm's apply pass reads it next.
template <typename T, int V>
struct AddInto {
  // Two packs loaded for each one kept: at 3 blocks an SM (<= 85 registers) 4-row tiles spilled (232 bytes, bf16;
  // 80 bytes at the 72 registers that leave a finalize block room, session 24, not measured). Session 22, H100: three
  // blocks of 2-row tiles (80 registers) ran the bench shape's add 46.2 us against 40.7 for two blocks of 4-row tiles
  // (110 registers; plain ops.add: 34.7).
  static constexpr int kMinBlocks = 2, kMaxRegs = 112;
  const T* a;
  const T* b;
  T* out;
  float alpha;
  bool b_per_sample;
  int64_t C;

  __device__ __forceinline__ int64_t b_off(int64_t row, int64_t n, int64_t c) const {
    return (b_per_sample ? n : row) * C + c;
  }
  __device__ __forceinline__ Pack<T, V> sum(const Pack<T, V>& pa, const Pack<T, V>& pb) const {
    float f[V];
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = pack_f32(pa, e) + alpha * pack_f32(pb, e);
    return pack_from_f32<T, V>(f);
  }
  struct Raw {
    Pack<T, V> a, b;
  };
  __device__ __forceinline__ Raw fetch(int64_t row, int64_t n, int64_t c) const {
    return {load_pack_cs<T, V>(a + row * C + c), load_b(b + b_off(row, n, c))};
  }
  // b's pack: a per-sample row is read again for every row (default policy), a full b once (evict-first). The choice
  // is made on the loaded 32-bit words: selecting between two Packs of 16-bit elements compiled to a PRMT per half.
  __device__ __forceinline__ Pack<T, V> load_b(const T* bp) const {
    if constexpr (sizeof(Pack<T, V>) == 16) {
      const auto* p = reinterpret_cast<const uint4*>(bp);
      const uint4 u = b_per_sample ? *p : __ldcs(p);
      Pack<T, V> v;
      memcpy(&v, &u, 16);
      return v;
    } else {
      return load_pack<T, V>(bp);
    }
  }
  __device__ __forceinline__ void take(Raw& r, int64_t row, int64_t c) const {  // r.a becomes the sum
    r.a = sum(r.a, r.b);
    store_pack<T, V>(out + row * C + c, r.a);
  }
  static __device__ __forceinline__ const Pack<T, V>& values(const Raw& r) { return r.a; }
  __device__ __forceinline__ Pack<T, V> peek(int64_t row, int64_t n, int64_t c) const {
    return sum(load_pack<T, V>(a + row * C + c), load_pack<T, V>(b + b_off(row, n, c)));
  }
  __device__ __forceinline__ float value(int64_t row, int64_t n, int64_t c) const {
    return to_f32(from_f32<T>(to_f32(a[row * C + c]) + alpha * to_f32(b[b_off(row, n, c)])));
  }
};

// ConcatInto: out = [a, b] along the channels (a [N, S, Ca], b [N, S, Cb], out [N, S, Ca + Cb]), written here, its
// statistics taken on the way (fdm_concat_group_stats_nhwc): the UNet's up blocks, whose resnets' norm1 reads the
// concatenation. A pack never straddles the two (the vector path needs Ca and Cb whole packs). Inputs read once
// (evict-first), out kept in L2 for the apply pass.
template <typename T, int V>
struct ConcatInto {
  static constexpr int kMinBlocks = 3, kMaxRegs = 72;  // one load a pack, as ReadX
  const T* a;
  const T* b;
  T* out;
  int64_t Ca, Cb;

  __device__ __forceinline__ const T* src(int64_t row, int64_t c) const {
    return c < Ca ? a + row * Ca + c : b + row * Cb + (c - Ca);
  }
  using Raw = Pack<T, V>;
  __device__ __forceinline__ Raw fetch(int64_t row, int64_t, int64_t c) const { return load_pack_cs<T, V>(src(row, c)); }
  __device__ __forceinline__ void take(Raw& r, int64_t row, int64_t c) const {
    store_pack<T, V>(out + row * (Ca + Cb) + c, r);
  }
  static __device__ __forceinline__ const Pack<T, V>& values(const Raw& r) { return r; }
  __device__ __forceinline__ Pack<T, V> peek(int64_t row, int64_t, int64_t c) const {
    return load_pack<T, V>(src(row, c));
  }
  __device__ __forceinline__ float value(int64_t row, int64_t, int64_t c) const { return to_f32(*src(row, c)); }
};

// Registers: Source::kMinBlocks blocks of 256 threads an SM (ReadX, ConcatInto 3: 48 KB of loads in flight an SM; AddInto
// 2, two loads a pack: 64 KB; a one-wave grid, runtime/ops/cuda/norms.py sizes it with the same counts) and room beside
// them for one block of the finalize kernel, so that under programmatic dependent launch the finalize is already
// resident, waiting, when the statistics blocks complete. H100, bf16, us: the add with statistics at 114 registers left
// no room, and add + GroupNorm [2, 128, 128, 512] took 67.2 against 63.0 at 112 (and 63.6 for the kernel before its
// whole-tile branch, at 110); ReadX and ConcatInto at 72 instead of 80 made the three-kernel GroupNorm 0.8-1.1 us faster.
constexpr int kFinalizeRegs = 32;     // what ptxas gives gn_nhwc_finalize_kernel (sm_90a, every dtype)
constexpr int kRegisterFile = 65536;  // 32-bit registers an SM (sm_80 to sm_90)

template <typename T, int V, typename Source>
__global__ void __maxnreg__(Source::kMaxRegs)
gn_nhwc_stats_kernel(Source src, float* __restrict__ stats, int64_t S, int64_t C, int G, int64_t rpc, int chunks,
                     RowShape sh) {
  static_assert(Source::kMinBlocks * kThreads * Source::kMaxRegs + kThreads * kFinalizeRegs <= kRegisterFile,
                "the statistics blocks leave no room for a finalize block");
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  extern __shared__ float2 smem[];
  float2* red = smem;
  float2* chan = red + sh.R * sh.ct * V;
  float* cnt = reinterpret_cast<float*>(chan + C);
  const int64_t n = blockIdx.y, r0 = int64_t(blockIdx.x) * rpc;
  const int64_t nr = chunk_rows(S, rpc, blockIdx.x);  // >= 1: no chunk is empty
  const int ci = threadIdx.x % sh.ct, rl = threadIdx.x / sh.ct;  // rl >= R: an idle thread (warp padding)
  const bool lane_ok = rl < sh.R;
  const int64_t my_rows = lane_ok ? lane_rows(nr, rl, sh.R) : 0;
  if (lane_ok && ci == 0) cnt[rl] = static_cast<float>(my_rows);
  const int64_t x0 = n * S;                              // row 0 of the sample: the references
  const int slab_ch = sh.ct * V;                        // channels per slab
  const int cg = static_cast<int>(C / G);               // channels per group (C < 2^24)

  for (int slab = 0; slab < sh.nslab; ++slab) {
    const int col = slab * sh.ct + ci;
    float an = 0.f, mean[V], m2[V];  // of x - x[n, 0, c] (the channel's first value), per channel
#pragma unroll
    for (int e = 0; e < V; ++e) mean[e] = m2[e] = 0.f;
    if (lane_ok && col < sh.cols) {
      const int64_t c0 = int64_t{col} * V;
      const Pack<T, V> rp = src.peek(x0, n, c0);
      float ref[V];
#pragma unroll
      for (int e = 0; e < V; ++e) ref[e] = to_f32(rp.v[e]);
      int64_t xr = x0 + r0 + rl;  // this thread's next row; its rows are R apart
      for (int64_t left = my_rows; left > 0; left -= kTile, xr += kTile * sh.R) {
        const int nb = left < kTile ? static_cast<int>(left) : kTile;
        // Every row's loads issued before any is used: the tail's missing rows (k >= nb) read row nb - 1 again
        // instead of branching around a load (a branch per row let the compiler use each row's data, and so wait
        // for it, before issuing the next row's loads).
        typename Source::Raw raw[kTile];
#pragma unroll
        for (int k = 0; k < kTile; ++k) raw[k] = src.fetch(xr + (k < nb ? k : nb - 1) * sh.R, n, c0);
        // Exact two-pass moments of the tile's nb values per channel (each value's offset from the reference taken
        // once), merged into the running ones. The counts are the same for all V channels, so the merge weights are
        // computed once. Whole tiles (all but a thread's last) take a branch of their own, without the per-row
        // predicates and with 1 / kTile a constant. With the sum's pair-wise rounding (pack_from_f32) and b's load
        // (load_b), a whole 4-row tile of the bf16 add is 456 SASS instructions, was 707: the add with statistics is
        // issue-heavy at its 4 warps a scheduler (ncu: 0.43 issued a cycle per scheduler, the plain add 0.23).
        auto accumulate = [&](auto whole) {
          constexpr bool kWhole = decltype(whole)::value;
#pragma unroll
          for (int k = 0; k < kTile; ++k)
            if (kWhole || k < nb) src.take(raw[k], xr + k * sh.R, c0);
          const float nbf = kWhole ? float{kTile} : static_cast<float>(nb);
          const float inv_nb = kWhole ? 1.f / kTile : __fdividef(1.f, nbf);
          const float tot = an + nbf, fb = __fdividef(nbf, tot), coef = an * fb;
#pragma unroll
          for (int e = 0; e < V; ++e) {
            float dv[kTile], s = 0.f;
#pragma unroll
            for (int k = 0; k < kTile; ++k) {
              dv[k] = kWhole || k < nb ? pack_f32(Source::values(raw[k]), e) - ref[e] : 0.f;
              s += dv[k];
            }
            const float tm = s * inv_nb;
            float q = 0.f;
#pragma unroll
            for (int k = 0; k < kTile; ++k)
              if (kWhole || k < nb) {
                const float c = dv[k] - tm;
                q = fmaf(c, c, q);
              }
            const float d = tm - mean[e];
            mean[e] = fmaf(d, fb, mean[e]);
            m2[e] += q + d * d * coef;
          }
          an = tot;
        };
        if (nb == kTile)
          accumulate(std::true_type{});
        else
          accumulate(std::false_type{});
      }
    }
    if (lane_ok) {
      float2* r = red + rl * slab_ch + ci * V;
#pragma unroll
      for (int e = 0; e < V; ++e) r[e] = make_float2(mean[e], m2[e]);
    }
    __syncthreads();
    // Merge the row lanes of each channel of this slab (channels past C belong to idle columns of the last slab),
    // and move the channel's mean from its own reference x[n, 0, c] to its group's x[n, 0, g * Cg].
    for (int c = threadIdx.x; c < slab_ch; c += blockDim.x) {
      const int ch = slab * slab_ch + c;
      if (ch >= C) break;
      Moments m{0.f, 0.f, 0.f};
      for (int r = 0; r < sh.R; ++r) {
        const float2 v = red[r * slab_ch + c];
        m = merge(m, Moments{cnt[r], v.x, v.y});
      }
      const int first = ch - ch % cg;  // the group's first channel
      chan[ch] = make_float2(m.mean + (src.value(x0, n, ch) - src.value(x0, n, first)), m.m2);
    }
    __syncthreads();  // red is rewritten by the next slab; chan is read below
  }

  // Fold each group's channels (all with the chunk's nr values): mean of the means, and
  // M2 = sum M2_c + nr * sum (mean_c - mean)^2. fold_w lanes per group, as many groups at once as the block
  // holds (32 groups of 10 channels: 8 lanes each); blockDim is a multiple of 32 and every lane runs the same
  // trip count, so the shuffles see full warps.
  const int fw = sh.fold_w, sub = threadIdx.x / fw, lane = threadIdx.x % fw, nsub = blockDim.x / fw;
  const float rows = static_cast<float>(nr), inv_cg = 1.f / static_cast<float>(cg);
  for (int g0 = 0; g0 < G; g0 += nsub) {
    const int g = g0 + sub;
    const int end = g < G ? cg : 0;  // lanes past the last group add nothing but still shuffle
    const float2* gch = chan + (g < G ? g : 0) * cg;
    float s = 0.f;
#pragma unroll 4
    for (int c = lane; c < end; c += fw) s += gch[c].x;
    const float gmean = group_sum(s, fw) * inv_cg;
    float q = 0.f;
#pragma unroll 4
    for (int c = lane; c < end; c += fw) {
      const float2 v = gch[c];
      const float d = v.x - gmean;
      q += fmaf(rows * d, d, v.y);
    }
    q = group_sum(q, fw);
    if (g < G && lane == 0) {
      float* o = stats + ((n * G + g) * chunks + blockIdx.x) * 2;
      o[0] = gmean;
      o[1] = q;
    }
  }
}

// grid (G, N), 256 threads: a block per (sample, group), each thread merging every 256th chunk, then the block's
// threads merged. Writes k, a, b [N, C] (see the top). A warp per group (8 blocks for 32 groups and 2 samples, each
// lane merging ~7 chunks one after another) took 5.2 us under ncu at [2, 128, 128, 512], 12% occupancy: latency.
template <typename T>
__global__ void __launch_bounds__(256)
gn_nhwc_finalize_kernel(const T* __restrict__ x, const float* __restrict__ stats, const T* __restrict__ w,
                        const T* __restrict__ bias, float* __restrict__ a, float* __restrict__ b,
                        float* __restrict__ k, int64_t S, int64_t C, int G, int64_t rpc, int chunks, float eps) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  __shared__ Moments part[8];
  const int64_t g = blockIdx.x, n = blockIdx.y;
  const int64_t Cg = C / G;
  const float* st = stats + (n * G + g) * chunks * 2;
  Moments m{0.f, 0.f, 0.f};
  for (int j = threadIdx.x; j < chunks; j += 256)
    m = merge(m, Moments{static_cast<float>(chunk_rows(S, rpc, j) * Cg), st[2 * j], st[2 * j + 1]});
  m = block_merge(m, part);  // m.mean: of x - k
  const float inv_count = static_cast<float>(1.0 / (static_cast<double>(S) * static_cast<double>(Cg)));
  const float rstd = rsqrtf(fmaxf(m.m2 * inv_count, 0.f) + eps);
  const float ref = to_f32(x[n * S * C + g * Cg]);
  for (int64_t c = threadIdx.x; c < Cg; c += 256) {
    const int64_t ch = g * Cg + c, o = n * C + ch;
    const float av = rstd * (w ? to_f32(w[ch]) : 1.f);
    a[o] = av;
    b[o] = fmaf(-m.mean, av, bias ? to_f32(bias[ch]) : 0.f);
    k[o] = ref;
  }
}

// grid (nslab, chunks, N) walked in reverse chunk and sample order; blockDim = sh.threads.
template <typename T, int V, bool kSilu>
__global__ void __launch_bounds__(kThreads)
gn_nhwc_apply_kernel(const T* __restrict__ x, const float* __restrict__ a, const float* __restrict__ b,
                     const float* __restrict__ k, T* __restrict__ y, int64_t S, int64_t C, int64_t rpc, RowShape sh) {
  wait_for_prior_grids();  // programmatic-dependent launch (pdl.cuh)
  allow_dependent_grids();
  const int64_t chunk = gridDim.y - 1 - blockIdx.y, n = gridDim.z - 1 - blockIdx.z;
  const int ci = threadIdx.x % sh.ct, rl = threadIdx.x / sh.ct;
  const int col = blockIdx.x * sh.ct + ci;
  if (rl >= sh.R || col >= sh.cols) return;  // no barriers below
  const int64_t my_rows = lane_rows(chunk_rows(S, rpc, chunk), rl, sh.R);
  if (my_rows == 0) return;
  // This thread's channels' reference, scale and shift, in registers for all its rows.
  float sk[V], sa[V], sb[V];
  const int64_t c0 = n * C + col * V;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sk[e] = k[c0 + e];
    sa[e] = a[c0 + e];
    sb[e] = b[c0 + e];
  }
  const int64_t off = (n * S + chunk * rpc + rl) * C + col * V;
  const T* xp = x + off;
  T* yp = y + off;
  const int64_t step = static_cast<int64_t>(sh.R) * C;
  for (int64_t left = my_rows; left > 0; left -= kTile, xp += kTile * step, yp += kTile * step) {
    const int nb = left < kTile ? static_cast<int>(left) : kTile;
    Pack<T, V> p[kTile];
#pragma unroll
    for (int j = 0; j < kTile; ++j)
      if (j < nb) p[j] = load_pack_cs<T, V>(xp + j * step);  // last use of x
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      if (j >= nb) break;
      Pack<T, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float v = fmaf(to_f32(p[j].v[e]) - sk[e], sa[e], sb[e]);
        if constexpr (kSilu) v = std::is_same_v<T, float> ? silu(v) : silu_pack_element(v, e);
        out.v[e] = from_f32<T>(v);
      }
      store_pack_cs<T, V>(yp + j * step, out);
    }
  }
}

// The statistics kernel for `Source`, made ready for `smem` bytes of dynamic shared memory.
template <typename T, int V, typename Source>
int prepare_stats_kernel(size_t smem, int64_t C, const DeviceFacts& facts, const char* entry) {
  if (smem <= 48 * 1024) return 0;
  // Wide rows (C above ~4000): needs the opt-in shared memory size.
  if (smem > static_cast<size_t>(facts.smem_optin))
    return arg_error("%s: %lld channels need %zu bytes of shared memory, the GPU allows %d", entry, (long long)C, smem,
                     facts.smem_optin);
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev)) return static_cast<int>(e);
  return static_cast<int>(allow_smem_optin<gn_nhwc_stats_kernel<T, V, Source>>(dev, facts.smem_optin, false));
}

// Rows a chunk when a sample's S rows are cut into at most `chunks` chunks, and how many chunks that makes (none
// empty). The producer entry and the apply entry both derive their partition from the caller's `chunks` with it.
struct ChunkPlan {
  int64_t rpc;
  int count;
};

ChunkPlan chunk_plan(int64_t S, int64_t chunks) {
  const int64_t rpc = ceil_div(S, chunks);
  return {rpc, static_cast<int>(ceil_div(S, rpc))};
}

// finalize + apply over statistics [N, G, plan.count, 2] already in the workspace (the stats kernel's, or a
// producer's). ws: the workspace laid out for `chunks` (see the top). The apply pass walks the same row chunks (one
// block a chunk and slab): a full wave of smaller apply blocks measured 1-4 us slower at the VAE's sizes.
template <typename T, int V>
void launch_finalize_apply(const void* x, const void* w, const void* bias, void* y, float* ws, int chunks,
                           ChunkPlan plan, int64_t N, int64_t S, int64_t C, int G, float eps, bool silu_act,
                           cudaStream_t stream) {
  const RowShape sh = row_shape(C, G, V);
  const float* stats = ws;
  float* a = ws + N * G * static_cast<int64_t>(chunks) * 2;
  float* b = a + N * C;
  float* k = b + N * C;
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  launch_dependent(gn_nhwc_finalize_kernel<T>, dim3(static_cast<unsigned>(G), static_cast<unsigned>(N)), 256, 0, stream,
      xt, stats, static_cast<const T*>(w), static_cast<const T*>(bias), a, b, k, S, C, G, plan.rpc, plan.count, eps);
  const dim3 grid(sh.nslab, plan.count, static_cast<unsigned>(N));
  if (silu_act)
    launch_dependent(gn_nhwc_apply_kernel<T, V, true>, grid, sh.threads, 0, stream, xt, a, b, k, yt, S, C, plan.rpc,
                     sh);
  else
    launch_dependent(gn_nhwc_apply_kernel<T, V, false>, grid, sh.threads, 0, stream, xt, a, b, k, yt, S, C, plan.rpc,
                     sh);
}

template <typename T, int V>
int launch_gn_nhwc(const void* x, const void* w, const void* bias, void* y, float* ws, int chunks, int64_t N,
                   int64_t S, int64_t C, int G, float eps, bool silu_act, cudaStream_t stream) {
  using Src = ReadX<T, V>;
  const RowShape sh = row_shape(C, G, V);
  const size_t smem = stats_smem_bytes(sh, V, C);
  DeviceFacts facts;
  if (const int e = current_device_facts(&facts)) return e;
  if (const int e = prepare_stats_kernel<T, V, Src>(smem, C, facts, "fdm_group_norm_nhwc")) return e;
  // Chunks: one full wave of resident statistics blocks over the batch (every block the same size, so all SMs
  // finish together and there is a single reduction epilogue per block slot), at most the caller's `chunks`.
  int occ = 0;
  if (cudaError_t e = resident_blocks<gn_nhwc_stats_kernel<T, V, Src>>(sh.threads, smem, &occ))
    return static_cast<int>(e);
  const int64_t wave = int64_t{occ > 1 ? occ : 1} * facts.sm_count / N;
  const ChunkPlan plan = chunk_plan(S, wave < 1 ? 1 : (wave < chunks ? wave : chunks));  // count <= chunks
  // The stats region is indexed with the launched chunk count (<= the requested one the workspace was sized for).
  launch_dependent(gn_nhwc_stats_kernel<T, V, Src>, dim3(plan.count, static_cast<unsigned>(N)), sh.threads, smem,
                   stream, Src{static_cast<const T*>(x), C}, ws, S, C, G, plan.rpc, plan.count, sh);
  launch_finalize_apply<T, V>(x, w, bias, y, ws, chunks, plan, N, S, C, G, eps, silu_act, stream);
  return launch_status();
}

// A producer (AddInto, ConcatInto) writing out [N, S, C] with its statistics, for fdm_group_norm_nhwc_apply: exactly
// `chunks` chunks a sample (chunk_plan), so that the apply entry, given the same number, finds them.
template <typename T, int V, typename Src>
int launch_producer(const Src& src, float* ws, int chunks, int64_t N, int64_t S, int64_t C, int G, const char* entry,
                    cudaStream_t stream) {
  const RowShape sh = row_shape(C, G, V);
  const size_t smem = stats_smem_bytes(sh, V, C);
  DeviceFacts facts;
  if (const int e = current_device_facts(&facts)) return e;
  if (const int e = prepare_stats_kernel<T, V, Src>(smem, C, facts, entry)) return e;
  const ChunkPlan plan = chunk_plan(S, chunks);
  launch_dependent(gn_nhwc_stats_kernel<T, V, Src>, dim3(plan.count, static_cast<unsigned>(N)), sh.threads, smem,
                   stream, src, ws, S, C, G, plan.rpc, plan.count, sh);
  return launch_status();
}

// A producer entry's dtype and vector dispatch: Src<T, V>{a, b, out, fields...} (AddInto, ConcatInto), 16-byte packs
// where every one of `widths` (channel counts whose rows the packs walk) is whole packs and a, b, out are aligned.
template <template <typename, int> class Src, typename... Fields>
int run_producer(int dtype, std::initializer_list<int64_t> widths, const void* a, const void* b, void* out, void* ws,
                 int chunks, int64_t N, int64_t S, int64_t C, int G, const char* entry, cudaStream_t stream,
                 Fields... fields) {
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    auto at = static_cast<const T*>(a);
    auto bt = static_cast<const T*>(b);
    auto ot = static_cast<T*>(out);
    auto wsf = static_cast<float*>(ws);
    bool vec = aligned16(a) && aligned16(b) && aligned16(out);
    for (const int64_t w : widths) vec = vec && w % V == 0;
    if (vec) return launch_producer<T, V>(Src<T, V>{at, bt, ot, fields...}, wsf, chunks, N, S, C, G, entry, stream);
    return launch_producer<T, 1>(Src<T, 1>{at, bt, ot, fields...}, wsf, chunks, N, S, C, G, entry, stream);
  });
  return 0;
}

// The size checks the channels-last entries share (before their empty-tensor return); 0 when the sizes are fine.
int check_nhwc_sizes(const char* entry, int64_t N, int64_t S, int64_t C, int G, int chunks) {
  if (N < 0 || S < 0 || C < 0)
    return arg_error("%s: negative size (N=%lld, S=%lld, C=%lld)", entry, (long long)N, (long long)S, (long long)C);
  if (G < 1 || C % G != 0) return arg_error("%s: %lld channels do not split into %d groups", entry, (long long)C, G);
  if (chunks < 1 || chunks > 65535) return arg_error("%s: chunks %d not in [1, 65535]", entry, chunks);
  if (N > 65535) return arg_error("%s: batch %lld exceeds 65535", entry, (long long)N);
  return 0;
}

// ... and the ones after it: the channel bound and the workspace size.
int check_nhwc_workspace(const char* entry, int64_t N, int64_t C, int G, int chunks, int64_t ws_elems) {
  // Bounds every product below (N*G*chunks*2 < 2^57) and the int column counts.
  if (C > (int64_t{1} << 24)) return arg_error("%s: %lld channels is too many", entry, (long long)C);
  const int64_t need = N * G * static_cast<int64_t>(chunks) * 2 + 3 * N * C;
  if (ws_elems < need)
    return arg_error("%s: workspace of %lld floats is smaller than N*G*chunks*2 + 3*N*C = %lld", entry,
                     (long long)ws_elems, (long long)need);
  return 0;
}

}  // namespace
}  // namespace fdm

using namespace fdm;

// GroupNorm over channels-last x [N, S, C] (contiguous; S = product of the spatial dims), per-channel affine w, b
// ([C] or null), then SiLU when silu != 0; y: same shape as x. ws: float32 workspace of ws_elems elements,
// at least N * G * chunks * 2 + 3 * N * C (layout at the top of this file). `chunks`: the most row chunks per
// sample for the statistics pass, in [1, 65535] (fewer run when one wave of blocks needs fewer).
FDM_API int fdm_group_norm_nhwc(const void* x, const void* w, const void* b, void* y, void* ws, int64_t ws_elems,
                                int chunks, int64_t N, int64_t S, int64_t C, int G, float eps, int silu, int dtype,
                                cudaStream_t stream) {
  constexpr const char* kEntry = "fdm_group_norm_nhwc";
  if (const int e = check_nhwc_sizes(kEntry, N, S, C, G, chunks)) return e;
  if (N == 0 || S == 0 || C == 0) return 0;
  if (!x || !y || !ws) return arg_error("fdm_group_norm_nhwc: x, y and ws are required");
  if (const int e = check_nhwc_workspace(kEntry, N, C, G, chunks, ws_elems)) return e;
  // Hopper: the whole tensor on chip (kernels/sm90/group_norm_resident_sm90.cu) where it fits, else the cluster
  // kernel of kernels/sm90/group_norm_sm90.cu where a group's column fits it; the three kernels below take the rest.
  // Under kSmallNhwcBytes of x the cluster kernel goes first: the whole-tensor kernel's grid barrier and merge of
  // every CTA's partials cost more there than the cluster kernel's narrower copies. bf16 + SiLU, cluster /
  // whole-tensor us, H100 (H200): [2, 16, 16, 1280] 7.8 / 10.5 (7.4 / 10.5), [1, 32, 32, 1280] 10.7 / 12.2 (10.1 /
  // 12.2), [2, 32, 32, 1280] 12.2 / 13.1 (11.4 / 12.9); from [2, 32, 32, 1920] (7.9 MB) up the whole-tensor kernel
  // wins: 16.3 / 14.6 (15.4 / 14.2), [1, 64, 64, 1280] 22.0 / 17.5. With the cluster kernel's inbox exchange
  // (session 21, H100): [2, 32, 32, 1280] 11.4 / 13.3, [2, 32, 32, 1920] 15.7 / 14.6, [2, 32, 32, 2560] 20.2 / 16.5,
  // [1, 64, 64, 1280] 21.0 / 17.3: the same choice.
  constexpr int64_t kSmallNhwcBytes = int64_t{6} << 20;
  auto resident = [&] {
    return group_norm_try_sm90(
        kGnResident,
        [&] {
          return group_norm_nhwc_resident_sm90(x, w, b, y, ws, chunks, N, S, C, G, eps, silu != 0, dtype, stream);
        },
        "fdm_group_norm_nhwc",
        "x within the device's shared memory and registers (one CTA an SM), groups of at least one 16-byte pack of "
        "channels, C a whole number of packs, aligned x, y and ws");
  };
  auto cluster = [&] {
    return group_norm_try_sm90(
        kGnOnePass, [&] { return group_norm_nhwc_sm90(x, w, b, y, N, S, C, G, eps, silu != 0, dtype, stream); },
        "fdm_group_norm_nhwc",
        "group rows of 64 bytes or more in 4-byte units, a group column of at most 1 MB split into whole 16-byte "
        "packs, every cluster resident at once, aligned x and y");
  };
  const bool small = N * S * C * element_size(dtype) < kSmallNhwcBytes;
  if (const int st = small ? cluster() : resident(); st != kGroupNormSm90Declined) return st;
  if (const int st = small ? resident() : cluster(); st != kGroupNormSm90Declined) return st;
  g_gn_last_path = kGnTwoPass;
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    const bool vec = C % V == 0 && aligned16(x) && aligned16(y);
    auto wsf = static_cast<float*>(ws);
    return vec ? launch_gn_nhwc<T, V>(x, w, b, y, wsf, chunks, N, S, C, G, eps, silu != 0, stream)
               : launch_gn_nhwc<T, 1>(x, w, b, y, wsf, chunks, N, S, C, G, eps, silu != 0, stream);
  });
  return 0;
}

// out = a + alpha * b over channels-last [N, S, C] (b: [N, S, C] like a, or [N, C] when b_per_sample, one row of
// channels a sample; a, b, out contiguous, out not overlapping a or b), bit for bit what fdm_binary's add writes,
// and the per-(sample, group) statistics of out in the workspace, for fdm_group_norm_nhwc_apply given the same ws,
// chunks, N, S, C and G. ws: float32, at least N * G * chunks * 2 + 3 * N * C elements (fdm_group_norm_nhwc's
// layout). `chunks` in [1, 65535]: the statistics blocks a sample, exactly (as many as S allows, none empty).
FDM_API int fdm_add_group_stats_nhwc(const void* a, const void* b, int b_per_sample, float alpha, void* out, void* ws,
                                     int64_t ws_elems, int chunks, int64_t N, int64_t S, int64_t C, int G, int dtype,
                                     cudaStream_t stream) {
  constexpr const char* kEntry = "fdm_add_group_stats_nhwc";
  if (const int e = check_nhwc_sizes(kEntry, N, S, C, G, chunks)) return e;
  if (N == 0 || S == 0 || C == 0) return 0;
  if (!a || !b || !out || !ws) return arg_error("%s: a, b, out and ws are required", kEntry);
  if (const int e = check_nhwc_workspace(kEntry, N, C, G, chunks, ws_elems)) return e;
  return run_producer<AddInto>(dtype, {C}, a, b, out, ws, chunks, N, S, C, G, kEntry, stream, alpha, b_per_sample != 0,
                               C);
}

// out = [a, b] concatenated along the channels (a [N, S, Ca], b [N, S, Cb], out [N, S, Ca + Cb], contiguous, out
// not overlapping a or b) and the per-(sample, group) statistics of out in the workspace, as fdm_add_group_stats_nhwc
// leaves them (the same ws size, chunks and apply entry, with C = Ca + Cb).
FDM_API int fdm_concat_group_stats_nhwc(const void* a, const void* b, int64_t Ca, int64_t Cb, void* out, void* ws,
                                        int64_t ws_elems, int chunks, int64_t N, int64_t S, int G, int dtype,
                                        cudaStream_t stream) {
  constexpr const char* kEntry = "fdm_concat_group_stats_nhwc";
  if (Ca < 0 || Cb < 0) return arg_error("%s: negative channel count (Ca=%lld, Cb=%lld)", kEntry, (long long)Ca,
                                         (long long)Cb);
  const int64_t C = Ca + Cb;
  if (const int e = check_nhwc_sizes(kEntry, N, S, C, G, chunks)) return e;
  if (N == 0 || S == 0 || C == 0) return 0;
  if ((Ca && !a) || (Cb && !b) || !out || !ws) return arg_error("%s: a, b, out and ws are required", kEntry);
  if (const int e = check_nhwc_workspace(kEntry, N, C, G, chunks, ws_elems)) return e;
  return run_producer<ConcatInto>(dtype, {Ca, Cb}, a, b, out, ws, chunks, N, S, C, G, kEntry, stream, Ca, Cb);
}

// GroupNorm (+ SiLU) of channels-last x [N, S, C] whose statistics a producer already left in ws
// (fdm_add_group_stats_nhwc or fdm_concat_group_stats_nhwc with the same ws, chunks, N, S, C and G, x being its
// out): the finalize and apply kernels only, one read of x and one write of y. Arguments otherwise as
// fdm_group_norm_nhwc's.
FDM_API int fdm_group_norm_nhwc_apply(const void* x, const void* w, const void* b, void* y, void* ws,
                                      int64_t ws_elems, int chunks, int64_t N, int64_t S, int64_t C, int G, float eps,
                                      int silu, int dtype, cudaStream_t stream) {
  constexpr const char* kEntry = "fdm_group_norm_nhwc_apply";
  if (const int e = check_nhwc_sizes(kEntry, N, S, C, G, chunks)) return e;
  if (N == 0 || S == 0 || C == 0) return 0;
  if (!x || !y || !ws) return arg_error("%s: x, y and ws are required", kEntry);
  if (const int e = check_nhwc_workspace(kEntry, N, C, G, chunks, ws_elems)) return e;
  const ChunkPlan plan = chunk_plan(S, chunks);
  FDM_DISPATCH_FLOAT(dtype, {
    using T = scalar_t;
    constexpr int V = vec16<T>();
    auto wsf = static_cast<float*>(ws);
    if (C % V == 0 && aligned16(x) && aligned16(y))
      launch_finalize_apply<T, V>(x, w, b, y, wsf, chunks, plan, N, S, C, G, eps, silu != 0, stream);
    else
      launch_finalize_apply<T, 1>(x, w, b, y, wsf, chunks, plan, N, S, C, G, eps, silu != 0, stream);
    return launch_status();
  });
  return 0;
}
