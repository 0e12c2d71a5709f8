// What the GroupNorm files share: the path hooks (fdm_group_norm_set_path / fdm_group_norm_last_path in norms.cu,
// honoured by the NCHW entry there and the channels-last one in group_norm_nhwc.cu) and the one-pass Hopper kernels
// of kernels/sm90/group_norm_sm90.cu that both entries try first.
#pragma once
#include "common.cuh"
#include "gemm.cuh"  // current_device_facts

namespace fdm {

enum GroupNormPath : int { kGnAuto = 0, kGnOnePass = 1, kGnTwoPass = 2 };  // two-pass: also the 3-kernel NHWC path
extern int g_gn_force_path;  // kGnAuto unless a test forces a path
extern int g_gn_last_path;   // the path the last group_norm call (either layout) ran

// What the sm90 entries return, nothing launched, for a call they cannot take.
constexpr int kGroupNormSm90Declined = -1000;

// NCHW x [N, C, HW] and channels-last x [N, S, C], both contiguous; 0 or a cudaError_t once launched. Defined in
// sm_90a builds only (FASTDM_HAS_SM90), and only called there (group_norm_try_one_pass).
int group_norm_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t C, int64_t HW, int G,
                    float eps, bool silu_act, int dtype, cudaStream_t stream);
int group_norm_nhwc_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t S, int64_t C, int G,
                         float eps, bool silu_act, int dtype, cudaStream_t stream);

// Both entries' Hopper step: where fdm_group_norm_set_path allows it and the device is sm_90, one_pass() (a call of
// group_norm_sm90 or group_norm_nhwc_sm90). Returns its status once it launched, or an error, for the entry to
// return; kGroupNormSm90Declined (the last path recorded as the multi-pass one) where the entry's own kernels run.
// A forced one-pass path that cannot take the call fails with `entry`'s name and what the kernel `needs`.
template <typename OnePass>
int group_norm_try_one_pass(OnePass&& one_pass, const char* entry, const char* needs) {
  if (g_gn_force_path != kGnTwoPass) {
#ifdef FASTDM_HAS_SM90
    DeviceFacts dev;
    if (const int e = current_device_facts(&dev)) return e;
    if (dev.cc_major == 9 && dev.cc_minor == 0) {
      const int st = one_pass();
      if (st != kGroupNormSm90Declined) {
        g_gn_last_path = kGnOnePass;
        return st;
      }
    }
#else
    (void)one_pass;
#endif
    if (g_gn_force_path == kGnOnePass)
      return arg_error("%s: the one-pass path was forced but cannot take this call (it needs an sm_90 device and "
                       "sm_90a build, %s)", entry, needs);
  }
  g_gn_last_path = kGnTwoPass;
  return kGroupNormSm90Declined;
}

}  // namespace fdm
