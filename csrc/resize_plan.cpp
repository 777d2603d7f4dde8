#include "resize_plan.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace nvclip {

namespace {

constexpr int kChannels = 3;

// torchvision center_crop (and open_clip's center_crop_or_pad): pad by (S - r) // 2 before when the
// resized side is smaller than S, else crop from int(round((r - S) / 2.0)).
AxisPlan plan_axis(int32_t in_size, int32_t resized, int32_t size) {
  AxisPlan a;
  a.in_size = in_size;
  a.resized = resized;
  if (resized >= size) {
    a.first = half_round_to_even(resized - size);
    a.count = size;
    a.pad_before = 0;
  } else {
    a.first = 0;
    a.count = resized;
    a.pad_before = (size - resized) / 2;
  }
  return a;
}

// Pillow's choice of which separable pass runs first; see PassOrder in image.h.
//   Pillow 13.0 (Resample.c ImagingResampleInner): vertical first when the height shrinks by more
//     than twice as many pixels as the width does.
//   Pillow 12.2-12.3 (Image.resize): vertical first for images taller than 100x their width whose
//     height shrinks.
//   Pillow <= 12.1: always horizontal first.
bool vertical_first(PassOrder order, int32_t in_h, int32_t in_w, int32_t out_h, int32_t out_w) {
  switch (order) {
    case PassOrder::kPillow13: {
      const int64_t dh = int64_t{in_h} - out_h;
      const int64_t dw = int64_t{in_w} - out_w;
      return dh > 0 && dh > dw * 2;
    }
    case PassOrder::kPillow122:
      return int64_t{in_h} > int64_t{in_w} * 100 && out_h < in_h;
    case PassOrder::kPillow121:
      return false;
  }
  return false;
}

}  // namespace

std::string check_params(const PreprocessParams& p) {
  if (p.size < 1 || p.size > kMaxOutputSize) {
    return "size must be in 1.." + std::to_string(kMaxOutputSize) + ", got " + std::to_string(p.size);
  }
  for (int c = 0; c < kChannels; ++c) {
    if (!std::isfinite(p.mean[c])) return "mean[" + std::to_string(c) + "] is not finite";
    // torchvision's Normalize refuses a std that is 0 in float32.
    if (!std::isfinite(p.std[c]) || p.std[c] == 0.0f) {
      return "std[" + std::to_string(c) + "] must be finite and non-zero";
    }
  }
  if (p.interpolation != Interpolation::kBicubic && p.interpolation != Interpolation::kBilinear) {
    return "unknown interpolation " + std::to_string(static_cast<int>(p.interpolation));
  }
  if (p.resize_mode != ResizeMode::kShortest && p.resize_mode != ResizeMode::kLongest &&
      p.resize_mode != ResizeMode::kSquash) {
    return "unknown resize_mode " + std::to_string(static_cast<int>(p.resize_mode));
  }
  if (p.pass_order != PassOrder::kPillow13 && p.pass_order != PassOrder::kPillow122 &&
      p.pass_order != PassOrder::kPillow121) {
    return "unknown pass_order " + std::to_string(static_cast<int>(p.pass_order));
  }
  return {};
}

ResizePlan plan_resize(int32_t height, int32_t width, const PreprocessParams& p) {
  if (height < 1 || width < 1 || height > kMaxImageSide || width > kMaxImageSide) {
    throw std::invalid_argument("image size " + std::to_string(height) + "x" + std::to_string(width) +
                                " is outside 1.." + std::to_string(kMaxImageSide));
  }
  const int32_t s = p.size;
  int64_t out_h = s;
  int64_t out_w = s;
  switch (p.resize_mode) {
    case ResizeMode::kShortest: {
      // torchvision _compute_resized_output_size: the short side becomes S, the long side
      // int(S * long / short) (Python true division, then truncation).
      const int64_t short_side = std::min(height, width);
      const int64_t long_side = std::max(height, width);
      const int64_t new_long =
          static_cast<int64_t>(static_cast<double>(s * long_side) / static_cast<double>(short_side));
      if (width <= height) {
        out_w = s;
        out_h = new_long;
      } else {
        out_h = s;
        out_w = new_long;
      }
      break;
    }
    case ResizeMode::kLongest: {
      // open_clip ResizeKeepRatio.get_params with longest=1: ratio = max(h / S, w / S), each side
      // round(side / ratio) (Python round: half to even; nearbyint in the default rounding mode).
      const double ratio = std::max(static_cast<double>(height) / s, static_cast<double>(width) / s);
      out_h = static_cast<int64_t>(std::nearbyint(height / ratio));
      out_w = static_cast<int64_t>(std::nearbyint(width / ratio));
      break;
    }
    case ResizeMode::kSquash:
      break;
  }
  if (out_h < 1 || out_w < 1) {
    throw std::invalid_argument("a " + std::to_string(height) + "x" + std::to_string(width) +
                                " image resizes to " + std::to_string(out_h) + "x" + std::to_string(out_w) +
                                " for size " + std::to_string(s) +
                                " (open_clip's transform fails on it too: Pillow needs sides > 0)");
  }
  if (out_h > kMaxImageSide || out_w > kMaxImageSide) {
    throw std::invalid_argument("a " + std::to_string(height) + "x" + std::to_string(width) +
                                " image resizes to " + std::to_string(out_h) + "x" + std::to_string(out_w) +
                                ", beyond " + std::to_string(kMaxImageSide) + " pixels a side");
  }
  ResizePlan plan;
  plan.y = plan_axis(height, static_cast<int32_t>(out_h), s);
  plan.x = plan_axis(width, static_cast<int32_t>(out_w), s);
  // The order only matters when both passes resample.
  plan.vertical_first = plan.y.resample() && plan.x.resample() &&
                        vertical_first(p.pass_order, height, width, plan.y.resized, plan.x.resized);
  return plan;
}

}  // namespace nvclip
