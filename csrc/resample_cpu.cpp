#include "resample_cpu.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "simd.h"

namespace nvclip {

namespace {

// Output bytes of one vertical step: 64 int32 accumulators stay in eight AVX2 registers.
constexpr int64_t kVerticalBlock = 64;

// Eight int32 lanes as a GCC/Clang generic vector: one AVX2 register in the AVX2 clone, two SSE2
// registers in the baseline one.
using Lanes = int32_t __attribute__((vector_size(kHorizontalLanes * sizeof(int32_t))));

[[gnu::always_inline]] inline Lanes load_lanes(const int32_t* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// clip8 over an array, written with min/max so that it vectorizes (resample.h's clip8 is the same
// function).
[[gnu::always_inline]] inline void clip_values(const int32_t* acc, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = acc[i] >> kPrecisionBits;
    out[i] = static_cast<uint8_t>(std::min(std::max(v, 0), kMaxPixel));
  }
}

// Outputs per horizontal step: their sums are collected, then clipped by one vector loop.
constexpr int32_t kHorizontalBlock = 64;
// The RGB sums of one pixel are stored as the low four lanes of a vector.
constexpr size_t kFoldedBytes = 4 * sizeof(int32_t);

template <int C>
[[gnu::always_inline]] inline void horizontal_row(const HorizontalTaps& h, const int32_t* row, uint8_t* out) {
  static_assert(C == 1 || C == 3, "gray or RGB");
  constexpr int kStep = pixels_per_group(C) * C;
  const int groups = h.groups;
  const int32_t* weights = h.weights.data();
  const int32_t* offsets = h.offset.data();
  int32_t sums[kHorizontalBlock * C + kHorizontalLanes];
  for (int32_t j0 = 0; j0 < h.count; j0 += kHorizontalBlock) {
    const int32_t m = std::min(kHorizontalBlock, h.count - j0);
    for (int32_t jj = 0; jj < m; ++jj) {
      const int32_t j = j0 + jj;
      const int32_t* s = row + offsets[j];
      const int32_t* w = weights + static_cast<int64_t>(j) * groups * kHorizontalLanes;
      Lanes acc = load_lanes(w) * load_lanes(s);
      for (int g = 1; g < groups; ++g) acc += load_lanes(w + g * kHorizontalLanes) * load_lanes(s + g * kStep);
      if constexpr (C == 3) {
        // Lane l holds channel l % 3 of pixel l / 3 of each group (lanes 6 and 7 weigh 0): lanes
        // 0..2 of acc + (acc rotated by 3) are the channel sums. Four lanes are stored; the fourth
        // is overwritten by the next pixel (sums has room past the last one).
        const Lanes folded = acc + __builtin_shufflevector(acc, acc, 3, 4, 5, 6, 7, 0, 1, 2);
        std::memcpy(sums + jj * C, &folded, kFoldedBytes);
      } else {
        Lanes folded = acc + __builtin_shufflevector(acc, acc, 4, 5, 6, 7, 0, 1, 2, 3);
        folded += __builtin_shufflevector(folded, folded, 2, 3, 0, 1, 6, 7, 4, 5);
        folded += __builtin_shufflevector(folded, folded, 1, 0, 3, 2, 5, 4, 7, 6);
        sums[jj] = folded[0];
      }
    }
    for (int64_t i = 0; i < int64_t{m} * C; ++i) sums[i] += kRoundingBias;
    clip_values(sums, int64_t{m} * C, out + int64_t{j0} * C);
  }
}

NVCLIP_CPU_CLONES void horizontal_row_rgb(const HorizontalTaps& h, const int32_t* row, uint8_t* out) {
  horizontal_row<3>(h, row, out);
}

NVCLIP_CPU_CLONES void horizontal_row_gray(const HorizontalTaps& h, const int32_t* row, uint8_t* out) {
  horizontal_row<1>(h, row, out);
}

template <int64_t kBlock>
[[gnu::always_inline]] inline void vertical_block(const uint8_t* src, int64_t stride, const int32_t* weights,
                                                  int taps, int64_t n, uint8_t* out) {
  int32_t acc[kBlock];
  for (int64_t l = 0; l < kBlock; ++l) acc[l] = kRoundingBias;
  for (int t = 0; t < taps; ++t) {
    const int32_t w = weights[t];
    const uint8_t* s = src + t * stride;
    for (int64_t l = 0; l < n; ++l) acc[l] += w * static_cast<int32_t>(s[l]);
  }
  clip_values(acc, n, out);
}

NVCLIP_CPU_CLONES void vertical_row(const uint8_t* src, int64_t stride, const int32_t* weights, int taps, int64_t n,
                                    uint8_t* out) {
  int64_t i = 0;
  for (; i + kVerticalBlock <= n; i += kVerticalBlock) {
    vertical_block<kVerticalBlock>(src + i, stride, weights, taps, kVerticalBlock, out + i);
  }
  if (i < n) vertical_block<kVerticalBlock>(src + i, stride, weights, taps, n - i, out + i);
}

}  // namespace

HorizontalTaps make_horizontal_taps(const AxisCoeffs& coeffs, int channels) {
  if (channels != 1 && channels != 3) throw std::invalid_argument("horizontal taps: channels must be 1 or 3");
  const int per_group = pixels_per_group(channels);
  HorizontalTaps h;
  h.channels = channels;
  h.count = coeffs.count;
  h.step = per_group * channels;
  int32_t max_taps = 0;
  for (int32_t t : coeffs.taps) max_taps = std::max(max_taps, t);
  h.groups = (max_taps + per_group - 1) / per_group;
  if (coeffs.count > 0) {
    h.src_first = coeffs.start.front();
    h.src_pixels = coeffs.start.back() + coeffs.taps.back() - h.src_first;  // windows are monotonic
  }
  h.offset.resize(coeffs.count);
  h.weights.assign(static_cast<size_t>(coeffs.count) * h.groups * kHorizontalLanes, 0);
  int64_t reach = 0;  // values read past the row start by the furthest group
  for (int32_t j = 0; j < coeffs.count; ++j) {
    h.offset[j] = (coeffs.start[j] - h.src_first) * channels;
    reach = std::max<int64_t>(reach, h.offset[j] + static_cast<int64_t>(h.groups - 1) * h.step + kHorizontalLanes);
    int32_t* w = h.weights.data() + static_cast<size_t>(j) * h.groups * kHorizontalLanes;
    for (int32_t t = 0; t < coeffs.taps[j]; ++t) {
      const int32_t weight = coeffs.weights[static_cast<size_t>(j) * coeffs.ksize + t];
      const int g = t / per_group;
      const int pixel = t % per_group;
      for (int c = 0; c < channels; ++c) w[g * kHorizontalLanes + pixel * channels + c] = weight;
    }
  }
  h.row_values = std::max<int64_t>(reach, static_cast<int64_t>(h.src_pixels) * channels);
  return h;
}

NVCLIP_CPU_CLONES void widen_row(const uint8_t* src, int64_t n, int32_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

void resample_horizontal_row(const HorizontalTaps& taps, const int32_t* row, uint8_t* out) {
  if (taps.channels == 3) {
    horizontal_row_rgb(taps, row, out);
  } else {
    horizontal_row_gray(taps, row, out);
  }
}

void resample_vertical_row(const uint8_t* src, int64_t stride, const int32_t* weights, int taps, int64_t n,
                           uint8_t* out) {
  vertical_row(src, stride, weights, taps, n, out);
}

}  // namespace nvclip
