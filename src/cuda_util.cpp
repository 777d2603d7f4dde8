#include "cuda_util.h"

#include <cstdlib>

namespace nvclip {

namespace {
// 12020 -> "12.2": how CUDA writes its versions (1000 * major + 10 * minor).
std::string cuda_version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}
}  // namespace

std::string describe_cuda_unavailable(const CudaProbe& probe) {
  if (probe.device_count > 0 && probe.error_name.empty()) return std::string();
  if (probe.insufficient_driver && probe.driver_version == 0) {
    return "no NVIDIA driver was found (the CUDA driver library libcuda.so.1 is not installed)";
  }
  if (probe.insufficient_driver) {
    return "the NVIDIA driver supports CUDA up to " + cuda_version_string(probe.driver_version) +
           ", older than the CUDA " + cuda_version_string(probe.runtime_version) +
           " runtime of this build: update the NVIDIA driver";
  }
  if (probe.no_device || probe.error_name.empty()) {
    std::string reason = "no NVIDIA GPU was found";
    if (probe.visible_devices_set) reason += " (CUDA_VISIBLE_DEVICES=\"" + probe.visible_devices + "\")";
    return reason;
  }
  return "no usable CUDA device: " + probe.error_name + " (" + probe.error_message + ")";
}

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
  CudaProbe probe;
  const cudaError_t status = query_device_count(&probe.device_count);
  if (status != cudaSuccess) {
    probe.error_name = cudaGetErrorName(status);
    probe.error_message = cudaGetErrorString(status);
    probe.insufficient_driver = status == cudaErrorInsufficientDriver;
    probe.no_device = status == cudaErrorNoDevice;
  }
  if (cudaDriverGetVersion(&probe.driver_version) != cudaSuccess) probe.driver_version = 0;
  if (cudaRuntimeGetVersion(&probe.runtime_version) != cudaSuccess) probe.runtime_version = 0;
  cudaGetLastError();
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
    probe.visible_devices_set = true;
    probe.visible_devices = visible;
  }
  return describe_cuda_unavailable(probe);
}

CudaDeviceInfo cuda_device_info(int device) {
  const int count = cuda_device_count();
  if (device < 0 || device >= count) {
    throw EngineError("cuda:" + std::to_string(device) + " is not usable: " +
                      (count == 0 ? cuda_unavailable_reason()
                                  : "only " + std::to_string(count) + " CUDA device(s) are visible"));
  }
  cudaDeviceProp props{};
  NVCLIP_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  return CudaDeviceInfo{props.name, props.major, props.minor};
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

CudaDeviceInfo cuda_device_info(int device) {
  throw EngineError("cuda:" + std::to_string(device) + " is not usable: " + cuda_unavailable_reason());
}

#endif

}  // namespace nvclip
