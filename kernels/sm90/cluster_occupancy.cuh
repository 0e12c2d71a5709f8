// How many thread block clusters of a launch configuration a device holds at once: the query the cluster launchers
// (group_norm_sm90.cu, gemm_sm90_wgmma.cu) size their grids by, kept per (device, cluster size, shared memory)
// because the occupancy query is host work on a hot path.
#pragma once
#include <mutex>
#include <vector>

#include "gemm.cuh"  // DeviceFacts
#include "vec.cuh"   // allow_smem_optin

namespace fdm {

// The launch attribute that groups a grid's CTAs into clusters of `dims`.
inline cudaLaunchAttribute cluster_attribute(dim3 dims) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = dims.x;
  attr.val.clusterDim.y = dims.y;
  attr.val.clusterDim.z = dims.z;
  return attr;
}

// Clusters of `cfg` (its first attribute the cluster shape, its grid a multiple of it, its shared memory size) that
// fit at once; 0 where the device cannot run one. The first call on a device also lets the kernel take the largest
// shared memory and clusters over 8.
template <auto kKernel>
int resident_clusters(const cudaLaunchConfig_t& cfg) {
  struct Entry {
    int dev;
    unsigned ranks;
    size_t smem;
    int clusters;
  };
  static std::mutex mutex;
  static std::vector<Entry> known;
  int dev = 0;
  DeviceFacts facts;
  if (cudaGetDevice(&dev) != cudaSuccess || current_device_facts(&facts) != 0) return 0;
  const unsigned ranks = cfg.attrs[0].val.clusterDim.x;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : known)
    if (e.dev == dev && e.ranks == ranks && e.smem == cfg.dynamicSmemBytes) return e.clusters;
  if (allow_smem_optin<kKernel>(dev, facts.smem_optin, true) != cudaSuccess) return 0;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kKernel, &cfg) != cudaSuccess) clusters = 0;
  if (known.size() < 256) known.push_back({dev, ranks, cfg.dynamicSmemBytes, clusters});
  return clusters;
}

}  // namespace fdm
