// SlotRunner: one stream slot of an engine, and one batch run on it from start to end:
//   pad (zero the rows from the batch up to the engine's minimum) -> copy the inputs into the
//   slot's memory -> preprocess stage (image batches) -> Engine::enqueue -> copy the output rows
//   back to host memory -> scatter them to their owners.
// A runner owns the slot's buffers and, on CUDA, its stream, device staging and the stage's slot
// state. BatchQueue keeps one per stream slot, EngineRunner one. Two flavours implement it: host
// memory for CPU engines (slot_runner.cpp) and CUDA (slot_runner_cuda.cpp, built only with CUDA);
// make_slot_runner picks the engine's.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine.h"
#include "host_memory.h"
#include "image.h"
#include "preprocess_stage.h"

namespace nvclip {

struct SlotConfig {
  int32_t index = 0;     // the slot's number (EngineCall::slot)
  int64_t rows = 0;      // engine rows allocated up front; a larger batch grows the buffers
  int64_t min_rows = 1;  // rows every engine call runs at least (the profile minimum, a fixed batch)
  int64_t output = -1;   // the output whose rows are copied back; -1: every output
  // Image batches: the stage that writes the engine's only input, in `stage_dtype`.
  std::shared_ptr<PreprocessStage> stage;
  OutputDType stage_dtype = OutputDType::kFloat32;
  size_t staging_bytes = 0;  // CUDA: device staging for a batch's images; a larger batch gets its own
};

// One batch. Its source is either `tensors` (host arrays, one per engine input, `rows` contiguous
// rows each) or `images`: staged host images that the slot's stage writes into the engine input,
// each with compact rows at the start of its own block of align_up(bytes, kBufferAlignment) bytes
// (the BatchQueue's staging; the CUDA flavour uploads whole blocks, merging adjacent ones).
struct SlotBatch {
  int64_t rows = 0;
  const void* const* tensors = nullptr;
  const ImageView* images = nullptr;
  std::string* item_errors = nullptr;  // images: one per image (PreprocessBatch::fail_item)
  // Called once the source memory is read for good (uploaded to the device, or preprocessed on the
  // host), before the engine has finished: its owner may reuse it. Not called when run() throws.
  std::function<void()> released;
  // Receives the output rows in host memory: outputs[o] holds `rows` rows of output o (nullptr for
  // an output that is not copied back), valid during the call.
  std::function<void(const uint8_t* const* outputs)> scatter;
};

class SlotRunner {
 public:
  SlotRunner(std::shared_ptr<Engine> engine, SlotConfig config);
  virtual ~SlotRunner() = default;
  SlotRunner(const SlotRunner&) = delete;
  SlotRunner& operator=(const SlotRunner&) = delete;

  // Runs the batch to its end, scatter included. Throws EngineError naming the step that failed;
  // nothing of the batch is still in flight then.
  virtual void run(const SlotBatch& batch) = 0;
  // The host memory this slot copies from fastest: pinned for CUDA, aligned otherwise.
  virtual HostMemoryKind host_memory() const = 0;
  // Bytes of staged images a batch may hold before it needs device staging of its own (SIZE_MAX
  // on the host, where the stage reads the images in place).
  virtual size_t staging_capacity() const = 0;

 protected:
  const EngineInfo& info() const { return engine_->info(); }
  int64_t engine_rows(int64_t rows) const { return std::max(rows, config_.min_rows); }
  bool copies_back(size_t output) const { return config_.output < 0 || static_cast<size_t>(config_.output) == output; }
  // The steps both flavours share: the stage writes `input` from `views`, the engine runs `rows`
  // rows. Errors are prefixed with the step.
  void preprocess(const SlotBatch& batch, const ImageView* views, void* input, void* stream,
                  PreprocessSlotState* state) const;
  void enqueue(int64_t rows, const void* const* inputs, void* const* outputs, void* stream) const;

  std::shared_ptr<Engine> engine_;
  SlotConfig config_;
};

std::unique_ptr<SlotRunner> make_slot_runner(std::shared_ptr<Engine> engine, SlotConfig config);
#if NVCLIP_WITH_CUDA
std::unique_ptr<SlotRunner> make_cuda_slot_runner(std::shared_ptr<Engine> engine, SlotConfig config);
#endif

}  // namespace nvclip
