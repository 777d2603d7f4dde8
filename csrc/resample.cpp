// Pillow's coefficient tables. Compiled with -ffp-contract=off (see CMakeLists.txt): Pillow's x86
// wheels evaluate these expressions without fused multiply-adds, and a fused one can move a weight
// by one unit of 2^-22, hence an output by one level.
#include "resample.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace nvclip {

namespace {

// Resample.c: bicubic_filter with a = -0.5 (Keys' cubic convolution), support 2.
constexpr double kBicubicA = -0.5;
constexpr double kBicubicSupport = 2.0;
// Resample.c: bilinear_filter (triangle), support 1.
constexpr double kBilinearSupport = 1.0;

// Same expressions and evaluation order as Resample.c (the order matters in double).
double bicubic_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((kBicubicA + 2.0) * x - (kBicubicA + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * kBicubicA;
  return 0.0;
}

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

// Resample.c normalize_coeffs_8bpc: round half away from zero into 22-bit fixed point.
int32_t to_fixed_point(double weight) {
  constexpr double kScale = static_cast<double>(kUnitWeight);
  return weight < 0 ? static_cast<int32_t>(-0.5 + weight * kScale) : static_cast<int32_t>(0.5 + weight * kScale);
}

void check_axis_range(int32_t in_size, int32_t out_size, int32_t first, int32_t count) {
  if (in_size <= 0 || out_size <= 0 || first < 0 || count < 0 || count > out_size - first) {
    throw std::invalid_argument("axis coefficients: bad range in=" + std::to_string(in_size) +
                                " out=" + std::to_string(out_size) + " first=" + std::to_string(first) +
                                " count=" + std::to_string(count));
  }
}

}  // namespace

AxisCoeffs compute_axis_coeffs(int32_t in_size, int32_t out_size, Interpolation interpolation, int32_t first,
                               int32_t count) {
  check_axis_range(in_size, out_size, first, count);
  const bool bicubic = interpolation == Interpolation::kBicubic;
  double (*filter)(double) = bicubic ? bicubic_filter : bilinear_filter;
  const double filter_support = bicubic ? kBicubicSupport : kBilinearSupport;

  // Resample.c precompute_coeffs with the default box (0, 0, in_w, in_h), passed as floats: in0 = 0,
  // in1 = in_size, so scale = (double)(in1 - in0) / outSize.
  const float in0 = 0.0f;
  const float in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;  // widen only when downscaling
  const double support = filter_support * filterscale;
  const int32_t ksize = static_cast<int32_t>(std::ceil(support)) * 2 + 1;
  const double inv_filterscale = 1.0 / filterscale;

  AxisCoeffs a;
  a.in_size = in_size;
  a.out_size = out_size;
  a.first = first;
  a.count = count;
  a.ksize = ksize;
  a.start.resize(count);
  a.taps.resize(count);
  a.weights.assign(static_cast<size_t>(count) * ksize, 0);
  std::vector<double> k(ksize);
  for (int32_t j = 0; j < count; ++j) {
    const int32_t xx = first + j;
    const double center = in0 + (xx + 0.5) * scale;  // pixel centers at i + 0.5
    double ww = 0.0;
    int32_t xmin = static_cast<int32_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int32_t xmax = static_cast<int32_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int32_t x = 0; x < xmax; ++x) {
      const double w = filter((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0) {
      for (int32_t x = 0; x < xmax; ++x) k[x] /= ww;
    }
    a.start[j] = xmin;
    a.taps[j] = xmax;
    for (int32_t x = 0; x < xmax; ++x) a.weights[static_cast<size_t>(j) * ksize + x] = to_fixed_point(k[x]);
  }
  return a;
}

AxisCoeffs identity_axis_coeffs(int32_t size, int32_t first, int32_t count) {
  check_axis_range(size, size, first, count);
  AxisCoeffs a;
  a.in_size = size;
  a.out_size = size;
  a.first = first;
  a.count = count;
  a.ksize = 1;
  a.start.resize(count);
  a.taps.assign(count, 1);
  a.weights.assign(count, kUnitWeight);
  for (int32_t j = 0; j < count; ++j) a.start[j] = first + j;
  return a;
}

}  // namespace nvclip
