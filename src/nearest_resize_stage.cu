// CUDA kernel of NearestResizeStage (see nearest_resize_stage.h): one thread per output pixel of one
// image, all three channels. A test stand-in, not a performance path.
#include <cuda_fp16.h>

#include "cuda_util.h"
#include "nearest_resize_stage.h"

namespace nvclip {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kChannelsOut = 3;

template <typename T>
__device__ T to_out(float v);
template <>
__device__ float to_out<float>(float v) { return v; }
template <>
__device__ __half to_out<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void nearest_resize_kernel(const ImageView* images, int32_t size, T* out) {
  const ImageView image = images[blockIdx.y];
  const int64_t plane = static_cast<int64_t>(size) * size;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pixel >= plane) return;
  const int64_t y = pixel / size;
  const int64_t x = pixel % size;
  const int64_t sy = y * image.height / size;
  const int64_t sx = x * image.width / size;
  const uint8_t* src = image.data + sy * image.row_stride + sx * image.channels;
  T* dst = out + static_cast<int64_t>(blockIdx.y) * kChannelsOut * plane + pixel;
  for (int c = 0; c < kChannelsOut; ++c) {
    dst[c * plane] = to_out<T>(src[image.channels == 1 ? 0 : c] * (1.0f / 255.0f));
  }
}

}  // namespace

void nearest_resize_cuda(const ImageView* device_images, int64_t n, int32_t size, OutputDType dtype,
                         void* device_out, void* stream) {
  if (n == 0) return;
  const int64_t plane = static_cast<int64_t>(size) * size;
  const dim3 grid(static_cast<unsigned>((plane + kThreadsPerBlock - 1) / kThreadsPerBlock),
                  static_cast<unsigned>(n));
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == OutputDType::kFloat16) {
    nearest_resize_kernel<<<grid, kThreadsPerBlock, 0, s>>>(device_images, size,
                                                             static_cast<__half*>(device_out));
  } else {
    nearest_resize_kernel<<<grid, kThreadsPerBlock, 0, s>>>(device_images, size,
                                                             static_cast<float*>(device_out));
  }
  NVCLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nvclip
