// ResizeNormalizeCuda: scratch memory, uploads and the launch of the resize_normalize kernel. The
// layout of what is uploaded is KernelBatchPacker's (csrc/), which the tests run on the CPU.
#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "resize_normalize.h"
#include "resize_normalize_kernel.h"

namespace nvclip {

namespace {

// Pinned staging buffers used in turn, so that packing the next batch never waits for the copy of
// the last one, only for the one before it.
constexpr int kStagingBuffers = 2;

struct Staging {
  uint8_t* data = nullptr;  // pinned host memory
  int64_t bytes = 0;
  cudaEvent_t copied = nullptr;  // the last copy out of `data` has executed
  bool in_use = false;           // `copied` has been recorded
};

}  // namespace

struct ResizeNormalizeCuda::Impl {
  explicit Impl(int64_t arena_bytes) : packer(arena_bytes) {}

  int device = 0;
  KernelBatchPacker packer;
  std::array<Staging, kStagingBuffers> staging{};
  int next_staging = 0;
  uint8_t* header = nullptr;  // device: normalize table + descriptors
  int64_t header_bytes = 0;
  uint8_t* arena = nullptr;  // device: coefficient tables
  int64_t arena_bytes = 0;
  cudaEvent_t kernel_done = nullptr;  // the last kernel has finished
  bool kernel_recorded = false;
  cudaStream_t last_stream = nullptr;

  void wait_kernel() {
    if (kernel_recorded) NVCLIP_CUDA_CHECK(cudaEventSynchronize(kernel_done));
  }

  // Device buffers an earlier kernel may read are freed only after it (the caller waited).
  static void reallocate_device(uint8_t** buffer, int64_t* size, int64_t bytes) {
    if (*buffer != nullptr) NVCLIP_CUDA_CHECK(cudaFree(*buffer));
    *buffer = nullptr;
    *size = 0;
    NVCLIP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(buffer), static_cast<size_t>(bytes)));
    *size = bytes;
  }

  Staging& staging_for(int64_t bytes) {
    Staging& st = staging[next_staging];
    next_staging = (next_staging + 1) % kStagingBuffers;
    if (st.in_use) NVCLIP_CUDA_CHECK(cudaEventSynchronize(st.copied));
    if (bytes > st.bytes) {
      const int64_t grown = std::max(bytes, 2 * st.bytes);
      if (st.data != nullptr) NVCLIP_CUDA_CHECK(cudaFreeHost(st.data));
      st.data = nullptr;
      st.bytes = 0;
      NVCLIP_CUDA_CHECK(
          cudaHostAlloc(reinterpret_cast<void**>(&st.data), static_cast<size_t>(grown), cudaHostAllocDefault));
      st.bytes = grown;
    }
    return st;
  }

  void release() noexcept {
    // Destructor path: nothing can be reported; after a failed wait there is nothing better to do.
    if (kernel_recorded && kernel_done != nullptr) cudaEventSynchronize(kernel_done);
    for (Staging& st : staging) {
      if (st.in_use) cudaEventSynchronize(st.copied);
      if (st.data != nullptr) cudaFreeHost(st.data);
      if (st.copied != nullptr) cudaEventDestroy(st.copied);
    }
    if (header != nullptr) cudaFree(header);
    if (arena != nullptr) cudaFree(arena);
    if (kernel_done != nullptr) cudaEventDestroy(kernel_done);
    cudaGetLastError();
  }
};

ResizeNormalizeCuda::ResizeNormalizeCuda(int64_t table_arena_bytes)
    : impl_(std::make_unique<Impl>(table_arena_bytes)) {
  try {
    NVCLIP_CUDA_CHECK(cudaGetDevice(&impl_->device));
    for (Staging& st : impl_->staging) {
      NVCLIP_CUDA_CHECK(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));
    }
    NVCLIP_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->kernel_done, cudaEventDisableTiming));
  } catch (...) {
    impl_->release();
    throw;
  }
}

ResizeNormalizeCuda::~ResizeNormalizeCuda() {
  if (impl_) impl_->release();
}

int ResizeNormalizeCuda::device() const { return impl_->device; }

void ResizeNormalizeCuda::enqueue(const ImageView* device_images, int64_t n, const PreprocessParams& params,
                                  OutputDType dtype, void* device_out, cudaStream_t stream) {
  Impl& s = *impl_;
  if (n == 0) {
    plan_batch(device_images, n, params);  // still validates the parameters
    return;
  }
  if (device_out == nullptr) throw std::invalid_argument("resize_normalize: null output pointer");
  int current = -1;
  NVCLIP_CUDA_CHECK(cudaGetDevice(&current));
  if (current != s.device) {
    throw std::invalid_argument("resize_normalize: created on CUDA device " + std::to_string(s.device) +
                                " but called with device " + std::to_string(current) + " current");
  }
  const KernelBatchPacker::Layout layout = s.packer.plan(device_images, n, params, dtype);  // validates
  try {
    Staging& st = s.staging_for(layout.header_bytes + layout.table_bytes);
    const bool grow_header = layout.header_bytes > s.header_bytes;
    const bool grow_arena = layout.arena_bytes > s.arena_bytes;
    if (grow_header || grow_arena || layout.arena_recycled) s.wait_kernel();
    if (grow_header) Impl::reallocate_device(&s.header, &s.header_bytes, layout.header_bytes);
    // Only a recycled arena grows (KernelBatchPacker): nothing in the old one is needed any more.
    if (grow_arena) Impl::reallocate_device(&s.arena, &s.arena_bytes, layout.arena_bytes);
    s.packer.write(st.data, s.arena);
    // On another stream than the previous call's, the copies into the header (and a recycled
    // arena) wait for the previous kernel; on the same stream, stream order does it.
    if (s.kernel_recorded && stream != s.last_stream) {
      NVCLIP_CUDA_CHECK(cudaStreamWaitEvent(stream, s.kernel_done, 0));
    }
    NVCLIP_CUDA_CHECK(cudaMemcpyAsync(s.header, st.data, static_cast<size_t>(layout.header_bytes),
                                      cudaMemcpyHostToDevice, stream));
    if (layout.table_bytes > 0) {
      NVCLIP_CUDA_CHECK(cudaMemcpyAsync(s.arena + layout.table_offset, st.data + layout.header_bytes,
                                        static_cast<size_t>(layout.table_bytes), cudaMemcpyHostToDevice, stream));
    }
    NVCLIP_CUDA_CHECK(cudaEventRecord(st.copied, stream));
    st.in_use = true;
    const auto* descriptors = reinterpret_cast<const TileImage*>(s.header + KernelBatchPacker::kDescriptorOffset);
    const auto* table = reinterpret_cast<const uint32_t*>(s.header + KernelBatchPacker::kNormalizeTableOffset);
    NVCLIP_CUDA_CHECK(launch_resize_normalize(descriptors, n, table, params.size, params.fill, dtype, device_out,
                                              stream));
    NVCLIP_CUDA_CHECK(cudaEventRecord(s.kernel_done, stream));
    s.kernel_recorded = true;
    s.last_stream = stream;
  } catch (...) {
    // The tables this batch placed in the arena may never have been copied: trust none of them.
    s.packer.forget();
    throw;
  }
}

}  // namespace nvclip
