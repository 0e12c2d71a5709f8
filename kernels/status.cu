// Error reporting shared by all entry points (see common.cuh).
#include "common.cuh"

#include <cstdarg>

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
