// The TensorRT runtime library, loaded with dlopen on first use: no link-time dependency, so one
// wheel serves machines with and without TensorRT. Compiled only when the TensorRT headers are found.
#pragma once

#include <cstdint>
#include <string>

#include <NvInferRuntime.h>

namespace nvclip {

class TrtLibrary {
 public:
  // Loads `path` when given, else the first of libnvinfer.so.<MAJOR>, libnvinfer_lean.so.<MAJOR>,
  // libnvinfer_dispatch.so.<MAJOR> the dynamic loader finds (MAJOR: the headers' major version; 10.x
  // headers cannot drive 11.x libraries). TensorRT allows one runtime library per process, so once one
  // is loaded a request for another path fails. Throws EngineError listing every name tried.
  static const TrtLibrary& load(const std::string& path = "");

  // createInferRuntime_INTERNAL(logger, NV_TENSORRT_VERSION). The caller checks for a CUDA device
  // first: without a driver TensorRT logs an error and returns a non-null, unusable pointer.
  nvinfer1::IRuntime* create_runtime(nvinfer1::ILogger& logger) const;

  const std::string& path() const { return path_; }
  int32_t version() const { return version_; }  // getInferLibVersion(): MAJOR*10000 + MINOR*100 + PATCH

 private:
  using CreateRuntimeFn = void* (*)(void* logger, int32_t version);
  TrtLibrary(void* handle, std::string path);

  void* handle_ = nullptr;
  std::string path_;
  CreateRuntimeFn create_runtime_ = nullptr;
  int32_t version_ = 0;
};

}  // namespace nvclip
