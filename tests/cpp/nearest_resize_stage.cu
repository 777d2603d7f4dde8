// NearestResizeStage's CUDA half: the slot's device copy of the batch's views, and a kernel with
// one thread per output pixel of one image, all three channels. A test stand-in, not a performance
// path.
#include <cuda_fp16.h>

#include "cuda_util.h"
#include "host_memory.h"
#include "nearest_resize_stage.h"

using nvclip::ImageView;

namespace nvtest {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kChannelsOut = 3;

// The views of a batch in device memory, grown as batches grow.
struct DeviceViews final : nvclip::PreprocessSlotState {
  nvclip::DeviceBuffer views;
};

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

std::unique_ptr<nvclip::PreprocessSlotState> nearest_resize_cuda_slot() { return std::make_unique<DeviceViews>(); }

void nearest_resize_cuda(const nvclip::PreprocessBatch& batch, int32_t size) {
  if (batch.n == 0) return;
  auto& slot = dynamic_cast<DeviceViews&>(*batch.state);
  const size_t bytes = static_cast<size_t>(batch.n) * sizeof(ImageView);
  if (slot.views.size() < bytes) slot.views = nvclip::DeviceBuffer(bytes);  // the previous batch has finished
  auto stream = static_cast<cudaStream_t>(batch.stream);
  NVCLIP_CUDA_CHECK(cudaMemcpyAsync(slot.views.data(), batch.images, bytes, cudaMemcpyHostToDevice, stream));
  const auto* images = reinterpret_cast<const ImageView*>(slot.views.data());
  const int64_t plane = static_cast<int64_t>(size) * size;
  const dim3 grid(static_cast<unsigned>((plane + kThreadsPerBlock - 1) / kThreadsPerBlock),
                  static_cast<unsigned>(batch.n));
  if (batch.dtype == nvclip::OutputDType::kFloat16) {
    nearest_resize_kernel<<<grid, kThreadsPerBlock, 0, stream>>>(images, size, static_cast<__half*>(batch.out));
  } else {
    nearest_resize_kernel<<<grid, kThreadsPerBlock, 0, stream>>>(images, size, static_cast<float*>(batch.out));
  }
  NVCLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nvtest
