#include "trt_library.h"

#include <dlfcn.h>

#include <memory>
#include <mutex>
#include <vector>

#include "errors.h"

namespace nvclip {

namespace {

std::vector<std::string> default_names() {
  const std::string major = std::to_string(NV_TENSORRT_MAJOR);
  return {"libnvinfer.so." + major, "libnvinfer_lean.so." + major, "libnvinfer_dispatch.so." + major};
}

std::mutex g_mutex;
std::unique_ptr<TrtLibrary> g_library;  // one runtime library per process, never unloaded

}  // namespace

TrtLibrary::TrtLibrary(void* handle, std::string path) : handle_(handle), path_(std::move(path)) {
  create_runtime_ = reinterpret_cast<CreateRuntimeFn>(dlsym(handle_, "createInferRuntime_INTERNAL"));
  auto get_version = reinterpret_cast<int32_t (*)()>(dlsym(handle_, "getInferLibVersion"));
  if (create_runtime_ == nullptr || get_version == nullptr) {
    throw EngineError(path_ + " is not a TensorRT runtime library (createInferRuntime_INTERNAL or "
                      "getInferLibVersion missing)");
  }
  version_ = get_version();
  if (version_ / 10000 != NV_TENSORRT_MAJOR) {
    throw EngineError(path_ + " is TensorRT " + std::to_string(version_) + " but nvclip_fast was built "
                      "against TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + ".x headers; the major "
                      "versions must match");
  }
}

const TrtLibrary& TrtLibrary::load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_library) {
    if (!path.empty() && path != g_library->path_) {
      throw EngineError("TensorRT runtime " + g_library->path_ + " is already loaded; cannot also load " +
                        path + " (one TensorRT runtime library per process)");
    }
    return *g_library;
  }
  std::vector<std::string> names = path.empty() ? default_names() : std::vector<std::string>{path};
  std::string tried;
  for (const auto& name : names) {
    dlerror();
    void* handle = dlopen(name.c_str(), RTLD_LAZY | RTLD_LOCAL);
    if (handle != nullptr) {
      try {
        g_library.reset(new TrtLibrary(handle, name));
      } catch (...) {
        dlclose(handle);
        throw;
      }
      return *g_library;
    }
    const char* why = dlerror();
    tried += "\n  " + name + ": " + (why != nullptr ? why : "not found");
  }
  throw EngineError("could not load the TensorRT " + std::to_string(NV_TENSORRT_MAJOR) +
                    ".x runtime library; tried:" + tried +
                    "\n(install TensorRT, e.g. `pip install tensorrt-cu13`, or pass the library path)");
}

nvinfer1::IRuntime* TrtLibrary::create_runtime(nvinfer1::ILogger& logger) const {
  const auto version = static_cast<int32_t>(NV_TENSORRT_VERSION);
  return static_cast<nvinfer1::IRuntime*>(create_runtime_(&logger, version));
}

}  // namespace nvclip
