// The CUDA kernel resize_normalize, written as host/device functions: one thread block computes a
// kTile x kTile tile of one image's S x S output, both of Pillow's passes, the fused center crop or
// pad, and the normalize + HWC -> CHW store. The __global__ function (resize_normalize.cu) only
// sequences these calls with __syncthreads(); resize_normalize_emulate() runs the very same calls
// on the CPU, thread by thread, so the tests exercise every line of the kernel's logic.
//
// Per tile, for the pass Pillow runs first (A) and the other one (B):
//   * the tile's outputs read a contiguous range of source "lines" along B (rows when the
//     horizontal pass is first, columns when the vertical one is), [line0, line1);
//   * those lines are processed kChunkLines at a time: pass A writes the uint8 intermediate of the
//     chunk's lines at the tile's outputs into shared memory (Pillow's uint8 image between the
//     passes, restricted to what the tile needs), then every output pixel adds the chunk's lines
//     that fall in its own B window to its int32 accumulators;
//   * after the last chunk each pixel is clipped to uint8, looked up in the normalize table (built
//     by the block itself, tile_normalize_table) and written to the three planes. Outputs outside
//     the image's part of the tile get `fill`.
// Only outputs that survive the crop are computed, and only the source lines they read.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"
#include "normalize.h"
#include "resample.h"

namespace nvclip {

constexpr int kTile = 32;  // output tile edge
constexpr int kBlockThreads = 256;
constexpr int kPixelsPerThread = kTile * kTile / kBlockThreads;
constexpr int kChunkLines = 32;  // source lines per shared-memory chunk
constexpr int kMaxChannels = 3;
constexpr int kInterBytes = kChunkLines * kTile * kMaxChannels;
static_assert(kTile * kTile % kBlockThreads == 0, "whole pixels per thread");
static_assert(kBlockThreads % kTile == 0, "a warp-aligned row of the tile per kTile threads");

// One axis table where the kernel can read it (device memory, or host memory when emulated).
struct AxisTableView {
  const int32_t* start = nullptr;    // [count]
  const int32_t* taps = nullptr;     // [count]
  const int32_t* weights = nullptr;  // [count * ksize]
  int32_t ksize = 0;
  int32_t count = 0;
};

// Everything the kernel needs about one image.
struct TileImage {
  const uint8_t* src = nullptr;  // HWC uint8, `channels` interleaved, rows `row_stride` bytes apart
  int64_t row_stride = 0;
  int32_t channels = 3;
  int32_t vertical_first = 0;
  int32_t pad_y = 0;  // output row of table entry 0 of `y`
  int32_t pad_x = 0;  // output column of table entry 0 of `x`
  AxisTableView y;
  AxisTableView x;
};

struct TileBounds {
  int32_t y0 = 0, x0 = 0;            // tile origin in the output
  int32_t vy0 = 0, vy1 = 0;          // output rows of the tile covered by the image
  int32_t vx0 = 0, vx1 = 0;          // output columns of the tile covered by the image
  int32_t line0 = 0, line1 = 0;      // source lines the tile reads (empty when nothing to resample)
};

NVCLIP_HD int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
NVCLIP_HD int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

NVCLIP_HD TileBounds tile_bounds(const TileImage& im, int32_t size, int32_t tile, int32_t tiles_per_row) {
  TileBounds b;
  b.y0 = (tile / tiles_per_row) * kTile;
  b.x0 = (tile % tiles_per_row) * kTile;
  b.vy0 = max_i32(b.y0, im.pad_y);
  b.vy1 = min_i32(min_i32(b.y0 + kTile, size), im.pad_y + im.y.count);
  b.vx0 = max_i32(b.x0, im.pad_x);
  b.vx1 = min_i32(min_i32(b.x0 + kTile, size), im.pad_x + im.x.count);
  if (b.vy0 >= b.vy1 || b.vx0 >= b.vx1) {
    b.line0 = b.line1 = 0;
    return b;
  }
  // Windows move monotonically with the output index (AxisCoeffs), so the first and the last
  // output of the tile bound the lines it reads.
  // Selected by value, not by reference: a reference would put `im` in local memory on the GPU.
  const AxisTableView second = im.vertical_first ? im.x : im.y;
  const int32_t first_out = im.vertical_first ? b.vx0 - im.pad_x : b.vy0 - im.pad_y;
  const int32_t last_out = im.vertical_first ? b.vx1 - 1 - im.pad_x : b.vy1 - 1 - im.pad_y;
  b.line0 = second.start[first_out];
  b.line1 = second.start[last_out] + second.taps[last_out];
  return b;
}

// What the normalize step needs: each block builds its NormalizeTable from these.
struct NormalizeParams {
  float mean[kOutputChannels];
  float std[kOutputChannels];
};

// Thread `tid`'s share of the block's normalize table ([3][256] words, as NormalizeTable).
NVCLIP_HD void tile_normalize_table(const NormalizeParams& n, OutputDType dtype, int tid, uint32_t* table) {
  for (int i = tid; i < kOutputChannels * kLevels; i += kBlockThreads) {
    const int c = i / kLevels;
    table[i] = normalize_word(static_cast<uint8_t>(i % kLevels), n.mean[c], n.std[c], dtype);
  }
}

NVCLIP_HD void tile_init(int32_t (&acc)[kPixelsPerThread][kMaxChannels]) {
  for (int k = 0; k < kPixelsPerThread; ++k) {
    for (int c = 0; c < kMaxChannels; ++c) acc[k][c] = kRoundingBias;
  }
}

// Pass A for the chunk of source lines [chunk0, chunk0 + kChunkLines): thread `tid`'s share of the
// uint8 intermediate. Horizontal first: inter[line][output column]; vertical first:
// inter[output row][line] (consecutive threads take consecutive source columns: coalesced reads).
template <int C>
NVCLIP_HD void tile_first_pass(const TileImage& im, const TileBounds& b, int32_t chunk0, int tid, uint8_t* inter) {
  constexpr int kItems = kChunkLines * kTile;
  NVCLIP_NO_UNROLL
  for (int item = tid; item < kItems; item += kBlockThreads) {
    int32_t acc[C];
    for (int c = 0; c < C; ++c) acc[c] = kRoundingBias;
    uint8_t* dst;
    if (!im.vertical_first) {
      const int line = item / kTile;
      const int a = item % kTile;
      const int32_t row = chunk0 + line;
      const int32_t x = b.x0 + a;
      if (row >= b.line1 || x < b.vx0 || x >= b.vx1) continue;
      const int32_t j = x - im.pad_x;
      const uint8_t* p = im.src + row * im.row_stride + static_cast<int64_t>(im.x.start[j]) * C;
      accumulate_taps<C>(p, C, im.x.weights + static_cast<int64_t>(j) * im.x.ksize, im.x.taps[j], acc);
      dst = inter + (line * kTile + a) * kMaxChannels;
    } else {
      const int line = item % kChunkLines;
      const int a = item / kChunkLines;
      const int32_t col = chunk0 + line;
      const int32_t y = b.y0 + a;
      if (col >= b.line1 || y < b.vy0 || y >= b.vy1) continue;
      const int32_t j = y - im.pad_y;
      const uint8_t* p = im.src + im.y.start[j] * im.row_stride + static_cast<int64_t>(col) * C;
      accumulate_taps<C>(p, im.row_stride, im.y.weights + static_cast<int64_t>(j) * im.y.ksize, im.y.taps[j], acc);
      dst = inter + (a * kChunkLines + line) * kMaxChannels;
    }
    for (int c = 0; c < C; ++c) dst[c] = clip8(acc[c]);
  }
}

// Pass B for the same chunk: each of thread `tid`'s pixels adds the chunk's lines inside its window.
template <int C>
NVCLIP_HD void tile_second_pass(const TileImage& im, const TileBounds& b, int32_t chunk0, int tid,
                                const uint8_t* inter, int32_t (&acc)[kPixelsPerThread][kMaxChannels]) {
  const int32_t chunk1 = min_i32(chunk0 + kChunkLines, b.line1);
  for (int k = 0; k < kPixelsPerThread; ++k) {
    const int p = tid + k * kBlockThreads;
    const int ly = p / kTile;
    const int lx = p % kTile;
    const int32_t y = b.y0 + ly;
    const int32_t x = b.x0 + lx;
    if (y < b.vy0 || y >= b.vy1 || x < b.vx0 || x >= b.vx1) continue;
    const AxisTableView axis = im.vertical_first ? im.x : im.y;
    const int32_t j = im.vertical_first ? x - im.pad_x : y - im.pad_y;
    const int32_t s = axis.start[j];
    const int32_t lo = max_i32(s, chunk0);
    const int32_t hi = min_i32(s + axis.taps[j], chunk1);
    if (lo >= hi) continue;
    const int32_t* w = axis.weights + static_cast<int64_t>(j) * axis.ksize + (lo - s);
    if (!im.vertical_first) {
      accumulate_taps<C>(inter + ((lo - chunk0) * kTile + lx) * kMaxChannels, kTile * kMaxChannels, w, hi - lo,
                         acc[k]);
    } else {
      accumulate_taps<C>(inter + (ly * kChunkLines + (lo - chunk0)) * kMaxChannels, kMaxChannels, w, hi - lo,
                         acc[k]);
    }
  }
}

NVCLIP_HD void store_word(float* p, uint32_t word) {
#if defined(__CUDA_ARCH__)
  *p = __uint_as_float(word);
#else
  std::memcpy(p, &word, sizeof word);
#endif
}

NVCLIP_HD void store_word(uint16_t* p, uint32_t word) { *p = static_cast<uint16_t>(word); }

// Thread `tid`'s pixels of the tile, clipped, normalized through `table` ([3][256] words, see
// NormalizeTable) and written to the 3 planes of `out` (this image's 3 x size x size block).
// Gray images are replicated to RGB after the resize, as PIL's convert("RGB") does.
template <typename OutT>
NVCLIP_HD void tile_store(const TileImage& im, const TileBounds& b, int32_t size, int tid,
                          const int32_t (&acc)[kPixelsPerThread][kMaxChannels], const uint32_t* table,
                          uint8_t fill, OutT* out) {
  const int64_t plane = static_cast<int64_t>(size) * size;
  for (int k = 0; k < kPixelsPerThread; ++k) {
    const int p = tid + k * kBlockThreads;
    const int32_t y = b.y0 + p / kTile;
    const int32_t x = b.x0 + p % kTile;
    if (y >= size || x >= size) continue;
    const bool inside = y >= b.vy0 && y < b.vy1 && x >= b.vx0 && x < b.vx1;
    const bool gray = im.channels == 1;
    // Constant indices only (a computed one would move acc to local memory on the GPU).
    uint8_t v[kMaxChannels] = {fill, fill, fill};
    if (inside) {
      v[0] = clip8(acc[k][0]);
      v[1] = gray ? v[0] : clip8(acc[k][1]);
      v[2] = gray ? v[0] : clip8(acc[k][2]);
    }
    const int64_t offset = static_cast<int64_t>(y) * size + x;
    for (int c = 0; c < kMaxChannels; ++c) store_word(out + c * plane + offset, table[c * kLevels + v[c]]);
  }
}

}  // namespace nvclip
