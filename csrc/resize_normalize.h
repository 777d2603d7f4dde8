// resize_normalize: open_clip's eval transform (resize, center crop or pad, ToTensor, Normalize)
// for a batch of uint8 HWC images of any sizes, bit-exact with open_clip + Pillow, written as
// n x 3 x S x S float32 or float16 (NCHW). The C++ API the runtime's batch queue calls.
//
//   * resize_normalize_cpu: the CPU twin, on a ThreadPool (implemented in src/).
//   * ResizeNormalizeCuda: the CUDA kernel with its scratch memory, one per stream slot.
//   (ResizeNormalizeEmulated, resize_normalize_kernel.h: the CUDA path run on the CPU, for tests.)
//
// Inputs: ImageView with channels 1 (gray, replicated to RGB after the resize as PIL's
// convert("RGB") does) or 3 (RGB), height, width >= 1, row_stride >= width * channels.
// Bad input throws std::invalid_argument naming the image ("images[3]: expected 1 (gray) or 3
// (RGB) channels, got 4") before any pixel is touched; CUDA failures throw EngineError.
#pragma once

#include <cstdint>
#include <memory>

#include "image.h"

#if NVCLIP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace nvclip {

class ThreadPool;

// The default size of the CUDA path's device cache of coefficient tables: a 4000-pixel axis
// resized for 336 outputs takes 66 KB, a 640-pixel one 14 KB.
constexpr int64_t kDefaultTableArenaBytes = int64_t{8} << 20;

// The kernel variant built for 1 thread block per SM at least (no register cap below 255), the
// other being 3 (kMinBlocksVariants). The faster on the GPU is the default: gpu_check.sh measures
// both side by side.
constexpr int kDefaultMinBlocksPerSm = 1;

// Writes n x 3 x size x size elements of `dtype` to `out` (host memory). Blocks until done.
void resize_normalize_cpu(const ImageView* images, int64_t n, const PreprocessParams& params, OutputDType dtype,
                          void* out, ThreadPool& pool);

#if NVCLIP_WITH_CUDA
// The CUDA path. Owns a device cache of coefficient tables keyed by (source size, resized size,
// crop, filter), so a stream of same-size images uploads its tables once, and pinned staging for
// the new ones. The per-image descriptors and the normalize parameters travel as kernel
// parameters (each block builds its normalize table), so a batch of known sizes uploads nothing.
//
// Reuse rule: not thread-safe; one host thread at a time per object (the batch queue keeps one
// per stream slot). enqueue() only queues work on `stream` (the copy of new tables, if any, then
// one kernel launch per kLaunchImages images) and returns; it never synchronizes the device. It
// may be called again at once, for the next batch, on the same or another stream. It blocks the
// host only (a) until the table copy of the call before the previous one has executed (two
// staging buffers are used in turn: a cudaEvent wait that has normally long completed), and (b)
// when the table cache must be recycled or grown, until the previous call's kernel has finished.
// When `stream` differs from the previous call's, the new work first waits on the device
// (cudaStreamWaitEvent) for the previous kernel, so tables are never overwritten under a running
// kernel nor read before their copy. The caller keeps the images and `device_out` alive and
// unchanged until `stream` has passed the kernel. The destructor waits for this object's last
// kernel.
class ResizeNormalizeCuda {
 public:
  // Belongs to the current CUDA device; enqueue() must be called with that device current.
  // `table_arena_bytes`: the initial size of the device cache of coefficient tables (a batch that
  // needs more recycles it and grows it). `min_blocks_per_sm`: the kernel variant (1 or 3 blocks
  // per SM, see kMinBlocksVariants); std::invalid_argument for another value.
  explicit ResizeNormalizeCuda(int64_t table_arena_bytes = kDefaultTableArenaBytes,
                               int min_blocks_per_sm = kDefaultMinBlocksPerSm);
  ~ResizeNormalizeCuda();
  ResizeNormalizeCuda(const ResizeNormalizeCuda&) = delete;
  ResizeNormalizeCuda& operator=(const ResizeNormalizeCuda&) = delete;

  // `device_images`: a host array of n views whose pixels are in device memory (or host memory the
  // device can read: mapped pinned memory). `device_out`: n x 3 x size x size elements of `dtype`
  // in device memory. Asynchronous on `stream`.
  void enqueue(const ImageView* device_images, int64_t n, const PreprocessParams& params, OutputDType dtype,
               void* device_out, cudaStream_t stream);

  int device() const;
  int min_blocks_per_sm() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
#endif

}  // namespace nvclip
