// Thread-block-cluster primitives (sm_90a) shared by the kernels that run in clusters: the hand-written GEMMs
// (gemm_sm90_wgmma.cu: multicast stages released through peers' mbarriers) and the GroupNorm cluster kernels
// (group_norm_sm90.cu: each CTA's moments sent into every peer's inbox by st.async).
#pragma once
#include <cstdint>

#include "bulk_copy.cuh"  // smem_addr

namespace fdm {

// This CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Full cluster barrier: every thread of every CTA arrives (release) and waits (acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The two halves of a cluster barrier, for work between them. The arrival is relaxed: this CTA's earlier writes are
// not ordered for the peers by it; what they must see needs its own fence (mbarrier initialization: fence_barrier_init
// in bulk_copy.cuh, before the arrival).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// The address of this CTA's shared variable p in cluster rank `rank`'s shared memory.
__device__ __forceinline__ uint32_t peer_addr(const void* p, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(smem_addr(p)), "r"(rank));
  return out;
}

// Arrive on the mbarrier at the same shared-memory offset as `bar` in cluster CTA `rank` (this CTA included).
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(peer_addr(bar, rank)) : "memory");
}

// 16 bytes into a peer CTA's shared memory at `remote`, counted on its mbarrier at `remote_bar`.
__device__ __forceinline__ void st_async_f4(uint32_t remote, float4 v, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                   remote),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(remote_bar)
               : "memory");
}

}  // namespace fdm
