// resize_normalize: the whole eval transform for up to kLaunchImages variable-size images in one
// launch. One block per (image, output tile); the math and the tiling are the host/device
// functions of resize_normalize_tile.h, which resize_normalize_emulate() also runs on the CPU.
#include <cuda_runtime_api.h>

#include "resize_normalize_kernel.h"

#if CUDART_VERSION < 12010
#error "resize_normalize passes its descriptors as kernel parameters of up to 32,764 bytes: CUDA 12.1 or later"
#endif

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

// `p` stays in the kernel-parameter space (__grid_constant__): a block reads its own image's
// descriptor from it, without a copy per thread.
template <typename OutT, int MinBlocksPerSm>
__global__ void __launch_bounds__(kBlockThreads, MinBlocksPerSm)
    resize_normalize_kernel(const __grid_constant__ LaunchParams p) {
  constexpr OutputDType kDType = sizeof(OutT) == 2 ? OutputDType::kFloat16 : OutputDType::kFloat32;
  __shared__ uint32_t table_s[kOutputChannels * kLevels];
  __shared__ uint8_t inter[kInterBytes];
  const int tid = static_cast<int>(threadIdx.x);
  tile_normalize_table(p.h.normalize, kDType, tid, table_s);

  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int64_t image = block / p.h.per_image;
  const auto tile = static_cast<int32_t>(block % p.h.per_image);
  const TileImage im = p.images[image];
  const TileBounds b = tile_bounds(im, p.h.size, tile, p.h.per_row);
  int32_t acc[kPixelsPerThread][kMaxChannels];
  tile_init(acc);
  __syncthreads();  // table_s

  if (im.channels == 1) {  // uniform across the block
    tile_chunks<1>(im, b, inter, acc);
  } else {
    tile_chunks<3>(im, b, inter, acc);
  }
  const int64_t image_elems = int64_t{kOutputChannels} * p.h.size * p.h.size;
  tile_store(im, b, p.h.size, tid, acc, table_s, p.h.fill, static_cast<OutT*>(p.h.out) + image * image_elems);
}

template <int MinBlocksPerSm>
void launch(const LaunchParams& p, OutputDType dtype, const dim3& grid, cudaStream_t stream) {
  if (dtype == OutputDType::kFloat16) {
    resize_normalize_kernel<uint16_t, MinBlocksPerSm><<<grid, kBlockThreads, 0, stream>>>(p);
  } else {
    resize_normalize_kernel<float, MinBlocksPerSm><<<grid, kBlockThreads, 0, stream>>>(p);
  }
}

}  // namespace

cudaError_t launch_resize_normalize(const LaunchParams& p, OutputDType dtype, int min_blocks_per_sm,
                                    cudaStream_t stream) {
  if (p.h.count <= 0) return cudaSuccess;
  constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit
  if (p.h.count > kLaunchImages || p.h.count > kMaxBlocks / p.h.per_image) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.h.count * p.h.per_image));
  static_assert(kMinBlocksVariants[0] == 1 && kMinBlocksVariants[1] == 3, "one launch<> per variant");
  switch (min_blocks_per_sm) {
    case 1: launch<1>(p, dtype, grid, stream); break;
    case 3: launch<3>(p, dtype, grid, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace nvclip
