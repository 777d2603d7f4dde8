// resize_normalize: the whole eval transform for a batch of variable-size images in one launch.
// One block per (image, output tile); the math and the tiling are the host/device functions of
// resize_normalize_tile.h, which resize_normalize_emulate() also runs on the CPU.
#include "resize_normalize_kernel.h"

namespace nvclip {

namespace {

template <int C>
__device__ __forceinline__ void tile_chunks(const TileImage& im, const TileBounds& b, uint8_t* inter,
                                            int32_t (&acc)[kPixelsPerThread][kMaxChannels]) {
  const int tid = static_cast<int>(threadIdx.x);
  // b is the same for the whole block, so every thread runs the same iterations and barriers.
  for (int32_t chunk0 = b.line0; chunk0 < b.line1; chunk0 += kChunkLines) {
    tile_first_pass<C>(im, b, chunk0, tid, inter);
    __syncthreads();
    tile_second_pass<C>(im, b, chunk0, tid, inter, acc);
    __syncthreads();
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kBlockThreads)
    resize_normalize_kernel(const TileImage* __restrict__ images, const uint32_t* __restrict__ table,
                            int32_t size, int32_t per_row, int64_t per_image, uint8_t fill, OutT* __restrict__ out) {
  __shared__ uint32_t table_s[kOutputChannels * kLevels];
  __shared__ uint8_t inter[kInterBytes];
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < kOutputChannels * kLevels; i += kBlockThreads) table_s[i] = table[i];

  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int64_t image = block / per_image;
  const auto tile = static_cast<int32_t>(block % per_image);
  const TileImage im = images[image];
  const TileBounds b = tile_bounds(im, size, tile, per_row);
  int32_t acc[kPixelsPerThread][kMaxChannels];
  tile_init(acc);
  __syncthreads();  // table_s

  if (im.channels == 1) {  // uniform across the block
    tile_chunks<1>(im, b, inter, acc);
  } else {
    tile_chunks<3>(im, b, inter, acc);
  }
  const int64_t image_elems = int64_t{kOutputChannels} * size * size;
  tile_store(im, b, size, tid, acc, table_s, fill, out + image * image_elems);
}

}  // namespace

cudaError_t launch_resize_normalize(const TileImage* images, int64_t n, const uint32_t* table, int32_t size,
                                    uint8_t fill, OutputDType dtype, void* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit
  const int64_t per_image = tiles_per_image(size);
  if (n > kMaxBlocks / per_image) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(n * per_image));
  const dim3 block(kBlockThreads);
  if (dtype == OutputDType::kFloat16) {
    resize_normalize_kernel<uint16_t><<<grid, block, 0, stream>>>(images, table, size, tiles_per_row(size),
                                                                  per_image, fill, static_cast<uint16_t*>(out));
  } else {
    resize_normalize_kernel<float><<<grid, block, 0, stream>>>(images, table, size, tiles_per_row(size),
                                                               per_image, fill, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

}  // namespace nvclip
