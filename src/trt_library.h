// The TensorRT runtime library, loaded with dlopen on first use: no link-time dependency, so one
// wheel serves machines with and without TensorRT. This part needs no TensorRT header, so every
// build (and its tests) can find, load and check a library; TrtEngine, compiled only against the
// headers, turns what create_runtime() returns into an nvinfer1::IRuntime.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nvclip {

// Where to look. Candidates, in order: `library` when given (only it); else the path in the
// environment variable TrtLibrary::kLibraryEnv when set (only it); else every folder of `dirs`
// joined with every default name, then every default name as the dynamic loader finds it
// (LD_LIBRARY_PATH, the executable's RUNPATH, the system's library cache).
struct TrtLibrarySearch {
  std::string library;            // a path (or a file name for the dynamic loader to find)
  std::vector<std::string> dirs;  // e.g. the `tensorrt_libs` folder where `pip install tensorrt` puts it
};

// What a runtime library can run: the full runtime any plan of its version; the lean and dispatch
// runtimes only plans built version-compatible.
enum class TrtRuntimeKind : int32_t { kFull = 0, kLean = 1, kDispatch = 2 };

const char* trt_runtime_kind_name(TrtRuntimeKind kind);  // "full" | "lean" | "dispatch"

// The kind a library file's name says (libnvinfer_lean.so.N, libnvinfer_dispatch.so.N; else full).
TrtRuntimeKind trt_runtime_kind_of(const std::string& path);

class TrtLibrary {
 public:
  static constexpr const char* kLibraryEnv = "NVCLIP_FAST_TENSORRT_LIB";

  // libnvinfer.so.<MAJOR>, for the major version of the TensorRT headers this build was compiled
  // with (10.x headers cannot drive 11.x libraries); in a build without them, for every major this
  // source supports (the library can then be found and reported, not run).
  static std::vector<std::string> default_names();
  // The majors a loaded library may have (the same rule).
  static std::vector<int32_t> accepted_majors();

  // Loads the first candidate (see TrtLibrarySearch) that dlopen opens, that exports
  // createInferRuntime_INTERNAL and getInferLibVersion, and whose major version is accepted.
  // TensorRT allows one runtime library per process: the first one loaded stays, later calls
  // return it, and a call naming another library (argument or environment) fails. Throws
  // EngineError listing every candidate tried and why each failed.
  static const TrtLibrary& load(const TrtLibrarySearch& search = {});

  // createInferRuntime_INTERNAL(logger, header_version): `logger` is an nvinfer1::ILogger*, the
  // result an nvinfer1::IRuntime* (or null). The caller checks for a CUDA device first: without a
  // driver TensorRT logs an error and returns a non-null, unusable pointer.
  void* create_runtime(void* logger, int32_t header_version) const;

  const std::string& path() const { return path_; }  // the file loaded
  int32_t version() const { return version_; }  // getInferLibVersion(): MAJOR*10000 + MINOR*100 + PATCH
  std::string version_string() const;            // "10.16.1"
  TrtRuntimeKind kind() const { return kind_; }

 private:
  using CreateRuntimeFn = void* (*)(void* logger, int32_t version);
  TrtLibrary(void* handle, std::string requested);

  void* handle_ = nullptr;
  std::string requested_;  // the candidate that was opened (a path, or a name the loader searched for)
  std::string path_;
  CreateRuntimeFn create_runtime_ = nullptr;
  int32_t version_ = 0;
  TrtRuntimeKind kind_ = TrtRuntimeKind::kFull;
};

}  // namespace nvclip
