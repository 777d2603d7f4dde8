// ResizeNormalizeStage: the BatchQueue's real preprocessing step — resize_normalize (open_clip's
// eval transform, Pillow-exact) writing the engine's input tensor. CPU: the CPU twin on this
// stage's ThreadPool. CUDA: the kernel, with one ResizeNormalizeCuda per stream slot (the slot's
// PreprocessSlotState, created and destroyed with the slot).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "image.h"
#include "preprocess_stage.h"

namespace nvclip {

class ThreadPool;

class ResizeNormalizeStage final : public PreprocessStage {
 public:
  // Throws std::invalid_argument for invalid params (check_params), EngineError for kCuda in a
  // build without CUDA. `threads`: CPU preprocessing threads (0 = every core); unused on CUDA.
  ResizeNormalizeStage(const PreprocessParams& params, DeviceKind device, int threads);
  ~ResizeNormalizeStage() override;

  DeviceKind device() const override { return device_; }
  int32_t size() const override { return params_.size; }
  std::string name() const override { return "resize_normalize"; }
  const PreprocessParams& params() const { return params_; }
  int threads() const;
  std::unique_ptr<PreprocessSlotState> make_slot_state() const override;

  // Images that open_clip's transform itself cannot process (plan_resize refuses them) fail as
  // items; the others are written to their own rows.
  void run(const PreprocessBatch& batch) override;

 private:
  void run_span(const PreprocessBatch& batch, int64_t first, int64_t count);

  PreprocessParams params_;
  DeviceKind device_;
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace nvclip
