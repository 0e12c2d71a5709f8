// Launching a CUTLASS 3.x kernel (GEMM, conv, the FMHA collective's kernel) ourselves instead of through its
// device adapter's run(): the same kernel body wrapped in a __global__ that first waits for the previous grid, so
// it can be a programmatic-dependent launch (kernels/pdl.cuh). The adapters' own PDL switch is not used: it needs
// CUTLASS_ENABLE_GDC_FOR_SM90, whose stream-K scheduler code does not compile in the nvidia-cutlass 4.2 headers.
#pragma once
#include <cuda_runtime.h>

#include "cluster_occupancy.cuh"  // cluster_attribute
#include "pdl.cuh"
#include "vec.cuh"                // allow_smem_optin

namespace fdm {

// cutlass::device_kernel<Operator> with the programmatic-dependent launch prologue.
template <typename Operator>
__global__ void __launch_bounds__(Operator::MaxThreadsPerBlock, Operator::MinBlocksPerMultiprocessor)
    cutlass_kernel(const __grid_constant__ typename Operator::Params params) {
  extern __shared__ char smem[];
  wait_for_prior_grids();
  allow_dependent_grids();
  Operator op;
  op(params, smem);
}

// Launches Operator on `params` (Operator::to_underlying_arguments of its arguments) in clusters of `cluster` CTAs,
// as its device adapter's run() would; returns 0 or a cudaError_t.
template <typename Operator>
int launch_cutlass(const typename Operator::Params& params, dim3 cluster, cudaStream_t stream) {
  constexpr auto kKernel = cutlass_kernel<Operator>;
  constexpr int kSmem = static_cast<int>(Operator::SharedStorageSize);
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return static_cast<int>(e);
  if (const cudaError_t e = allow_smem_optin<kKernel>(device, kSmem, false); e != cudaSuccess)
    return static_cast<int>(e);
  cudaLaunchAttribute attrs[2] = {cluster_attribute(cluster)};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = Operator::get_grid_shape(params);
  cfg.blockDim = Operator::get_block_shape();
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = 1 + pdl_attribute(&attrs[1]);
  return static_cast<int>(cudaLaunchKernelEx(&cfg, kKernel, params));
}

}  // namespace fdm
