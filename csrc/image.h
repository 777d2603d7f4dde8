// Types shared by preprocessing (CPU twin, CUDA kernel) and the runtime's batch queue.
#pragma once

#include <cstdint>

namespace nvclip {

// A uint8 image in HWC layout: channels 1 (gray) or 3 (RGB); rows `row_stride` bytes apart.
// `data` points to host or device memory depending on who receives it.
struct ImageView {
  const uint8_t* data = nullptr;
  int32_t height = 0;
  int32_t width = 0;
  int32_t channels = 3;
  int64_t row_stride = 0;
};

enum class Interpolation : int32_t { kBilinear = 0, kBicubic = 1 };

// open_clip's resize modes (PreprocessCfg.resize_mode).
enum class ResizeMode : int32_t { kShortest = 0, kLongest = 1, kSquash = 2 };

// Which of the two separable passes Pillow runs first (matters: the intermediate is uint8).
//   kPillow13:  vertical first iff (in_h - out_h) > 0 and (in_h - out_h) > 2 * (in_w - out_w)
//   kPillow122: vertical first iff in_h > 100 * in_w and out_h < in_h   (Pillow 12.2 - 12.3)
//   kPillow121: always horizontal first                                  (Pillow <= 12.1)
enum class PassOrder : int32_t { kPillow13 = 0, kPillow122 = 1, kPillow121 = 2 };

enum class OutputDType : int32_t { kFloat32 = 0, kFloat16 = 1 };

// open_clip's eval transform as data: resize (mode, interpolation) -> center crop/pad to size x size
// -> /255 -> (x - mean) / std, written NCHW.
struct PreprocessParams {
  int32_t size = 224;
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};  // OPENAI_DATASET_MEAN
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};  // OPENAI_DATASET_STD
  Interpolation interpolation = Interpolation::kBicubic;
  ResizeMode resize_mode = ResizeMode::kShortest;
  uint8_t fill = 0;  // pad value (uint8, before normalization) where the image is smaller than size
  PassOrder pass_order = PassOrder::kPillow13;
};

}  // namespace nvclip
