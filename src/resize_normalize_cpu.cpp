// The CPU twin of the resize_normalize kernel: images (or bands of output rows when there are
// fewer images than threads) spread over a ThreadPool; per band, Pillow's two passes with the
// row loops of csrc/resample_cpu.h, then normalize + HWC -> CHW through the NormalizeTable.
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "axis_tables.h"
#include "normalize.h"
#include "resample_cpu.h"
#include "resize_normalize.h"
#include "resize_normalize_kernel.h"
#include "thread_pool.h"

namespace nvclip {

namespace {

constexpr size_t kCpuCacheEntries = 512;
// Bands narrower than this cost more in recomputed first-pass rows than they gain in parallelism.
constexpr int32_t kMinBandRows = 32;
// Aim for this many tasks per thread when splitting images into bands (load balance).
constexpr int64_t kTasksPerThread = 2;
// AxisKey::variant of the vertical-pass tables (the horizontal ones use the channel count).
constexpr int32_t kVerticalVariant = 0;

// An axis's taps for the CPU twin: the plain table (vertical pass) and, for the horizontal pass,
// the vector-friendly layout for the image's channel count.
struct CpuAxis {
  AxisCoeffs coeffs;
  HorizontalTaps horizontal;
};

AxisCache<CpuAxis>& cpu_axis_cache() {
  static AxisCache<CpuAxis> cache(kCpuCacheEntries);
  return cache;
}

std::shared_ptr<const CpuAxis> vertical_axis(const AxisPlan& a, Interpolation f) {
  return cpu_axis_cache().get(axis_key(a, f, kVerticalVariant), [&] { return CpuAxis{axis_coeffs(a, f), {}}; });
}

std::shared_ptr<const CpuAxis> horizontal_axis(const AxisPlan& a, Interpolation f, int channels) {
  return cpu_axis_cache().get(axis_key(a, f, channels), [&] {
    CpuAxis axis{axis_coeffs(a, f), {}};
    axis.horizontal = make_horizontal_taps(axis.coeffs, channels);
    return axis;
  });
}

struct ImageJob {
  const ImageView* view = nullptr;
  ResizePlan plan;
  std::shared_ptr<const CpuAxis> y;
  std::shared_ptr<const CpuAxis> x;
};

// Each thread's buffers, reused across bands.
struct Scratch {
  std::vector<uint8_t> inter;  // horizontal first: the first pass's rows
  std::vector<uint8_t> pass1;  // vertical first: the first pass's row
  std::vector<int32_t> row;    // the horizontal pass's input row, widened, zero padded
  std::vector<uint8_t> line;   // one output row, uint8, before normalization
};

// The normalize table in the output element type.
template <typename OutT>
struct OutputTable {
  OutT v[kOutputChannels][kLevels];
};

template <typename OutT>
OutputTable<OutT> output_table(const NormalizeTable& t) {
  OutputTable<OutT> o;
  for (int c = 0; c < kOutputChannels; ++c) {
    for (int l = 0; l < kLevels; ++l) {
      if constexpr (sizeof(OutT) == sizeof(uint32_t)) {
        std::memcpy(&o.v[c][l], &t.words[c][l], sizeof(OutT));
      } else {
        o.v[c][l] = static_cast<OutT>(t.words[c][l]);
      }
    }
  }
  return o;
}

// Output row y of the 3 planes: fill outside [x0, x0 + count), the resized row `line` inside.
template <typename OutT, int C>
void store_row(const OutputTable<OutT>& t, const uint8_t* line, int32_t x0, int32_t count, int32_t size,
               uint8_t fill, OutT* image, int32_t y) {
  const int64_t plane = int64_t{size} * size;
  for (int c = 0; c < kOutputChannels; ++c) {
    const OutT* lut = t.v[c];
    OutT* dst = image + c * plane + int64_t{y} * size;
    for (int32_t x = 0; x < x0; ++x) dst[x] = lut[fill];
    const uint8_t* src = line + (C == 1 ? 0 : c);
    for (int32_t j = 0; j < count; ++j) dst[x0 + j] = lut[src[j * C]];
    for (int32_t x = x0 + count; x < size; ++x) dst[x] = lut[fill];
  }
}

template <typename OutT>
void store_fill_row(const OutputTable<OutT>& t, int32_t size, uint8_t fill, OutT* image, int32_t y) {
  const int64_t plane = int64_t{size} * size;
  for (int c = 0; c < kOutputChannels; ++c) {
    OutT* dst = image + c * plane + int64_t{y} * size;
    std::fill(dst, dst + size, t.v[c][fill]);
  }
}

template <typename OutT>
void store_line(const OutputTable<OutT>& t, const uint8_t* line, int channels, const AxisPlan& x, int32_t size,
                uint8_t fill, OutT* image, int32_t y) {
  if (channels == 1) {
    store_row<OutT, 1>(t, line, x.pad_before, x.count, size, fill, image, y);
  } else {
    store_row<OutT, 3>(t, line, x.pad_before, x.count, size, fill, image, y);
  }
}

// Output rows [y_begin, y_end) of one image.
template <typename OutT>
void process_band(const ImageJob& job, const PreprocessParams& params, const OutputTable<OutT>& table,
                  int32_t y_begin, int32_t y_end, OutT* image, Scratch& s) {
  const ImageView& v = *job.view;
  const ResizePlan& plan = job.plan;
  const int32_t size = params.size;
  const int C = v.channels;
  const int32_t vy0 = std::max(y_begin, plan.y.pad_before);
  const int32_t vy1 = std::min(y_end, plan.y.pad_before + plan.y.count);
  for (int32_t y = y_begin; y < std::min(vy0, y_end); ++y) store_fill_row(table, size, params.fill, image, y);
  for (int32_t y = std::max(vy1, y_begin); y < y_end; ++y) store_fill_row(table, size, params.fill, image, y);
  if (vy0 >= vy1) return;

  const AxisCoeffs& ty = job.y->coeffs;
  const HorizontalTaps& hx = job.x->horizontal;
  const int32_t j0 = vy0 - plan.y.pad_before;  // first y table entry of the band
  const int32_t j1 = vy1 - plan.y.pad_before;
  const int64_t out_row_bytes = int64_t{hx.count} * C;
  const int64_t src_bytes = int64_t{hx.src_pixels} * C;  // the source columns the outputs read
  const uint8_t* src_cols = v.data + int64_t{hx.src_first} * C;
  s.row.assign(static_cast<size_t>(hx.row_values), 0);  // zero padding past src_bytes, read with weight 0
  s.line.resize(static_cast<size_t>(out_row_bytes));

  if (!plan.vertical_first) {
    // Horizontal pass over the source rows the band's outputs read, into the uint8 intermediate.
    const int32_t line0 = ty.start[j0];
    const int32_t line1 = ty.start[j1 - 1] + ty.taps[j1 - 1];
    s.inter.resize(static_cast<size_t>(int64_t{line1 - line0} * out_row_bytes));
    for (int32_t r = line0; r < line1; ++r) {
      widen_row(src_cols + int64_t{r} * v.row_stride, src_bytes, s.row.data());
      resample_horizontal_row(hx, s.row.data(), s.inter.data() + int64_t{r - line0} * out_row_bytes);
    }
    for (int32_t j = j0; j < j1; ++j) {
      const uint8_t* first = s.inter.data() + int64_t{ty.start[j] - line0} * out_row_bytes;
      resample_vertical_row(first, out_row_bytes, ty.weights.data() + int64_t{j} * ty.ksize, ty.taps[j],
                            out_row_bytes, s.line.data());
      store_line(table, s.line.data(), C, plan.x, size, params.fill, image, plan.y.pad_before + j);
    }
  } else {
    // Vertical pass straight from the source rows, then the horizontal pass of that one row.
    s.pass1.resize(static_cast<size_t>(src_bytes));
    for (int32_t j = j0; j < j1; ++j) {
      const uint8_t* first = src_cols + int64_t{ty.start[j]} * v.row_stride;
      resample_vertical_row(first, v.row_stride, ty.weights.data() + int64_t{j} * ty.ksize, ty.taps[j], src_bytes,
                            s.pass1.data());
      widen_row(s.pass1.data(), src_bytes, s.row.data());
      resample_horizontal_row(hx, s.row.data(), s.line.data());
      store_line(table, s.line.data(), C, plan.x, size, params.fill, image, plan.y.pad_before + j);
    }
  }
}

template <typename OutT>
void run(const ImageView* images, int64_t n, const PreprocessParams& params, const NormalizeTable& normalize,
         OutT* out, ThreadPool& pool) {
  const std::vector<ResizePlan> plans = plan_batch(images, n, params);  // validates, names the bad image
  if (n == 0) return;
  std::vector<ImageJob> jobs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    ImageJob& job = jobs[static_cast<size_t>(i)];
    job.view = &images[i];
    job.plan = plans[static_cast<size_t>(i)];
  }
  const OutputTable<OutT> table = output_table<OutT>(normalize);
  const int32_t size = params.size;
  const int64_t threads = pool.size();
  const int64_t max_bands = std::max<int64_t>(1, size / kMinBandRows);
  const int64_t bands = n >= threads ? 1 : std::min(max_bands, (threads * kTasksPerThread + n - 1) / n);
  const int64_t band_rows = (size + bands - 1) / bands;
  const int64_t image_elems = int64_t{kOutputChannels} * size * size;
  // The tables come from a shared cache; fetching them in the tasks spreads that work too.
  pool.parallel_for(n * bands, [&](int64_t task) {
    thread_local Scratch scratch;
    const int64_t i = task / bands;
    const int64_t band = task % bands;
    const auto y_begin = static_cast<int32_t>(std::min<int64_t>(size, band * band_rows));
    const auto y_end = static_cast<int32_t>(std::min<int64_t>(size, y_begin + band_rows));
    if (y_begin >= y_end) return;
    ImageJob job = jobs[static_cast<size_t>(i)];
    job.y = vertical_axis(job.plan.y, params.interpolation);
    job.x = horizontal_axis(job.plan.x, params.interpolation, job.view->channels);
    process_band(job, params, table, y_begin, y_end, out + i * image_elems, scratch);
  });
}

}  // namespace

void resize_normalize_cpu(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype,
                          void* out, ThreadPool& pool) {
  if (n > 0 && out == nullptr) throw std::invalid_argument("resize_normalize: null output pointer");
  const NormalizeTable normalize = make_normalize_table(params, dtype);
  if (dtype == OutputDType::kFloat16) {
    run(images, n, params, normalize, static_cast<uint16_t*>(out), pool);
  } else {
    run(images, n, params, normalize, static_cast<float*>(out), pool);
  }
}

}  // namespace nvclip
