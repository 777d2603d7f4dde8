// NearestResizeStage: a test stand-in PreprocessStage, simple and deterministic: nearest-neighbour
// resize (squash) to size x size, x / 255, gray replicated to 3 channels. It is not open_clip's
// transform (ResizeNormalizeStage is); a uniform image maps to a uniform tensor, which is what the
// queue's tests use to check that every row reaches the right caller.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "preprocess_stage.h"

namespace nvtest {

// fail_marker value meaning "fail no image".
constexpr int32_t kNoFailMarker = -1;

class NearestResizeStage final : public nvclip::PreprocessStage {
 public:
  // fail_marker: an image whose first byte equals it fails as an item (a per-item failure for tests
  // of on_error handling); kNoFailMarker disables it. device kCuda needs a CUDA build.
  NearestResizeStage(int32_t size, nvclip::DeviceKind device, int32_t fail_marker = kNoFailMarker);

  nvclip::DeviceKind device() const override { return device_; }
  int32_t size() const override { return size_; }
  bool supports(nvclip::OutputDType dtype) const override;
  std::string name() const override { return "NearestResizeStage"; }
  std::unique_ptr<nvclip::PreprocessSlotState> make_slot_state() const override;
  void run(const nvclip::PreprocessBatch& batch) override;

 private:
  int32_t size_;
  nvclip::DeviceKind device_;
  int32_t fail_marker_;
};

#if NVCLIP_WITH_CUDA
// The CUDA half (nearest_resize_stage.cu): a slot's device copy of the views, and the kernel that
// reads them, enqueued on batch.stream.
std::unique_ptr<nvclip::PreprocessSlotState> nearest_resize_cuda_slot();
void nearest_resize_cuda(const nvclip::PreprocessBatch& batch, int32_t size);
#endif

}  // namespace nvtest
