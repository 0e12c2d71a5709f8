// What the GroupNorm files share: the path hooks (fdm_group_norm_set_path / fdm_group_norm_last_path in norms.cu,
// honoured by the NCHW entry there and the channels-last one in group_norm_nhwc.cu) and the one-pass Hopper kernels
// both entries try first (kernels/sm90/group_norm_sm90.cu, and for channels-last group_norm_resident_sm90.cu).
#pragma once
#include "common.cuh"
#include "gemm.cuh"  // current_device_facts

namespace fdm {

// kGnOnePass: the cluster kernels of group_norm_sm90.cu (both layouts); kGnTwoPass: the multi-pass kernels (NCHW
// two-pass, channels-last three-kernel); kGnResident: the whole-tensor-on-chip kernel of group_norm_resident_sm90.cu
// (channels-last only).
enum GroupNormPath : int { kGnAuto = 0, kGnOnePass = 1, kGnTwoPass = 2, kGnResident = 3 };
extern int g_gn_force_path;  // kGnAuto unless a test forces a path
extern int g_gn_last_path;   // the path the last group_norm call (either layout) ran

// What the sm90 entries return, nothing launched, for a call they cannot take.
constexpr int kGroupNormSm90Declined = -1000;

// NCHW x [N, C, HW] and channels-last x [N, S, C], both contiguous; 0 or a cudaError_t once launched. Defined in
// sm_90a builds only (FASTDM_HAS_SM90), and only called there (group_norm_try_sm90).
int group_norm_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t C, int64_t HW, int G,
                    float eps, bool silu_act, int dtype, cudaStream_t stream);
int group_norm_nhwc_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t S, int64_t C, int G,
                         float eps, bool silu_act, int dtype, cudaStream_t stream);
int group_norm_nhwc_resident_sm90(const void* x, const void* w, const void* b, void* y, void* ws, int chunks,
                                  int64_t N, int64_t S, int64_t C, int G, float eps, bool silu_act, int dtype,
                                  cudaStream_t stream);

// One Hopper kernel's turn in an entry (path: kGnOnePass or kGnResident): where fdm_group_norm_set_path allows that
// path and the device is sm_90, run() (a call of one of the sm90 entries above). Returns its status once it
// launched (recording the path), or an error, for the entry to return; kGroupNormSm90Declined where the next kernel
// should be tried. A forced path that cannot take the call fails with `entry`'s name and what the kernel `needs`.
template <typename Run>
int group_norm_try_sm90(GroupNormPath path, Run&& run, const char* entry, const char* needs) {
  if (g_gn_force_path != kGnAuto && g_gn_force_path != path) return kGroupNormSm90Declined;
#ifdef FASTDM_HAS_SM90
  DeviceFacts dev;
  if (const int e = current_device_facts(&dev)) return e;
  if (dev.cc_major == 9 && dev.cc_minor == 0) {
    const int st = run();
    if (st != kGroupNormSm90Declined) {
      g_gn_last_path = path;
      return st;
    }
  }
#else
  (void)run;
#endif
  if (g_gn_force_path == path)
    return arg_error("%s: the %s path was forced but cannot take this call (it needs an sm_90 device and sm_90a "
                     "build, %s)", entry, path == kGnResident ? "whole-tensor-on-chip" : "one-pass", needs);
  return kGroupNormSm90Declined;
}

}  // namespace fdm
