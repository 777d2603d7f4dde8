// The CUDA kernel's host side: descriptors and axis tables in the layout the kernel reads, the
// launch, and the kernel run on the CPU for tests (resize_normalize_emulate).
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "axis_tables.h"
#include "normalize.h"

#include "image.h"
#include "resample.h"
#include "resize_normalize.h"
#include "resize_normalize_tile.h"
#include "resize_plan.h"

#if NVCLIP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace nvclip {

// An axis table in memory: int32 start[count], taps[count], weights[count * ksize], the whole
// rounded up to kTableAlignment bytes so tables can be packed back to back.
constexpr int64_t kTableAlignment = 16;

int64_t axis_table_bytes(const AxisCoeffs& coeffs);

// Writes `coeffs` to `dst` (host memory, axis_table_bytes long).
void write_axis_table(const AxisCoeffs& coeffs, void* dst);

// The view of a table of `count` outputs and `ksize` weights each that lives at address `where`
// (device memory, or host memory when emulated).
AxisTableView axis_table_view(const void* where, int32_t count, int32_t ksize);

TileImage make_tile_image(const ImageView& view, const ResizePlan& plan, const AxisTableView& y,
                          const AxisTableView& x);

// Output tiles per row of an S x S image, and per image.
constexpr int32_t tiles_per_row(int32_t size) { return (size + kTile - 1) / kTile; }
constexpr int64_t tiles_per_image(int32_t size) { return int64_t{tiles_per_row(size)} * tiles_per_row(size); }

// Validates a batch (params, then every image: pointer, channels 1 or 3, sizes, strides) and plans
// it. Throws std::invalid_argument naming the first bad image ("images[3]: ...").
std::vector<ResizePlan> plan_batch(const ImageView* images, int64_t n, const PreprocessParams& params);

// The kernel's code run on the CPU: every block, and in it every thread, one after the other,
// with the same functions and barriers in the same places. `images` and `out` in host memory.
void resize_normalize_emulate(const TileImage* images, int64_t n, const NormalizeTable& table, int32_t size,
                              uint8_t fill, OutputDType dtype, void* out);

// The host half of ResizeNormalizeCuda, free of CUDA calls so that the tests run it too: lays a
// batch out in staging memory exactly as the kernel will read it, and keeps the book of the
// coefficient tables already uploaded to the device's table arena.
//
// Per batch: plan() validates the batch and decides the layout; the caller makes sure the staging
// buffer and the device buffers are large enough (and, when plan() says the arena was recycled or
// must grow, that no earlier kernel still reads it); write() fills the staging buffer; the caller
// copies staging [0, header_bytes) to the device header buffer and [header_bytes, header_bytes +
// table_bytes) to arena + table_offset, then launches. If anything fails between plan() and the
// copies, call forget() so that no later batch trusts tables that never arrived.
class KernelBatchPacker {
 public:
  // Header layout: the normalize table, then the n descriptors.
  static constexpr int64_t kNormalizeTableOffset = 0;
  static constexpr int64_t kDescriptorOffset =
      (static_cast<int64_t>(sizeof(NormalizeTable)) + kTableAlignment - 1) / kTableAlignment * kTableAlignment;

  struct Layout {
    int64_t n = 0;
    int64_t header_bytes = 0;    // staged at [0, header_bytes)
    int64_t table_bytes = 0;     // staged right after the header
    int64_t table_offset = 0;    // where those tables go in the arena
    int64_t arena_bytes = 0;     // the arena size this batch needs (only ever grows)
    bool arena_recycled = false; // earlier batches' tables were dropped to make room
  };

  explicit KernelBatchPacker(int64_t arena_bytes);

  Layout plan(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype);
  // Writes header + new tables to `staging`; the descriptors point into the arena at `arena_device`.
  void write(uint8_t* staging, const uint8_t* arena_device) const;
  void forget();

  const Layout& layout() const { return layout_; }
  int64_t cached_tables() const { return static_cast<int64_t>(arena_slots_.size()); }

 private:
  // A table in the arena (or bound for it with this batch's copy).
  struct Slot {
    int64_t offset = 0;
    int32_t count = 0;
    int32_t ksize = 0;
  };

  Slot place(const AxisPlan& axis, Interpolation interpolation);
  void place_batch(Interpolation interpolation);

  int64_t arena_bytes_;
  int64_t arena_used_ = 0;
  std::unordered_map<AxisKey, Slot, AxisKeyHash> arena_slots_;
  // The batch being packed.
  Layout layout_;
  std::vector<TileImage> images_;  // descriptors without their table views yet
  std::vector<ResizePlan> plans_;
  std::vector<Slot> slots_;  // per image: y table, x table
  std::vector<std::pair<std::shared_ptr<const AxisCoeffs>, int64_t>> new_tables_;  // coefficients, arena offset
  NormalizeTable normalize_table_{};
};

// ResizeNormalizeCuda's logic with host memory standing in for the device (tests): the same
// packer, memcpy for the copies, resize_normalize_emulate for the launch.
class ResizeNormalizeEmulated {
 public:
  explicit ResizeNormalizeEmulated(int64_t arena_bytes);
  void enqueue(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype, void* out);
  const KernelBatchPacker& packer() const { return packer_; }

 private:
  KernelBatchPacker packer_;
  std::vector<uint8_t> staging_;
  std::vector<uint8_t> header_;  // the "device" buffers
  std::vector<uint8_t> arena_;
};

#if NVCLIP_WITH_CUDA
// One launch for the batch: `images` (n descriptors), `table` (NormalizeTable) and `out`
// (n x 3 x size x size elements of `dtype`) in device memory; the tables the descriptors point to
// too. Returns the launch status (cudaGetLastError after the launch).
cudaError_t launch_resize_normalize(const TileImage* images, int64_t n, const uint32_t* table, int32_t size,
                                    uint8_t fill, OutputDType dtype, void* out, cudaStream_t stream);
#endif

}  // namespace nvclip
