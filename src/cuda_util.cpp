#include "cuda_util.h"

namespace nvclip {

#if NVCLIP_WITH_CUDA

namespace {
cudaError_t query_device_count(int* count) {
  *count = 0;
  cudaError_t status = cudaGetDeviceCount(count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // a failed query must not poison later calls
    *count = 0;
  }
  return status;
}
}  // namespace

int cuda_device_count() {
  int count = 0;
  query_device_count(&count);
  return count;
}

std::string cuda_unavailable_reason() {
  int count = 0;
  cudaError_t status = query_device_count(&count);
  if (status != cudaSuccess) {
    return std::string("no usable CUDA device: ") + cudaGetErrorName(status) + " (" +
           cudaGetErrorString(status) + ")";
  }
  return count > 0 ? std::string() : std::string("no CUDA device present");
}

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  throw EngineError(std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                    cudaGetErrorString(status) + ") at " + file + ":" + std::to_string(line));
}

#else

int cuda_device_count() { return 0; }

std::string cuda_unavailable_reason() {
  return "nvclip_fast was built without CUDA (NVCLIP_CUDA=OFF or no nvcc at build time)";
}

#endif

}  // namespace nvclip
