// EngineRunner: runs an engine synchronously on host arrays, outside any BatchQueue — the text
// tower (a few token rows per call, no preprocessing to overlap) and direct engine calls. It holds
// the engine like a one-slot queue does (Engine::attach(1)); calls are serialized.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "engine.h"
#include "host_memory.h"

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
  // Throws std::invalid_argument for a bad batch, EngineError for engine and CUDA failures.
  void run(int64_t batch, const void* const* inputs, void* const* outputs);

 private:
  void run_cpu(int64_t rows, int64_t batch, const void* const* inputs, void* const* outputs);
  void run_cuda(int64_t rows, int64_t batch, const void* const* inputs, void* const* outputs);
  int64_t rows_for(int64_t batch) const;

  std::shared_ptr<Engine> engine_;
  std::mutex mutex_;
  // Scratch grown on demand: padded host rows (CPU engines) or device buffers + a stream (CUDA).
  std::vector<std::vector<uint8_t>> padded_;
#if NVCLIP_WITH_CUDA
  std::vector<DeviceBuffer> device_in_;
  std::vector<DeviceBuffer> device_out_;
  void* stream_ = nullptr;
#endif
};

}  // namespace nvclip
