// PreprocessStage: the BatchQueue's preprocessing step. Once per batch, a slot runner hands the
// stage the batch's staged uint8 images and the engine's input tensor; the stage writes the tensor
// directly (no intermediate buffer): on the host for CPU stages, enqueued on the slot's stream for
// CUDA stages. The product's stage is ResizeNormalizeStage (open_clip's transform).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine.h"
#include "image.h"

namespace nvclip {

// Why `view` cannot be read as an image, "" when it can: uint8 HWC pixels, 1 (gray) or 3 (RGB)
// channels, height and width > 0, row_stride >= width * channels. The queue checks every submitted
// image with it, the Python bindings every array they are given.
inline std::string image_view_error(const ImageView& v) {
  if (v.height <= 0 || v.width <= 0) {
    return "image is empty (" + std::to_string(v.height) + "x" + std::to_string(v.width) + ")";
  }
  if (v.data == nullptr) return "null data pointer";
  if (v.channels != 1 && v.channels != 3) {
    return "expected 1 (gray) or 3 (RGB) channels, got " + std::to_string(v.channels);
  }
  const int64_t row = int64_t{v.width} * v.channels;
  if (v.row_stride < row) {
    return "row stride " + std::to_string(v.row_stride) + " is smaller than a row (" + std::to_string(row) + " bytes)";
  }
  return {};
}

// Scratch a stage keeps for one slot between batches (the CUDA kernel's pinned and device buffers
// and its table cache). A slot runner asks its stage for one when the slot is created (with the
// slot's device current) and destroys it with the slot, after the slot's stream has finished.
class PreprocessSlotState {
 public:
  virtual ~PreprocessSlotState() = default;
};

struct PreprocessBatch {
  // n views in host memory, valid (image_view_error) with compact rows (row_stride == width *
  // channels). The pixels are in the stage's memory space: host staging for CPU stages, device
  // staging for CUDA stages.
  const ImageView* images = nullptr;
  int64_t n = 0;
  // The engine's input tensor (same memory space as the pixels): write rows 0..n-1, each
  // 3 x size x size in `dtype`, NCHW. Rows past n (padding up to the engine's minimum batch) are
  // the slot runner's.
  void* out = nullptr;
  OutputDType dtype = OutputDType::kFloat32;
  void* stream = nullptr;                // cudaStream_t of the slot for CUDA stages; nullptr for CPU stages
  PreprocessSlotState* state = nullptr;  // the slot's make_slot_state(), or nullptr
  // n strings, empty on entry. A stage that cannot process one image sets its entry (fail_item):
  // that image's row comes back NaN with this message and the rest of the batch goes on. Throwing
  // from run() fails the whole batch instead.
  std::string* item_errors = nullptr;

  void fail_item(int64_t i, std::string why) const { item_errors[i] = std::move(why); }
};

class PreprocessStage {
 public:
  virtual ~PreprocessStage() = default;
  virtual DeviceKind device() const = 0;
  virtual int32_t size() const = 0;  // S: writes 3 x S x S per image
  virtual bool supports(OutputDType /*dtype*/) const { return true; }
  virtual std::string name() const = 0;  // for error messages
  // The scratch of one slot (see PreprocessSlotState); nullptr when the stage needs none.
  virtual std::unique_ptr<PreprocessSlotState> make_slot_state() const { return nullptr; }
  // CPU stages run synchronously; CUDA stages enqueue on batch.stream and return. Calls for
  // different slots may run concurrently on different threads; one slot's calls never overlap.
  virtual void run(const PreprocessBatch& batch) = 0;
};

}  // namespace nvclip
