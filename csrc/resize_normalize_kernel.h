// The CUDA kernel's host side: descriptors and axis tables in the layout the kernel reads, the
// launch parameters, the launch, and the kernel run on the CPU for tests (resize_normalize_emulate).
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

// The kernel's parameters for one launch, passed by value (__grid_constant__): the descriptors and
// the normalize parameters travel with the launch itself, so no small upload waits behind image
// copies queued on the same copy engine, and nothing is left in device memory to grow or free.
// CUDA 12.1 raised the limit on kernel parameters from 4 KB to 32,764 bytes (Volta and later).
constexpr int64_t kMaxKernelParamBytes = 32764;

struct LaunchHeader {
  NormalizeParams normalize;
  void* out = nullptr;     // the first image's 3 x size x size block of the launch's output
  int64_t per_image = 0;   // tiles per image (blocks per image)
  int32_t size = 0;
  int32_t per_row = 0;     // tiles per output row
  int32_t count = 0;       // images in this launch
  uint8_t fill = 0;
};

// The images one launch takes: as many descriptors as fit beside the header.
constexpr int64_t kLaunchImages =
    (kMaxKernelParamBytes - static_cast<int64_t>(sizeof(LaunchHeader))) / static_cast<int64_t>(sizeof(TileImage));

struct LaunchParams {
  LaunchHeader h;
  TileImage images[kLaunchImages];
};
static_assert(sizeof(LaunchParams) <= kMaxKernelParamBytes, "kernel parameters over CUDA's 32,764-byte limit");

// The launches a batch of n images takes.
constexpr int64_t launch_count(int64_t n) { return (n + kLaunchImages - 1) / kLaunchImages; }

// Thread blocks per SM the kernel is compiled for (__launch_bounds__'s second argument): 1 lets
// the compiler use up to 255 registers (88 for sm_75..sm_90 with nvcc 13: 2 blocks of 256 threads
// per SM), 3 caps them at 80 (76-78 used, no spills: 3 blocks per SM). Both variants are built
// (kDefaultMinBlocksPerSm, resize_normalize.h, picks one); gpu_check.sh measures them side by side.
constexpr int kMinBlocksVariants[] = {1, 3};

// The kernel's code run on the CPU for one launch: every block, and in it every thread, one after
// the other, with the same functions and barriers in the same places. `p.images` point to host
// memory, `p.h.out` too.
void resize_normalize_emulate(const LaunchParams& p, OutputDType dtype);

// The host half of ResizeNormalizeCuda, free of CUDA calls so that the tests run it too: keeps the
// book of the coefficient tables already uploaded to the device's table arena, stages the new
// ones, and fills each launch's parameters exactly as the kernel will read them.
//
// Per batch: plan() validates the batch and decides the layout; the caller makes sure the staging
// buffer (table_bytes) and the arena (arena_bytes) are large enough (and, when plan() says the
// arena was recycled or must grow, that no earlier kernel still reads it); write() fills the
// staging buffer with the new tables; the caller copies them to arena + table_offset, then fills
// and launches each of launch_count(n) launches (fill_launch). If anything fails between plan() and
// the copy, call forget() so that no later batch trusts tables that never arrived.
class KernelBatchPacker {
 public:
  struct Layout {
    int64_t n = 0;
    int64_t table_bytes = 0;     // new tables, staged at [0, table_bytes)
    int64_t table_offset = 0;    // where those tables go in the arena
    int64_t arena_bytes = 0;     // the arena size this batch needs (only ever grows)
    bool arena_recycled = false; // earlier batches' tables were dropped to make room
  };

  explicit KernelBatchPacker(int64_t arena_bytes);

  Layout plan(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype);
  // Writes the new tables to `staging` (unused when table_bytes is 0); the descriptors then point
  // into the arena at `arena_device`.
  void write(uint8_t* staging, const uint8_t* arena_device);
  // The parameters of launch `k` (0 <= k < launch_count(n)) of the batch written to `out` (n x 3 x
  // size x size elements of the planned dtype).
  void fill_launch(int64_t k, void* out, LaunchParams* p) const;
  void forget();

  const Layout& layout() const { return layout_; }
  OutputDType dtype() const { return dtype_; }
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
  PreprocessParams params_;
  OutputDType dtype_ = OutputDType::kFloat32;
  std::vector<TileImage> images_;  // descriptors; their table views are set by write()
  std::vector<ResizePlan> plans_;
  std::vector<Slot> slots_;  // per image: y table, x table
  std::vector<std::pair<std::shared_ptr<const AxisCoeffs>, int64_t>> new_tables_;  // coefficients, arena offset
};

// ResizeNormalizeCuda's logic with host memory standing in for the device (tests): the same
// packer, memcpy for the copy, resize_normalize_emulate for each launch.
class ResizeNormalizeEmulated {
 public:
  explicit ResizeNormalizeEmulated(int64_t arena_bytes);
  void enqueue(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype, void* out);
  const KernelBatchPacker& packer() const { return packer_; }

 private:
  KernelBatchPacker packer_;
  std::vector<uint8_t> staging_;
  std::vector<uint8_t> arena_;  // the "device" arena
  std::unique_ptr<LaunchParams> launch_;
};

#if NVCLIP_WITH_CUDA
// One launch: blocks for p.h.count images (their tables in device memory, p.h.out too), compiled for
// `min_blocks_per_sm` (one of kMinBlocksVariants). Returns the launch status (cudaGetLastError
// after the launch; cudaErrorInvalidValue for another variant).
cudaError_t launch_resize_normalize(const LaunchParams& p, OutputDType dtype, int min_blocks_per_sm,
                                    cudaStream_t stream);
#endif

}  // namespace nvclip
