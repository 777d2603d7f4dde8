// TrtEngine: an Engine that runs a serialized TensorRT plan. The TensorRT runtime library is loaded
// with dlopen (TrtLibrary); one IExecutionContext per stream slot; tensors addressed by name
// (setInputShape / setTensorAddress / enqueueV3, the TensorRT 10/11 API). Compiled only when the
// TensorRT headers are found.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "engine.h"

namespace nvclip {

// Collects what TensorRT logs instead of printing it: errors are surfaced in the EngineError of the
// call that failed (take_errors), warnings are kept (the last kMaxWarnings) for the caller to show.
// Thread-safe: TensorRT may log from any thread that calls into it.
class TrtLogger final : public nvinfer1::ILogger {
 public:
  static constexpr size_t kMaxWarnings = 64;
  void log(Severity severity, const char* msg) noexcept override;
  // The errors logged since the last call, joined with "; " ("" when none); clears them.
  std::string take_errors();
  std::vector<std::string> warnings() const;

 private:
  mutable std::mutex mutex_;
  std::vector<std::string> errors_;
  std::deque<std::string> warnings_;
};

struct TrtEngineOptions {
  std::string library;  // path of libnvinfer / lean / dispatch; "" = search (TrtLibrary::load)
  int32_t device = 0;   // CUDA device ordinal
};

class TrtEngine final : public Engine {
 public:
  // Reads the plan, checks that the CUDA device is usable *before* TensorRT creates a runtime (with
  // no driver TensorRT returns an unusable non-null runtime), loads the library, deserializes and
  // describes the I/O tensors. Throws EngineError naming the file and what failed, with TensorRT's
  // logged errors.
  explicit TrtEngine(const std::string& plan_path, const TrtEngineOptions& options = {});
  ~TrtEngine() override;

  void enqueue(const EngineCall& call) override;

  const std::string& path() const { return path_; }
  const std::string& library_path() const { return library_path_; }
  int32_t library_version() const { return library_version_; }
  std::vector<std::string> warnings() const { return logger_->warnings(); }

 protected:
  void prepare_slots(int32_t slots) override;  // one execution context per slot

 private:
  [[noreturn]] void fail(const std::string& what);  // EngineError(path: what: logged errors)

  std::string path_;
  std::string library_path_;
  int32_t library_version_ = 0;
  // Declaration order = reverse destruction order: contexts, engine, runtime, then the logger they
  // all report to.
  std::unique_ptr<TrtLogger> logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  nvinfer1::Dims input_dims_{};  // the input's shape, batch dimension set per call
};

}  // namespace nvclip
