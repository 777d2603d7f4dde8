#include "engine_runner.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "errors.h"

namespace nvclip {

EngineRunner::EngineRunner(std::shared_ptr<Engine> engine) : engine_(std::move(engine)) {
  if (!engine_) throw std::invalid_argument("EngineRunner needs an engine");
  const EngineInfo& io = engine_->info();
  for (const auto& t : io.inputs) (void)t.row_bytes();  // fixed rows, or std::invalid_argument
  for (const auto& t : io.outputs) (void)t.row_bytes();
  engine_->attach(1);
  try {
    SlotConfig config;
    config.min_rows = io.call_batches().min;
    slot_ = make_slot_runner(engine_, config);
  } catch (...) {
    engine_->detach();
    throw;
  }
}

EngineRunner::~EngineRunner() {
  slot_.reset();
  engine_->detach();
}

void EngineRunner::run(int64_t batch, const void* const* inputs, void* const* outputs) {
  const int64_t max = engine_->info().call_batches().max;
  if (batch < 1 || batch > max) {
    throw std::invalid_argument("batch must be in [1, " + std::to_string(max) + "], got " + std::to_string(batch));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  SlotBatch job;
  job.rows = batch;
  job.tensors = inputs;
  job.scatter = [&](const uint8_t* const* rows) {
    const auto& specs = engine_->info().outputs;
    for (size_t o = 0; o < specs.size(); ++o) {
      std::memcpy(outputs[o], rows[o], static_cast<size_t>(batch) * specs[o].row_bytes());
    }
  };
  slot_->run(job);
}

}  // namespace nvclip
