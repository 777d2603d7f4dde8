#include "nearest_resize_stage.h"

#include <stdexcept>
#include <string>

#include "errors.h"

using nvclip::DeviceKind;
using nvclip::OutputDType;

namespace nvtest {

namespace {
constexpr float kInv255 = 1.0f / 255.0f;
constexpr int32_t kChannelsOut = 3;
}  // namespace

NearestResizeStage::NearestResizeStage(int32_t size, DeviceKind device, int32_t fail_marker)
    : size_(size), device_(device), fail_marker_(fail_marker) {
  if (size <= 0) throw std::invalid_argument("NearestResizeStage: size must be > 0, got " + std::to_string(size));
  if (device == DeviceKind::kCuda && !NVCLIP_WITH_CUDA) {
    throw nvclip::EngineError("NearestResizeStage(device='cuda') needs a CUDA build of nvclip_fast");
  }
  if (device == DeviceKind::kCuda && fail_marker != kNoFailMarker) {
    // The marker is read from the pixels, which live in device memory for a CUDA stage.
    throw std::invalid_argument("NearestResizeStage: fail_marker is supported on the CPU only");
  }
}

bool NearestResizeStage::supports(OutputDType dtype) const {
  // The CPU path writes float32 only (no host half conversion here); the kernel writes both.
  return dtype == OutputDType::kFloat32 || device_ == DeviceKind::kCuda;
}

std::unique_ptr<nvclip::PreprocessSlotState> NearestResizeStage::make_slot_state() const {
#if NVCLIP_WITH_CUDA
  if (device_ == DeviceKind::kCuda) return nearest_resize_cuda_slot();
#endif
  return nullptr;
}

void NearestResizeStage::run(const nvclip::PreprocessBatch& batch) {
#if NVCLIP_WITH_CUDA
  if (device_ == DeviceKind::kCuda) {
    nearest_resize_cuda(batch, size_);
    return;
  }
#endif
  const int64_t plane = static_cast<int64_t>(size_) * size_;
  auto* out = static_cast<float*>(batch.out);
  for (int64_t i = 0; i < batch.n; ++i) {
    const nvclip::ImageView& image = batch.images[i];
    float* dst = out + i * kChannelsOut * plane;
    if (fail_marker_ != kNoFailMarker && image.data[0] == fail_marker_) {
      batch.fail_item(i, "NearestResizeStage: image starts with the fail marker " + std::to_string(fail_marker_));
      continue;
    }
    for (int32_t y = 0; y < size_; ++y) {
      const int64_t sy = static_cast<int64_t>(y) * image.height / size_;
      const uint8_t* row = image.data + sy * image.row_stride;
      for (int32_t x = 0; x < size_; ++x) {
        const int64_t sx = static_cast<int64_t>(x) * image.width / size_;
        for (int32_t c = 0; c < kChannelsOut; ++c) {
          const int32_t src_c = image.channels == 1 ? 0 : c;
          dst[c * plane + static_cast<int64_t>(y) * size_ + x] = row[sx * image.channels + src_c] * kInv255;
        }
      }
    }
  }
}

}  // namespace nvtest
