#include "resize_normalize_stage.h"

#include <stdexcept>

#include "errors.h"
#include "resize_normalize.h"
#include "resize_plan.h"
#include "thread_pool.h"

namespace nvclip {

namespace {

size_t output_row_bytes(const PreprocessParams& params, OutputDType dtype) {
  const size_t element = dtype == OutputDType::kFloat16 ? 2 : 4;
  return size_t{3} * static_cast<size_t>(params.size) * static_cast<size_t>(params.size) * element;
}

#if NVCLIP_WITH_CUDA
// A CUDA slot's kernel scratch (its pinned and device buffers, its table cache).
struct KernelSlot final : PreprocessSlotState {
  ResizeNormalizeCuda kernel;
};
#endif

}  // namespace

ResizeNormalizeStage::ResizeNormalizeStage(const PreprocessParams& params, DeviceKind device, int threads)
    : params_(params), device_(device) {
  if (const std::string why = check_params(params); !why.empty()) {
    throw std::invalid_argument("preprocess parameters: " + why);
  }
  if (device == DeviceKind::kCuda) {
#if !NVCLIP_WITH_CUDA
    throw EngineError("resize_normalize on CUDA needs a CUDA build of nvclip_fast");
#endif
  } else {
    pool_ = std::make_unique<ThreadPool>(threads);
  }
}

ResizeNormalizeStage::~ResizeNormalizeStage() = default;

int ResizeNormalizeStage::threads() const { return pool_ ? pool_->size() : 0; }

std::unique_ptr<PreprocessSlotState> ResizeNormalizeStage::make_slot_state() const {
#if NVCLIP_WITH_CUDA
  if (device_ == DeviceKind::kCuda) return std::make_unique<KernelSlot>();
#endif
  return nullptr;
}

void ResizeNormalizeStage::run(const PreprocessBatch& batch) {
  // Contiguous spans of images open_clip can process; each refused image fails alone.
  int64_t first = 0;
  for (int64_t i = 0; i < batch.n; ++i) {
    try {
      plan_resize(batch.images[i].height, batch.images[i].width, params_);
      continue;
    } catch (const std::invalid_argument& e) {
      batch.fail_item(i, e.what());
    }
    run_span(batch, first, i - first);
    first = i + 1;
  }
  run_span(batch, first, batch.n - first);
}

void ResizeNormalizeStage::run_span(const PreprocessBatch& batch, int64_t first, int64_t count) {
  if (count <= 0) return;
  void* out = static_cast<char*>(batch.out) + static_cast<size_t>(first) * output_row_bytes(params_, batch.dtype);
  if (device_ == DeviceKind::kCpu) {
    resize_normalize_cpu(batch.images + first, count, params_, batch.dtype, out, *pool_);
    return;
  }
#if NVCLIP_WITH_CUDA
  auto* slot = dynamic_cast<KernelSlot*>(batch.state);
  if (slot == nullptr) throw EngineError("resize_normalize on CUDA runs with its slot's state (make_slot_state)");
  // The kernel reads the views from a host array (it uploads its own descriptors).
  slot->kernel.enqueue(batch.images + first, count, params_, batch.dtype, out, static_cast<cudaStream_t>(batch.stream));
#endif
}

}  // namespace nvclip
