// Pillow's antialiased resampler (src/libImaging/Resample.c), bit-exact: the per-pixel integer
// math shared by the CPU twin and the CUDA kernel, and the host-side coefficient tables.
//
// Pillow's 8-bit path, which this reproduces:
//   * per axis, output index i samples the input around center (i + 0.5) * in / out with the
//     filter's support widened by the downscale factor (antialiasing; no widening when upscaling);
//   * weights are computed in double, normalized to sum 1, then stored as 22-bit fixed point,
//     rounded half away from zero (normalize_coeffs_8bpc);
//   * each output channel is 1 << 21 + sum(pixel * weight) in int32, then >> 22 and clamped to
//     0..255 (clip8);
//   * the two separable passes meet in a uint8 image, so the pass order changes results.
#pragma once

#include <cstdint>
#include <vector>

#include "hd.h"
#include "image.h"

namespace nvclip {

// Resample.c: PRECISION_BITS = 32 - 8 - 2 (8 bits of pixel, 2 bits of headroom for negative lobes).
constexpr int kPrecisionBits = 22;
// Resample.c: every accumulator starts at 1 << (PRECISION_BITS - 1), so >> rounds to nearest.
constexpr int32_t kRoundingBias = int32_t{1} << (kPrecisionBits - 1);
// A weight of exactly 1.0 in fixed point (an identity tap).
constexpr int32_t kUnitWeight = int32_t{1} << kPrecisionBits;
constexpr int32_t kMaxPixel = 255;

// Resample.c clip8: acc >> PRECISION_BITS clamped to 0..255 (Pillow looks it up in a table that
// covers -640..639, wider than any bicubic overshoot, so a clamp is the same function).
NVCLIP_HD uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;  // arithmetic shift, as in Pillow
  return static_cast<uint8_t>(v < 0 ? 0 : (v > kMaxPixel ? kMaxPixel : v));
}

// acc[c] += sum_t weights[t] * p[t * tap_stride + c] for the C channels of one output pixel.
// Integer sums are exact, so any summation order gives Pillow's result.
template <int C>
NVCLIP_HD void accumulate_taps(const uint8_t* p, int64_t tap_stride, const int32_t* weights, int taps,
                               int32_t* acc) {
  NVCLIP_NO_UNROLL
  for (int t = 0; t < taps; ++t) {
    const int32_t w = weights[t];
    const uint8_t* q = p + t * tap_stride;
    for (int c = 0; c < C; ++c) acc[c] += w * static_cast<int32_t>(q[c]);
  }
}

// The taps of one axis for a run of consecutive output indices [first, first + count) of a resize
// from in_size to out_size: output j reads inputs start[j] .. start[j] + taps[j] - 1 with
// weights[j * ksize + t]. start[] and start[] + taps[] are non-decreasing in j (Pillow's windows
// move with their centers); the tile and band logic rely on it.
struct AxisCoeffs {
  int32_t in_size = 0;
  int32_t out_size = 0;
  int32_t first = 0;
  int32_t count = 0;
  int32_t ksize = 0;  // Pillow's ksize = 2 * ceil(support) + 1; taps[j] <= ksize
  std::vector<int32_t> start;
  std::vector<int32_t> taps;
  std::vector<int32_t> weights;  // count * ksize, zero past taps[j]
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs [first, first + count) of an
// in_size -> out_size resize. Host only; computed in double exactly as Pillow does.
AxisCoeffs compute_axis_coeffs(int32_t in_size, int32_t out_size, Interpolation interpolation, int32_t first,
                               int32_t count);

// An axis that is not resampled (Pillow skips the pass when the size already matches): output j
// copies input first + j. One tap of weight 1.0, which the integer math passes through unchanged.
AxisCoeffs identity_axis_coeffs(int32_t size, int32_t first, int32_t count);

}  // namespace nvclip
