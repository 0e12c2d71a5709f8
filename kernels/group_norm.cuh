// What the GroupNorm files share: the path hooks (fdm_group_norm_set_path / fdm_group_norm_last_path in norms.cu,
// honoured by the NCHW entry there and the channels-last one in group_norm_nhwc.cu) and the one-pass Hopper kernels
// of kernels/sm90/group_norm_sm90.cu that both entries try first.
#pragma once
#include "common.cuh"

namespace fdm {

enum GroupNormPath : int { kGnAuto = 0, kGnOnePass = 1, kGnTwoPass = 2 };  // two-pass: also the 3-kernel NHWC path
extern int g_gn_force_path;  // kGnAuto unless a test forces a path
extern int g_gn_last_path;   // the path the last group_norm call (either layout) ran

// What the sm90 entries return, nothing launched, for a call they cannot take.
constexpr int kGroupNormSm90Declined = -1000;

#ifdef FASTDM_HAS_SM90
// NCHW x [N, C, HW] and channels-last x [N, S, C], both contiguous; 0 or a cudaError_t once launched.
int group_norm_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t C, int64_t HW, int G,
                    float eps, bool silu_act, int dtype, cudaStream_t stream);
int group_norm_nhwc_sm90(const void* x, const void* w, const void* b, void* y, int64_t N, int64_t S, int64_t C, int G,
                         float eps, bool silu_act, int dtype, cudaStream_t stream);
#endif

}  // namespace fdm
