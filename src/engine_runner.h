// EngineRunner: runs an engine synchronously on host arrays, outside any BatchQueue — the text
// tower (a few token rows per call, no preprocessing to overlap) and direct engine calls. It holds
// the engine like a one-slot queue does (Engine::attach(1)) and runs each call on its SlotRunner;
// calls are serialized.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>

#include "engine.h"
#include "slot_runner.h"

namespace nvclip {

class EngineRunner {
 public:
  // Throws EngineError when the engine already serves a queue (or runner).
  explicit EngineRunner(std::shared_ptr<Engine> engine);
  ~EngineRunner();
  EngineRunner(const EngineRunner&) = delete;
  EngineRunner& operator=(const EngineRunner&) = delete;

  const Engine& engine() const { return *engine_; }

  // inputs[i] / outputs[i]: host memory of `batch` contiguous rows of the engine's i-th input /
  // output (EngineInfo order). batch must be in [1, profile max]; a batch below the profile minimum
  // (or a fixed batch) is padded with zero rows, and only `batch` output rows are copied back.
  // Throws std::invalid_argument for a bad batch, EngineError for engine and CUDA failures. The
  // calling thread's current CUDA device is the same after the call as before.
  void run(int64_t batch, const void* const* inputs, void* const* outputs);

 private:
  std::shared_ptr<Engine> engine_;
  std::mutex mutex_;
  std::unique_ptr<SlotRunner> slot_;  // buffers grown on demand
};

}  // namespace nvclip
