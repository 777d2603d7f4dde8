// cuda_unavailable_reason's wording: what a user reads when no GPU can be used, for each thing the
// CUDA runtime reports (no driver, an old driver, no GPU, anything else), and the real probe.
#include <string>

#include "cuda_util.h"
#include "test_support.h"

using nvclip::CudaProbe;
using nvclip::describe_cuda_unavailable;

namespace {

constexpr int kCuda13 = 13000;
constexpr int kCuda122 = 12020;

CudaProbe insufficient_driver(int driver_version) {
  CudaProbe probe;
  probe.error_name = "cudaErrorInsufficientDriver";
  probe.error_message = "CUDA driver version is insufficient for CUDA runtime version";
  probe.insufficient_driver = true;
  probe.driver_version = driver_version;
  probe.runtime_version = kCuda13;
  return probe;
}

}  // namespace

TEST_CASE("no_driver_says_no_driver_was_found") {
  const std::string reason = describe_cuda_unavailable(insufficient_driver(0));
  CHECK(reason == "no NVIDIA driver was found (the CUDA driver library libcuda.so.1 is not installed)");
}

TEST_CASE("an_old_driver_names_both_versions") {
  CHECK(describe_cuda_unavailable(insufficient_driver(kCuda122)) ==
        "the NVIDIA driver supports CUDA up to 12.2, older than the CUDA 13.0 runtime of this build: "
        "update the NVIDIA driver");
}

TEST_CASE("no_gpu_says_so_and_shows_cuda_visible_devices") {
  CudaProbe probe;
  probe.error_name = "cudaErrorNoDevice";
  probe.no_device = true;
  CHECK(describe_cuda_unavailable(probe) == "no NVIDIA GPU was found");
  probe.visible_devices_set = true;
  CHECK(describe_cuda_unavailable(probe) == "no NVIDIA GPU was found (CUDA_VISIBLE_DEVICES=\"\")");
  CudaProbe none;  // the query succeeded and counted no device
  CHECK(describe_cuda_unavailable(none) == "no NVIDIA GPU was found");
}

TEST_CASE("other_errors_keep_the_cuda_error") {
  CudaProbe probe;
  probe.error_name = "cudaErrorSystemNotReady";
  probe.error_message = "system not yet initialized";
  CHECK(describe_cuda_unavailable(probe) == "no usable CUDA device: cudaErrorSystemNotReady (system not yet initialized)");
}

TEST_CASE("a_usable_device_has_no_reason") {
  CudaProbe probe;
  probe.device_count = 1;
  CHECK(describe_cuda_unavailable(probe).empty());
}

TEST_CASE("the_probe_of_this_machine_agrees_with_the_device_count") {
  const std::string reason = nvclip::cuda_unavailable_reason();
  CHECK((nvclip::cuda_device_count() == 0) == !reason.empty());
  CHECK(reason.find("insufficient") == std::string::npos);
  if (nvclip::cuda_device_count() == 0) {
    CHECK_THROWS_AS(nvclip::cuda_device_info(0), nvclip::EngineError);
  }
}
