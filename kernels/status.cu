// Error reporting shared by all entry points (see common.cuh).
#include "common.cuh"
#include "gemm.cuh"  // current_device_facts
#include "pdl.cuh"

#include <atomic>
#include <cstdarg>
#include <cstdlib>

static thread_local char g_message[512] = "";

namespace fdm {
int arg_error(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return -1;
}
}  // namespace fdm

FDM_API const char* fdm_last_error_message() { return g_message; }

FDM_API const char* fdm_error_name(int code) {
  if (code < 0) return "FDM_BAD_ARGUMENT";
  return cudaGetErrorName(static_cast<cudaError_t>(code));
}

FDM_API int fdm_abi_version() { return 1; }

FDM_API int fdm_has_sm90() {
#ifdef FASTDM_HAS_SM90
  return 1;
#else
  return 0;
#endif
}

// Programmatic dependent launch (pdl.cuh): on where the device has compute capability 9.0+, unless FASTDM_PDL=0.
static std::atomic<int> g_pdl_switch{-1};  // -1: not read yet, 0: off, 1: on

static int pdl_switch() {
  int on = g_pdl_switch.load(std::memory_order_relaxed);
  if (on < 0) {
    const char* env = getenv("FASTDM_PDL");
    on = (env && env[0] == '0' && env[1] == '\0') ? 0 : 1;
    g_pdl_switch.store(on, std::memory_order_relaxed);
  }
  return on;
}

namespace fdm {
bool pdl_enabled() {
  if (!pdl_switch()) return false;
  DeviceFacts facts;  // cached per device
  return current_device_facts(&facts) == 0 && facts.cc_major >= 9;
}
}  // namespace fdm

// Switches programmatic dependent launch on (1) or off (0) for later launches; returns the previous switch.
FDM_API int fdm_pdl_set(int on) {
  const int previous = pdl_switch();
  g_pdl_switch.store(on ? 1 : 0, std::memory_order_relaxed);
  return previous;
}
