// The last step of open_clip's eval transform, ToTensor + Normalize, as a table: an output pixel
// depends only on its channel and its uint8 level, so both the CPU twin and the CUDA kernel (each
// block builds the table in shared memory with normalize_word) look the value up instead of
// recomputing it.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"
#include "image.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace nvclip {

constexpr int kOutputChannels = 3;
constexpr int kLevels = 256;
constexpr float kLevelScale = 255.0f;

// torchvision ToTensor: uint8 -> float32, div(255); Normalize: sub_(mean) then div_(std), in float32
// with true division (not a multiplication by the reciprocal), so each step rounds as torch's does.
// On the device the intrinsics spell out the rounding (nearest even), whatever the compiler flags.
NVCLIP_HD float normalize_level(uint8_t level, float mean, float std) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(__fsub_rn(__fdiv_rn(static_cast<float>(level), kLevelScale), mean), std);
#else
  const float x = static_cast<float>(level) / kLevelScale;
  return (x - mean) / std;
#endif
}

// IEEE float32 -> float16 bits, round to nearest even (overflow to inf, subnormals kept).
uint16_t float_to_half_bits(float value);

// One output word: the float32 bits of normalize_level, or its float16 bits (round to nearest
// even, as torch's .half(); the device's __float2half_rn rounds the same way) in the low 16 bits.
NVCLIP_HD uint32_t normalize_word(uint8_t level, float mean, float std, OutputDType dtype) {
  const float v = normalize_level(level, mean, std);
#if defined(__CUDA_ARCH__)
  return dtype == OutputDType::kFloat16 ? __half_as_ushort(__float2half_rn(v)) : __float_as_uint(v);
#else
  if (dtype == OutputDType::kFloat16) return float_to_half_bits(v);
  uint32_t word;
  std::memcpy(&word, &v, sizeof word);
  return word;
#endif
}

// The output word of every (channel, level): an output pixel depends on nothing else.
struct NormalizeTable {
  uint32_t words[kOutputChannels][kLevels];
};

NormalizeTable make_normalize_table(const PreprocessParams& params, OutputDType dtype);

// The size in bytes of one output element.
constexpr int64_t output_element_bytes(OutputDType dtype) { return dtype == OutputDType::kFloat16 ? 2 : 4; }

}  // namespace nvclip
