#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "axis_tables.h"
#include "normalize.h"
#include "resize_normalize.h"
#include "resize_normalize_kernel.h"

namespace nvclip {

namespace {

constexpr size_t kCoeffCacheEntries = 512;

constexpr int64_t round_up(int64_t bytes, int64_t alignment) { return (bytes + alignment - 1) / alignment * alignment; }

std::string image_prefix(int64_t i) { return "images[" + std::to_string(i) + "]: "; }

void check_view(const ImageView& v, int64_t i) {
  if (v.channels != 1 && v.channels != 3) {
    throw std::invalid_argument(image_prefix(i) + "expected 1 (gray) or 3 (RGB) channels, got " +
                                std::to_string(v.channels));
  }
  if (v.height < 1 || v.width < 1) {
    throw std::invalid_argument(image_prefix(i) + "image is empty (" + std::to_string(v.height) + "x" +
                                std::to_string(v.width) + ")");
  }
  if (v.data == nullptr) throw std::invalid_argument(image_prefix(i) + "null pixel pointer");
  const int64_t row_bytes = int64_t{v.width} * v.channels;
  if (v.row_stride < row_bytes) {
    throw std::invalid_argument(image_prefix(i) + "row stride " + std::to_string(v.row_stride) +
                                " is smaller than a row (" + std::to_string(row_bytes) + " bytes)");
  }
}

AxisCache<AxisCoeffs>& kernel_coeff_cache() {
  static AxisCache<AxisCoeffs> cache(kCoeffCacheEntries);
  return cache;
}

template <typename OutT>
void emulate(const LaunchParams& p, OutputDType dtype) {
  const LaunchHeader& h = p.h;
  const int64_t image_elems = int64_t{kOutputChannels} * h.size * h.size;
  auto* out = static_cast<OutT*>(h.out);
  // The block's shared memory: the normalize table and the intermediate.
  std::vector<uint32_t> table(kOutputChannels * kLevels);
  std::vector<uint8_t> inter(kInterBytes);
  using Acc = int32_t[kPixelsPerThread][kMaxChannels];
  std::vector<Acc> acc(kBlockThreads);  // each thread's registers
  for (int64_t block = 0; block < h.count * h.per_image; ++block) {
    const int64_t image = block / h.per_image;
    const auto tile = static_cast<int32_t>(block % h.per_image);
    // Poisoned: an entry this block's threads did not build shows.
    std::fill(table.begin(), table.end(), 0xA5A5A5A5u);
    for (int tid = 0; tid < kBlockThreads; ++tid) tile_normalize_table(h.normalize, dtype, tid, table.data());
    const TileImage& im = p.images[image];
    const TileBounds b = tile_bounds(im, h.size, tile, h.per_row);
    for (int tid = 0; tid < kBlockThreads; ++tid) tile_init(acc[tid]);
    // __syncthreads()
    for (int32_t chunk0 = b.line0; chunk0 < b.line1; chunk0 += kChunkLines) {
      // Poison the shared memory: a byte read that this chunk's first pass did not write shows.
      std::memset(inter.data(), 0xA5, inter.size());
      for (int tid = 0; tid < kBlockThreads; ++tid) {
        if (im.channels == 1) {
          tile_first_pass<1>(im, b, chunk0, tid, inter.data());
        } else {
          tile_first_pass<3>(im, b, chunk0, tid, inter.data());
        }
      }
      // __syncthreads()
      for (int tid = 0; tid < kBlockThreads; ++tid) {
        if (im.channels == 1) {
          tile_second_pass<1>(im, b, chunk0, tid, inter.data(), acc[tid]);
        } else {
          tile_second_pass<3>(im, b, chunk0, tid, inter.data(), acc[tid]);
        }
      }
      // __syncthreads()
    }
    for (int tid = 0; tid < kBlockThreads; ++tid) {
      tile_store(im, b, h.size, tid, acc[tid], table.data(), h.fill, out + image * image_elems);
    }
  }
}

}  // namespace

int64_t axis_table_bytes(const AxisCoeffs& c) {
  const int64_t words = 2 * int64_t{c.count} + int64_t{c.count} * c.ksize;
  return round_up(words * static_cast<int64_t>(sizeof(int32_t)), kTableAlignment);
}

void write_axis_table(const AxisCoeffs& c, void* dst) {
  auto* d = static_cast<int32_t*>(dst);
  const auto count = static_cast<size_t>(c.count);
  std::memcpy(d, c.start.data(), count * sizeof(int32_t));
  std::memcpy(d + count, c.taps.data(), count * sizeof(int32_t));
  std::memcpy(d + 2 * count, c.weights.data(), c.weights.size() * sizeof(int32_t));
}

AxisTableView axis_table_view(const void* where, int32_t count, int32_t ksize) {
  const auto* w = static_cast<const int32_t*>(where);
  AxisTableView v;
  v.start = w;
  v.taps = w + count;
  v.weights = w + 2 * int64_t{count};
  v.ksize = ksize;
  v.count = count;
  return v;
}

TileImage make_tile_image(const ImageView& view, const ResizePlan& plan, const AxisTableView& y,
                          const AxisTableView& x) {
  TileImage im;
  im.src = view.data;
  im.row_stride = view.row_stride;
  im.channels = view.channels;
  im.vertical_first = plan.vertical_first ? 1 : 0;
  im.pad_y = plan.y.pad_before;
  im.pad_x = plan.x.pad_before;
  im.y = y;
  im.x = x;
  return im;
}

std::vector<ResizePlan> plan_batch(const ImageView* images, int64_t n, const PreprocessParams& params) {
  if (n < 0) throw std::invalid_argument("negative image count " + std::to_string(n));
  if (n > 0 && images == nullptr) throw std::invalid_argument("null image array");
  const std::string bad = check_params(params);
  if (!bad.empty()) throw std::invalid_argument("preprocess parameters: " + bad);
  std::vector<ResizePlan> plans;
  plans.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    check_view(images[i], i);
    try {
      plans.push_back(plan_resize(images[i].height, images[i].width, params));
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(image_prefix(i) + e.what());
    }
  }
  return plans;
}

void resize_normalize_emulate(const LaunchParams& p, OutputDType dtype) {
  if (dtype == OutputDType::kFloat16) {
    emulate<uint16_t>(p, dtype);
  } else {
    emulate<float>(p, dtype);
  }
}

// ---- KernelBatchPacker ----------------------------------------------------------------------

KernelBatchPacker::KernelBatchPacker(int64_t arena_bytes) : arena_bytes_(arena_bytes) {}

void KernelBatchPacker::forget() {
  arena_slots_.clear();
  arena_used_ = 0;
  new_tables_.clear();
}

KernelBatchPacker::Slot KernelBatchPacker::place(const AxisPlan& axis, Interpolation interpolation) {
  const AxisKey key = axis_key(axis, interpolation);
  auto it = arena_slots_.find(key);
  if (it != arena_slots_.end()) return it->second;
  auto coeffs = kernel_coeff_cache().get(key, [&] { return axis_coeffs(axis, interpolation); });
  const Slot slot{arena_used_, coeffs->count, coeffs->ksize};
  arena_used_ += axis_table_bytes(*coeffs);
  arena_slots_.emplace(key, slot);
  new_tables_.emplace_back(std::move(coeffs), slot.offset);
  return slot;
}

void KernelBatchPacker::place_batch(Interpolation interpolation) {
  new_tables_.clear();
  slots_.clear();
  for (const ResizePlan& p : plans_) {
    slots_.push_back(place(p.y, interpolation));
    slots_.push_back(place(p.x, interpolation));
  }
}

KernelBatchPacker::Layout KernelBatchPacker::plan(const ImageView* images, int64_t n, const PreprocessParams& params,
                                                  OutputDType dtype) {
  plans_ = plan_batch(images, n, params);  // throws before any state changes
  images_.clear();
  for (int64_t i = 0; i < n; ++i) {
    images_.push_back(make_tile_image(images[i], plans_[static_cast<size_t>(i)], {}, {}));
  }
  params_ = params;
  dtype_ = dtype;
  layout_ = Layout{};
  layout_.n = n;
  const int64_t used_before = arena_used_;
  place_batch(params.interpolation);
  layout_.table_offset = used_before;
  if (arena_used_ > arena_bytes_) {
    // Start the arena over with this batch's tables only; grow it if they alone do not fit.
    layout_.arena_recycled = used_before > 0;
    forget();
    place_batch(params.interpolation);
    layout_.table_offset = 0;
    arena_bytes_ = std::max(arena_bytes_, arena_used_);
  }
  layout_.table_bytes = arena_used_ - layout_.table_offset;
  layout_.arena_bytes = arena_bytes_;
  return layout_;
}

void KernelBatchPacker::write(uint8_t* staging, const uint8_t* arena_device) {
  for (size_t i = 0; i < images_.size(); ++i) {
    const Slot& y = slots_[2 * i];
    const Slot& x = slots_[2 * i + 1];
    images_[i].y = axis_table_view(arena_device + y.offset, y.count, y.ksize);
    images_[i].x = axis_table_view(arena_device + x.offset, x.count, x.ksize);
  }
  for (const auto& [coeffs, offset] : new_tables_) write_axis_table(*coeffs, staging + (offset - layout_.table_offset));
}

void KernelBatchPacker::fill_launch(int64_t k, void* out, LaunchParams* p) const {
  const int64_t first = k * kLaunchImages;
  const int64_t count = std::min<int64_t>(kLaunchImages, layout_.n - first);
  if (k < 0 || count <= 0) {
    throw std::out_of_range("launch " + std::to_string(k) + " of a batch of " + std::to_string(layout_.n));
  }
  LaunchHeader& h = p->h;
  for (int c = 0; c < kOutputChannels; ++c) {
    h.normalize.mean[c] = params_.mean[c];
    h.normalize.std[c] = params_.std[c];
  }
  const int64_t image_bytes = int64_t{kOutputChannels} * params_.size * params_.size * output_element_bytes(dtype_);
  h.out = static_cast<uint8_t*>(out) + first * image_bytes;
  h.per_image = tiles_per_image(params_.size);
  h.size = params_.size;
  h.per_row = tiles_per_row(params_.size);
  h.count = static_cast<int32_t>(count);
  h.fill = params_.fill;
  std::copy_n(images_.begin() + first, count, p->images);
}

// ---- ResizeNormalizeEmulated -----------------------------------------------------------------

ResizeNormalizeEmulated::ResizeNormalizeEmulated(int64_t arena_bytes)
    : packer_(arena_bytes), launch_(std::make_unique<LaunchParams>()) {}

void ResizeNormalizeEmulated::enqueue(const ImageView* images, int64_t n, const PreprocessParams& params,
                                      OutputDType dtype, void* out) {
  if (n == 0) {
    plan_batch(images, n, params);  // still validates the parameters
    return;
  }
  const KernelBatchPacker::Layout layout = packer_.plan(images, n, params, dtype);
  // Stand-ins for the device buffers; a reallocation here is where the CUDA path waits for the
  // previous kernel.
  staging_.resize(static_cast<size_t>(std::max<int64_t>(layout.table_bytes, static_cast<int64_t>(staging_.size()))));
  arena_.resize(static_cast<size_t>(std::max<int64_t>(layout.arena_bytes, static_cast<int64_t>(arena_.size()))));
  packer_.write(staging_.data(), arena_.data());
  if (layout.table_bytes > 0) {
    std::memcpy(arena_.data() + layout.table_offset, staging_.data(), static_cast<size_t>(layout.table_bytes));
  }
  for (int64_t k = 0; k < launch_count(n); ++k) {
    packer_.fill_launch(k, out, launch_.get());
    resize_normalize_emulate(*launch_, dtype);
  }
}

}  // namespace nvclip
