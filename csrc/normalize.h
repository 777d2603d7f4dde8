// The last step of open_clip's eval transform, ToTensor + Normalize, as a table: an output pixel
// depends only on its channel and its uint8 level, so both the CPU twin and the CUDA kernel look
// the value up instead of recomputing it.
#pragma once

#include <cstdint>

#include "hd.h"
#include "image.h"

namespace nvclip {

constexpr int kOutputChannels = 3;
constexpr int kLevels = 256;

// torchvision ToTensor: uint8 -> float32, div(255); Normalize: sub_(mean) then div_(std), in float32
// with true division (not a multiplication by the reciprocal), so each step rounds as torch's does.
NVCLIP_HD float normalize_level(uint8_t level, float mean, float std) {
  const float x = static_cast<float>(level) / 255.0f;
  return (x - mean) / std;
}

// The bits of each output value: float32 bits, or float16 bits (round to nearest even, as torch's
// .half()) in the low 16 bits.
struct NormalizeTable {
  uint32_t words[kOutputChannels][kLevels];
};

NormalizeTable make_normalize_table(const PreprocessParams& params, OutputDType dtype);

// IEEE float32 -> float16 bits, round to nearest even (overflow to inf, subnormals kept).
uint16_t float_to_half_bits(float value);

// The size in bytes of one output element.
constexpr int64_t output_element_bytes(OutputDType dtype) { return dtype == OutputDType::kFloat16 ? 2 : 4; }

}  // namespace nvclip
