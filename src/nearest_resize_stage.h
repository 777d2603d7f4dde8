// NearestResizeStage: a deliberately simple, deterministic PreprocessStage for tests and plumbing —
// nearest-neighbour resize (squash) to size x size, x / 255, gray replicated to 3 channels. It is NOT
// open_clip's transform (that is issue 3's resize_normalize); a uniform image maps to a uniform
// tensor, which is what the queue's tests use to check that every row reaches the right caller.
#pragma once

#include <cstdint>

#include "preprocess_stage.h"

namespace nvclip {

// Test hook value meaning "fail no image".
constexpr int32_t kNoFailMarker = -1;

class NearestResizeStage final : public PreprocessStage {
 public:
  // fail_marker: an image whose first byte equals it fails as an item (a per-item failure for tests
  // of on_error handling); kNoFailMarker disables it. device kCuda needs a CUDA build.
  NearestResizeStage(int32_t size, DeviceKind device, int32_t fail_marker = kNoFailMarker);

  DeviceKind device() const override { return device_; }
  int32_t size() const override { return size_; }
  bool supports(OutputDType dtype) const override;
  std::string name() const override { return "NearestResizeStage"; }
  void run(const PreprocessBatch& batch) override;

 private:
  int32_t size_;
  DeviceKind device_;
  int32_t fail_marker_;
};

#if NVCLIP_WITH_CUDA
// The CUDA kernel behind NearestResizeStage (nearest_resize_stage.cu). Launches on `stream`.
void nearest_resize_cuda(const ImageView* device_images, int64_t n, int32_t size, OutputDType dtype,
                         void* device_out, void* stream);
#endif

}  // namespace nvclip
