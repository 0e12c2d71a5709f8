// Bulk (TMA) copies from global into shared memory, completed on an mbarrier (sm_90a): what the one-pass GroupNorm
// kernels (group_norm_sm90.cu, group_norm_resident_sm90.cu) load with.
#pragma once
#include <cstdint>

namespace fdm {

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
// An L2 cache policy under which the lines an access brings in are the first to be evicted: for x, which the
// one-pass GroupNorm kernels read exactly once. (H100, bf16 + SiLU [2, 512, 128, 128]: the NCHW cluster kernel
// 31.3 -> 28.9 us, the channels-last whole-tensor kernel 34.3 -> 32.0 us against copies with the default policy.)
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
// Global -> this CTA's shared memory, `bytes` (a multiple of 16, both addresses 16-byte aligned), completing on bar,
// under an L2 cache policy (l2_evict_first_policy).
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}
// Stage s of a run of `bytes` moved in `stage_bytes` pieces (the last may be shorter): bytes [s * stage_bytes, ...)
// of src into the same offset of dst, completing bars[s], armed here with the piece's size. The one-pass GroupNorm
// kernels issue some stages up front and one more each time a stage lands.
__device__ __forceinline__ void bulk_load_stage(unsigned char* dst, const unsigned char* src, uint32_t bytes,
                                                uint32_t stage_bytes, int s, uint64_t* bars, uint64_t policy) {
  const uint32_t off = s * stage_bytes, sz = bytes - off < stage_bytes ? bytes - off : stage_bytes;
  mbar_expect_tx(&bars[s], sz);
  bulk_load(dst + off, src + off, sz, &bars[s], policy);
}
// Spins until phase `parity` of bar completes; SEM: the wait's memory semantics ("" for the default acquire at CTA
// scope).
#define FDM_MBAR_WAIT_LOOP(SEM)                                                                  \
  "{\n\t.reg .pred done;\n"                                                                     \
  "WAIT:\n\t"                                                                                   \
  "mbarrier.try_wait.parity" SEM ".shared::cta.b64 done, [%0], %1;\n\t"                         \
  "@!done bra WAIT;\n}"
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(FDM_MBAR_WAIT_LOOP("") ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
// The same for a barrier that other CTAs of the cluster complete (st.async): acquire at cluster scope.
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  asm volatile(FDM_MBAR_WAIT_LOOP(".acquire.cluster") ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
#undef FDM_MBAR_WAIT_LOOP

}  // namespace fdm
