// ResizeNormalizeCuda: the table arena, the upload of new coefficient tables and the launches of
// the resize_normalize kernel. What is uploaded and what each launch carries is
// KernelBatchPacker's (csrc/), which the tests run on the CPU.
#include <algorithm>
#include <array>
#include <iterator>
#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "resize_normalize.h"
#include "resize_normalize_kernel.h"

namespace nvclip {

namespace {

// Pinned staging buffers for new coefficient tables, used in turn, so that packing the next batch
// never waits for the copy of the last one, only for the one before it.
constexpr int kStagingBuffers = 2;

struct Staging {
  uint8_t* data = nullptr;  // pinned host memory
  int64_t bytes = 0;
  cudaEvent_t copied = nullptr;  // the last copy out of `data` has executed
  bool in_use = false;           // `copied` has been recorded
};

}  // namespace

struct ResizeNormalizeCuda::Impl {
  Impl(int64_t arena_bytes, int min_blocks) : packer(arena_bytes), min_blocks_per_sm(min_blocks) {}

  int device = 0;
  KernelBatchPacker packer;
  int min_blocks_per_sm;
  LaunchParams launch{};  // filled per launch; the launch copies it
  std::array<Staging, kStagingBuffers> staging{};
  int next_staging = 0;
  uint8_t* arena = nullptr;  // device: coefficient tables
  int64_t arena_bytes = 0;
  cudaEvent_t kernel_done = nullptr;  // the last kernel has finished
  bool kernel_recorded = false;
  cudaStream_t last_stream = nullptr;

  void wait_kernel() {
    if (kernel_recorded) NVCLIP_CUDA_CHECK(cudaEventSynchronize(kernel_done));
  }

  // The arena is replaced only after the kernels that read it have finished (the caller waited);
  // cudaFree synchronizes the device, which a recycled arena (rare: its 8 MB hold ~500 photo-size
  // tables) can afford.
  void grow_arena(int64_t bytes) {
    if (arena != nullptr) NVCLIP_CUDA_CHECK(cudaFree(arena));
    arena = nullptr;
    arena_bytes = 0;
    NVCLIP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&arena), static_cast<size_t>(bytes)));
    arena_bytes = bytes;
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
    if (arena != nullptr) cudaFree(arena);
    if (kernel_done != nullptr) cudaEventDestroy(kernel_done);
    cudaGetLastError();
  }
};

ResizeNormalizeCuda::ResizeNormalizeCuda(int64_t table_arena_bytes, int min_blocks_per_sm) {
  if (std::find(std::begin(kMinBlocksVariants), std::end(kMinBlocksVariants), min_blocks_per_sm) ==
      std::end(kMinBlocksVariants)) {
    throw std::invalid_argument("resize_normalize: min_blocks_per_sm must be 1 or 3 (the compiled variants), got " +
                                std::to_string(min_blocks_per_sm));
  }
  impl_ = std::make_unique<Impl>(table_arena_bytes, min_blocks_per_sm);
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

int ResizeNormalizeCuda::min_blocks_per_sm() const { return impl_->min_blocks_per_sm; }

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
    const bool grow_arena = layout.arena_bytes > s.arena_bytes;
    if (grow_arena || layout.arena_recycled) s.wait_kernel();
    // Only a recycled arena grows (KernelBatchPacker): nothing in the old one is needed any more.
    if (grow_arena) s.grow_arena(layout.arena_bytes);
    // On another stream than the previous call's, this call's work waits (on the device) for the
    // previous kernel: the tables it reads were copied before that kernel, and the arena space
    // this call writes may still be read by it (after a recycle or a forget()). On the same
    // stream, stream order does both. So all of this object's kernels run in one order.
    if (s.kernel_recorded && stream != s.last_stream) {
      NVCLIP_CUDA_CHECK(cudaStreamWaitEvent(stream, s.kernel_done, 0));
    }
    if (layout.table_bytes > 0) {
      Staging& st = s.staging_for(layout.table_bytes);
      s.packer.write(st.data, s.arena);
      NVCLIP_CUDA_CHECK(cudaMemcpyAsync(s.arena + layout.table_offset, st.data,
                                        static_cast<size_t>(layout.table_bytes), cudaMemcpyHostToDevice, stream));
      NVCLIP_CUDA_CHECK(cudaEventRecord(st.copied, stream));
      st.in_use = true;
    } else {
      s.packer.write(nullptr, s.arena);  // every table is in the arena already
    }
    for (int64_t k = 0; k < launch_count(n); ++k) {
      s.packer.fill_launch(k, device_out, &s.launch);
      NVCLIP_CUDA_CHECK(launch_resize_normalize(s.launch, dtype, s.min_blocks_per_sm, stream));
    }
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
