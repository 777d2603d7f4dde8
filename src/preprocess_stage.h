// PreprocessStage: the BatchQueue's pluggable preprocessing step. Once per batch the queue hands the
// batch's staged uint8 images to the stage, which writes the engine's input tensor directly (no
// intermediate buffer), on the slot's stream for CUDA stages.
//
// Where the real preprocessing (issue 3: Pillow-exact resize / center crop / normalize) plugs in:
// two small adapters, bound in Python like NearestResizeStage in bind_batch_queue.cpp
// (py::class_<X, PreprocessStage, py::smart_holder>):
//
//   // CPU twin: resize_normalize_cpu(const ImageView*, n, const PreprocessParams&, OutputDType,
//   //                                void* out, threads)
//   class ResizeNormalizeCpuStage final : public PreprocessStage {
//    public:
//     ResizeNormalizeCpuStage(PreprocessParams params, int threads) : params_(params), threads_(threads) {}
//     DeviceKind device() const override { return DeviceKind::kCpu; }
//     int32_t size() const override { return params_.size; }
//     void run(const PreprocessBatch& b) override {
//       resize_normalize_cpu(b.images, b.n, params_, b.dtype, b.out, threads_);
//     }
//     PreprocessParams params_; int threads_;
//   };
//
//   // CUDA kernel class K with enqueue(const ImageView* device_images, n, params, dtype,
//   //                                  void* device_out, cudaStream_t)
//   void run(const PreprocessBatch& b) override {   // device() == DeviceKind::kCuda
//     kernel_.enqueue(b.device_images, b.n, params_, b.dtype, b.out, static_cast<cudaStream_t>(b.stream));
//   }
//   // b.images holds the same views in host memory (device data pointers) for host-side setup such
//   // as the resampling coefficients, which Pillow-exactness wants computed on the host in double.
//
// The Python side then builds the queue with that stage instead of NearestResizeStage.
#pragma once

#include <cstdint>
#include <string>

#include "engine.h"
#include "image.h"

namespace nvclip {

struct PreprocessBatch {
  // n views, in host memory. Pixels are uint8 HWC with compact rows (row_stride == width * channels),
  // channels 1 or 3, width/height > 0 (the queue validated them at submit). The pixel pointers point
  // into the stage's memory: device staging for CUDA stages, host staging for CPU stages.
  const ImageView* images = nullptr;
  // CUDA stages: the same n views copied to device memory (the copy is enqueued on `stream` before
  // run() is called). nullptr for CPU stages.
  const ImageView* device_images = nullptr;
  int64_t n = 0;
  // The engine's input tensor (same memory space as the pixels): write rows 0..n-1, each
  // 3 x size x size in `dtype`, NCHW. The tensor may have more rows (padding up to the engine's
  // minimum batch); leave them.
  void* out = nullptr;
  OutputDType dtype = OutputDType::kFloat32;
  void* stream = nullptr;  // cudaStream_t of the slot for CUDA stages; nullptr for CPU stages
  // n strings, empty on entry. A stage that cannot process one image sets its entry (fail_item):
  // that image's row comes back NaN with this message and the rest of the batch goes on. Throwing
  // from run() fails the whole batch instead.
  std::string* item_errors = nullptr;

  void fail_item(int64_t i, std::string why) const { item_errors[i] = std::move(why); }
};

class PreprocessStage {
 public:
  virtual ~PreprocessStage() = default;
  virtual DeviceKind device() const = 0;
  virtual int32_t size() const = 0;  // S: writes 3 x S x S per image
  virtual bool supports(OutputDType dtype) const { (void)dtype; return true; }
  virtual std::string name() const = 0;  // for error messages
  // CPU stages run synchronously; CUDA stages enqueue on batch.stream and return. Calls for
  // different slots may run concurrently on different threads.
  virtual void run(const PreprocessBatch& batch) = 0;
};

}  // namespace nvclip
