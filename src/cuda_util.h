// CUDA runtime helpers. With NVCLIP_WITH_CUDA off they report "no device" and never throw on query.
#pragma once

#include <string>

#include "errors.h"

#if NVCLIP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace nvclip {

// Number of usable CUDA devices; 0 without a driver, without a GPU or in a CPU-only build.
int cuda_device_count();

// Why there is no usable device ("" when there is one): driver missing, no GPU, CPU-only build.
std::string cuda_unavailable_reason();

#if NVCLIP_WITH_CUDA
// Throws EngineError naming the call and the CUDA error; clears the (non-sticky) error state.
void cuda_check(cudaError_t status, const char* call, const char* file, int line);
#define NVCLIP_CUDA_CHECK(call) ::nvclip::cuda_check((call), #call, __FILE__, __LINE__)

// Makes `device` current for the scope (allocations, TensorRT deserialization, contexts) and
// restores the caller's device afterwards.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int device) {
    NVCLIP_CUDA_CHECK(cudaGetDevice(&previous_));
    NVCLIP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceScope() { cudaSetDevice(previous_); }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = 0;
};
#endif

}  // namespace nvclip
