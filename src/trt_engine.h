// TrtEngine: an Engine that runs a serialized TensorRT plan. The TensorRT runtime library is loaded
// with dlopen (TrtLibrary); one IExecutionContext per stream slot; tensors addressed by name
// (setInputShape / setTensorAddress / enqueueV3, the TensorRT 10/11 API). Compiled only when the
// TensorRT headers are found.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "engine.h"
#include "log_capture.h"
#include "trt_library.h"

namespace nvclip {

// TensorRT's logger for one runtime and everything it creates: errors go to the LogCapture scope
// of the call (on this thread) that caused them, warnings are kept for the caller to show;
// kINFO / kVERBOSE (TensorRT's progress chatter) are dropped.
class TrtLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override;
  LogCapture& capture() { return capture_; }
  std::vector<std::string> warnings() const { return capture_.warnings(); }

 private:
  LogCapture capture_;
};

struct TrtEngineOptions {
  TrtLibrarySearch library;  // where to find the runtime library (TrtLibrary::load)
  int32_t device = 0;        // CUDA device ordinal
};

class TrtEngine final : public Engine {
 public:
  // Reads the plan, checks that the CUDA device is usable *before* TensorRT creates a runtime (with
  // no driver TensorRT returns an unusable non-null runtime), loads the library, deserializes and
  // describes the I/O tensors. Throws EngineError naming the file and what failed, with the errors
  // TensorRT logged during this call. A lean or dispatch runtime library runs only plans built
  // version-compatible; for it the runtime is allowed the host code such plans carry.
  explicit TrtEngine(const std::string& plan_path, const TrtEngineOptions& options = {});
  ~TrtEngine() override;

  void enqueue(const EngineCall& call) override;

  const std::string& path() const { return path_; }
  const std::string& library_path() const { return library_->path(); }
  int32_t library_version() const { return library_->version(); }
  std::vector<std::string> warnings() const { return logger_->warnings(); }
  // The device memory each execution context (stream slot) allocates for the largest batch.
  int64_t context_memory_bytes() const;

 protected:
  // One execution context per slot; each allocates the activation memory of the largest batch.
  // Checks that every output follows the input's batch (at the profile's largest batch).
  void prepare_slots(int32_t slots) override;

 private:
  // EngineError("TensorRT plan 'path': what (TensorRT: errors logged in this call's scope)").
  [[noreturn]] void fail(const std::string& what);
  // setInputShape for `batch` rows, then every output's shape must be [batch, fixed dims...].
  void set_batch(nvinfer1::IExecutionContext& context, int64_t batch);

  std::string path_;
  const TrtLibrary* library_ = nullptr;
  // Declaration order = reverse destruction order: contexts, engine, runtime, then the logger they
  // all report to.
  std::unique_ptr<TrtLogger> logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  nvinfer1::Dims input_dims_{};  // the input's shape, batch dimension set per call
};

}  // namespace nvclip
