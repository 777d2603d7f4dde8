// SlotRunner's shared steps, its host-memory flavour (CPU engines) and the factory.
#include "slot_runner.h"

#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "errors.h"

namespace nvclip {

namespace {

// Runs one step of a batch; prefixes its error with the step, so a failed request says what failed.
template <typename Fn>
void step(const std::string& what, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    throw EngineError(what + " failed: " + e.what());
  }
}

// CPU engines: every buffer in host memory, no copies to a device, nothing asynchronous.
class HostSlotRunner final : public SlotRunner {
 public:
  HostSlotRunner(std::shared_ptr<Engine> engine, SlotConfig config) : SlotRunner(std::move(engine), std::move(config)) {
    if (config_.stage) stage_state_ = config_.stage->make_slot_state();
    reserve(config_.rows);
  }

  HostMemoryKind host_memory() const override { return HostMemoryKind::kAligned; }
  size_t staging_capacity() const override { return std::numeric_limits<size_t>::max(); }

  void run(const SlotBatch& batch) override {
    const int64_t rows = engine_rows(batch.rows);
    reserve(rows);
    for (size_t i = 0; i < inputs_.size(); ++i) {
      const auto row = info().inputs[i].row_bytes();
      uint8_t* input = inputs_[i].data();
      if (batch.tensors != nullptr) std::memcpy(input, batch.tensors[i], static_cast<size_t>(batch.rows) * row);
      std::memset(input + static_cast<size_t>(batch.rows) * row, 0, static_cast<size_t>(rows - batch.rows) * row);
    }
    if (batch.images != nullptr) preprocess(batch, batch.images, inputs_[0].data(), nullptr, stage_state_.get());
    if (batch.released) batch.released();  // the stage has read the staged images
    enqueue(rows, input_ptrs_.data(), output_ptrs_.data(), nullptr);
    batch.scatter(reinterpret_cast<const uint8_t* const*>(output_ptrs_.data()));
  }

 private:
  void reserve(int64_t rows) {
    if (rows <= capacity_) return;
    const auto allocate = [rows](const TensorSpec& spec) {  // zeroed: rows of failed images stay finite
      HostBuffer buffer(static_cast<size_t>(rows) * spec.row_bytes(), HostMemoryKind::kAligned);
      std::memset(buffer.data(), 0, buffer.size());
      return buffer;
    };
    inputs_.clear();
    outputs_.clear();
    input_ptrs_.clear();
    output_ptrs_.clear();
    for (const auto& spec : info().inputs) input_ptrs_.push_back(inputs_.emplace_back(allocate(spec)).data());
    for (const auto& spec : info().outputs) output_ptrs_.push_back(outputs_.emplace_back(allocate(spec)).data());
    capacity_ = rows;
  }

  std::vector<HostBuffer> inputs_;
  std::vector<HostBuffer> outputs_;
  std::vector<const void*> input_ptrs_;
  std::vector<void*> output_ptrs_;
  int64_t capacity_ = 0;
  std::unique_ptr<PreprocessSlotState> stage_state_;
};

}  // namespace

SlotRunner::SlotRunner(std::shared_ptr<Engine> engine, SlotConfig config)
    : engine_(std::move(engine)), config_(std::move(config)) {
  if (!engine_) throw std::invalid_argument("SlotRunner: engine is null");
}

void SlotRunner::preprocess(const SlotBatch& batch, const ImageView* views, void* input, void* stream,
                            PreprocessSlotState* state) const {
  PreprocessBatch pre;
  pre.images = views;
  pre.n = batch.rows;
  pre.out = input;
  pre.dtype = config_.stage_dtype;
  pre.stream = stream;
  pre.state = state;
  pre.item_errors = batch.item_errors;
  step("preprocess stage " + config_.stage->name(), [&] { config_.stage->run(pre); });
}

void SlotRunner::enqueue(int64_t rows, const void* const* inputs, void* const* outputs, void* stream) const {
  EngineCall call;
  call.slot = config_.index;
  call.batch = rows;
  call.inputs = inputs;
  call.outputs = outputs;
  call.stream = stream;
  step("engine", [&] { engine_->enqueue(call); });
}

std::unique_ptr<SlotRunner> make_slot_runner(std::shared_ptr<Engine> engine, SlotConfig config) {
  if (engine && engine->info().device == DeviceKind::kCuda) {
#if NVCLIP_WITH_CUDA
    return make_cuda_slot_runner(std::move(engine), std::move(config));
#else
    throw EngineError("the engine runs on CUDA but this nvclip_fast was built without CUDA");
#endif
  }
  return std::make_unique<HostSlotRunner>(std::move(engine), std::move(config));
}

}  // namespace nvclip
