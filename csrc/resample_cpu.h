// The CPU twin's row loops: the same integer math as resample.h, arranged so the compiler can
// vectorize it (and, through simd.h, compile an AVX2 clone chosen at run time).
#pragma once

#include <cstdint>
#include <vector>

#include "resample.h"

namespace nvclip {

// Lanes of one vector step of the horizontal loop; a group holds 8 / C whole pixels (C = 1 or 3).
constexpr int kHorizontalLanes = 8;

constexpr int pixels_per_group(int channels) { return kHorizontalLanes / channels; }

// The taps of AxisCoeffs laid out for resample_horizontal_row on rows of `channels` channels:
// output j reads `groups` steps of kHorizontalLanes values from row + offset[j] + g * step and
// multiplies them by weights[(j * groups + g) * kHorizontalLanes + lane]; lanes beyond the window
// (and the unused lanes 6, 7 of an RGB group) carry weight 0.
struct HorizontalTaps {
  int32_t channels = 0;
  int32_t count = 0;
  int32_t groups = 0;
  int32_t step = 0;        // values between groups: pixels_per_group * channels
  int32_t src_first = 0;   // the source pixel the row passed to resample_horizontal_row starts at
  int32_t src_pixels = 0;  // source pixels the outputs read: [src_first, src_first + src_pixels)
  int64_t row_values = 0;  // values the row buffer must hold, zero padding included
  std::vector<int32_t> offset;
  std::vector<int32_t> weights;
};

HorizontalTaps make_horizontal_taps(const AxisCoeffs& coeffs, int channels);

// out[j * C + c] for the taps' outputs j, from `row`: row_values int32, the source pixels
// [src_first, src_first + src_pixels) widened from uint8 (widen_row), followed by zeros. (int32 so
// that the vector loop loads whole lanes; widening once per row is cheaper than per tap.)
void resample_horizontal_row(const HorizontalTaps& taps, const int32_t* row, uint8_t* out);

// dst[i] = src[i] for i in [0, n).
void widen_row(const uint8_t* src, int64_t n, int32_t* dst);

// out[i] = clip8(bias + sum_t weights[t] * src[t * stride + i]) for i in [0, n): Pillow's vertical
// pass over one output row (any number of interleaved channels).
void resample_vertical_row(const uint8_t* src, int64_t stride, const int32_t* weights, int taps, int64_t n,
                           uint8_t* out);

}  // namespace nvclip
