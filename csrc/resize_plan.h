// Where each output pixel of open_clip's eval transform comes from: the resize size of each
// resize mode, the center crop or pad, and which of Pillow's two passes runs first. Host only.
#pragma once

#include <cstdint>
#include <string>

#include "image.h"

namespace nvclip {

// One axis of the transform: the source axis is resized from `in_size` to `resized` (identity
// when equal: no resampling), then output pixels [pad_before, pad_before + count) take resized
// pixels [first, first + count); the rest of the `size` output pixels are padding (`fill`).
struct AxisPlan {
  int32_t in_size = 0;
  int32_t resized = 0;
  int32_t first = 0;
  int32_t count = 0;
  int32_t pad_before = 0;

  bool resample() const { return resized != in_size; }
};

struct ResizePlan {
  AxisPlan y;
  AxisPlan x;
  bool vertical_first = false;  // Pillow runs the vertical pass first (PreprocessParams::pass_order)
};

// Largest accepted output size and source side (Pillow passes boxes as float: exact below 2^24).
constexpr int32_t kMaxOutputSize = 8192;
constexpr int32_t kMaxImageSide = int32_t{1} << 24;

// Empty when the parameters are valid, else what is wrong ("std[1] is 0", ...).
std::string check_params(const PreprocessParams& params);

// The plan for a height x width image. Throws std::invalid_argument when open_clip's transform
// would fail too (resize_mode 'longest' rounding a side to 0 pixels: Pillow refuses 0-size images).
ResizePlan plan_resize(int32_t height, int32_t width, const PreprocessParams& params);

// Python's int(round(x / 2)) for an integer x >= 0: round half to even, as torchvision's
// center_crop computes its offsets (int(round((H - S) / 2.0))).
constexpr int32_t half_round_to_even(int32_t x) {
  const int32_t q = x / 2;
  return (x % 2 != 0 && q % 2 != 0) ? q + 1 : q;
}

}  // namespace nvclip
