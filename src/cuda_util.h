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

// Why there is no usable device ("" when there is one): no NVIDIA driver, a driver older than the
// build's CUDA runtime, no GPU, a CPU-only build. Every message about a missing device uses it.
std::string cuda_unavailable_reason();

// What probing the CUDA runtime found, as plain data, so that its wording is testable anywhere.
struct CudaProbe {
  int device_count = 0;
  std::string error_name;      // cudaGetDeviceCount's error ("" when it succeeded)
  std::string error_message;   // cudaGetErrorString of it
  bool insufficient_driver = false;  // cudaErrorInsufficientDriver: no driver, or one too old
  bool no_device = false;            // cudaErrorNoDevice
  int driver_version = 0;   // cudaDriverGetVersion (1000 * major + 10 * minor); 0: no driver installed
  int runtime_version = 0;  // cudaRuntimeGetVersion of this build
  bool visible_devices_set = false;  // CUDA_VISIBLE_DEVICES is set (and may hide every GPU)
  std::string visible_devices;
};

// The user-facing reason for a probe ("" when a device is usable). The CUDA runtime reports a
// missing driver as cudaErrorInsufficientDriver ("CUDA driver version is insufficient for CUDA
// runtime version"); a driver version of 0 tells that no driver is installed at all.
std::string describe_cuda_unavailable(const CudaProbe& probe);

// Name and compute capability of a CUDA device; throws EngineError where none is usable.
struct CudaDeviceInfo {
  std::string name;
  int major = 0;
  int minor = 0;
};
CudaDeviceInfo cuda_device_info(int device);

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
