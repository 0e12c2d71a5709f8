// Programmatic dependent launch (Hopper and newer).
//
// A kernel launched with `launch_dependent` (or with `pdl_attribute` in its own launch configuration) may be
// started by the GPU while the previous kernel on the stream is still finishing: its blocks are placed on SMs as
// the previous grid's blocks leave, run their set-up (barrier init, argument loads) and then block in
// `wait_for_prior_grids()` until the previous grid has completed and its memory is visible. Two rules make that
// safe, and every kernel launched this way follows both:
//   - `wait_for_prior_grids()` comes before the kernel's first global memory access (read or write);
//   - `allow_dependent_grids()` may come anywhere (it only lets the next grid be scheduled; that grid still waits
//     for this one to complete before it touches memory). Kernels here call it right after the wait.
// Without the launch attribute (other cards, FASTDM_PDL=0, fdm_pdl_set(0)) both instructions are no-ops, so a
// kernel runs exactly as an ordinary launch.
#pragma once
#include <cuda_runtime.h>

namespace fdm {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launches on the current device are programmatic-dependent: compute capability 9.0 or newer, and not
// switched off (environment FASTDM_PDL=0 at load, or fdm_pdl_set(0)). Defined in status.cu.
bool pdl_enabled();

// Writes the launch attribute into *attr and returns 1 when PDL is on, else returns 0 (use as numAttrs).
inline unsigned pdl_attribute(cudaLaunchAttribute* attr) {
  if (!pdl_enabled()) return 0;
  attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr->val.programmaticStreamSerializationAllowed = 1;
  return 1;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` as a programmatic-dependent launch where enabled. The kernel
// must begin with wait_for_prior_grids() (see above). Errors are reported as for <<<>>>: by cudaGetLastError().
template <typename... Params, typename... Args>
inline void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args... args) {
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_attribute(&attr);
  cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace fdm
