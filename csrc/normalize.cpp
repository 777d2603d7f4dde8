#include "normalize.h"

#include <cstring>

namespace nvclip {

namespace {

constexpr uint32_t kFloatSignBit = 0x80000000u;
constexpr uint32_t kFloatAbsMask = 0x7fffffffu;
constexpr uint32_t kFloatExpInf = 0x7f800000u;  // exponent all ones
constexpr int kFloatMantissaBits = 23;
constexpr int kFloatBias = 127;
constexpr int kHalfMantissaBits = 10;
constexpr int kHalfBias = 15;
constexpr uint16_t kHalfInf = 0x7c00u;
constexpr uint16_t kHalfQuietNan = 0x7e00u;
constexpr int kMantissaShift = kFloatMantissaBits - kHalfMantissaBits;  // 13 bits dropped
// Smallest float that rounds to half infinity: 65520 = max half (65504) + half an ulp (16).
constexpr uint32_t kHalfOverflowBits = 0x477ff000u;
// Smallest normal half, 2^-14, as float bits.
constexpr uint32_t kHalfMinNormalBits = static_cast<uint32_t>(kFloatBias - 14) << kFloatMantissaBits;

// Shift `value` right by `shift` bits, rounding to nearest with ties to even.
uint32_t shift_round_even(uint32_t value, int shift) {
  if (shift >= 32) return 0;
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((uint32_t{1} << shift) - 1);
  const uint32_t halfway = uint32_t{1} << (shift - 1);
  return kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
}

}  // namespace

uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const auto sign = static_cast<uint16_t>((bits & kFloatSignBit) >> 16);
  const uint32_t abs = bits & kFloatAbsMask;
  if (abs > kFloatExpInf) return sign | kHalfQuietNan;
  if (abs >= kHalfOverflowBits) return sign | kHalfInf;
  if (abs >= kHalfMinNormalBits) {
    // Normal half: rebias the exponent; a mantissa carry rounds up into the exponent correctly.
    const uint32_t rebased = abs - (static_cast<uint32_t>(kFloatBias - kHalfBias) << kFloatMantissaBits);
    return sign | static_cast<uint16_t>(shift_round_even(rebased, kMantissaShift));
  }
  // Subnormal half (or zero): the value is mantissa * 2^(exponent - 150); in half's subnormal unit
  // 2^-24 that is mantissa >> (126 - exponent). A result of 0x400 is the smallest normal half, which
  // has the same encoding.
  const int exponent = static_cast<int>(abs >> kFloatMantissaBits);
  if (exponent == 0) return sign;  // float zero or subnormal: far below half's smallest subnormal
  const uint32_t mantissa = (abs & ((uint32_t{1} << kFloatMantissaBits) - 1)) | (uint32_t{1} << kFloatMantissaBits);
  constexpr int kSubnormalShiftBase = kFloatBias - 1;  // 126
  return sign | static_cast<uint16_t>(shift_round_even(mantissa, kSubnormalShiftBase - exponent));
}

NormalizeTable make_normalize_table(const PreprocessParams& params, OutputDType dtype) {
  NormalizeTable table;
  for (int c = 0; c < kOutputChannels; ++c) {
    for (int level = 0; level < kLevels; ++level) {
      table.words[c][level] = normalize_word(static_cast<uint8_t>(level), params.mean[c], params.std[c], dtype);
    }
  }
  return table;
}

}  // namespace nvclip
