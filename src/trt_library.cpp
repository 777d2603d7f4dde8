#include "trt_library.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <memory>
#include <mutex>

#include "errors.h"

namespace nvclip {

namespace {

// The TensorRT majors whose headers this source compiles against (CMake accepts 10.x and 11.x).
constexpr int32_t kSupportedMajors[] = {11, 10};
constexpr int32_t kVersionPerMajor = 10000;  // getInferLibVersion(): MAJOR*10000 + MINOR*100 + PATCH
constexpr int32_t kVersionPerMinor = 100;

std::mutex g_mutex;
std::unique_ptr<TrtLibrary> g_library;  // one runtime library per process, never unloaded

std::string version_text(int32_t v) {
  return std::to_string(v / kVersionPerMajor) + "." + std::to_string(v % kVersionPerMajor / kVersionPerMinor) + "." +
         std::to_string(v % kVersionPerMinor);
}

std::string majors_text() {
  std::string text;
  for (int32_t m : TrtLibrary::accepted_majors()) text += (text.empty() ? "" : " or ") + std::to_string(m) + ".x";
  return text;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

// A candidate as the error lists it: a file name is searched for by the dynamic loader.
std::string where(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  return name + " (LD_LIBRARY_PATH, then the system's libraries)";
}

// dlerror() after a failed dlopen(name), without the name it starts with.
std::string dlopen_error(const std::string& name) {
  const char* why = dlerror();
  std::string text = why != nullptr ? why : "not found";
  if (text.rfind(name + ": ", 0) == 0) text.erase(0, name.size() + 2);
  return text;
}

// The candidates of a search, in order, and whether they are an explicit choice.
std::vector<std::string> candidates(const TrtLibrarySearch& search, bool* is_explicit) {
  *is_explicit = true;
  if (!search.library.empty()) return {search.library};
  const char* env = std::getenv(TrtLibrary::kLibraryEnv);
  if (env != nullptr && *env != '\0') return {env};
  *is_explicit = false;
  std::vector<std::string> out;
  const std::vector<std::string> names = TrtLibrary::default_names();
  for (const auto& dir : search.dirs) {
    for (const auto& name : names) out.push_back(join_path(dir, name));
  }
  out.insert(out.end(), names.begin(), names.end());
  return out;
}

}  // namespace

const char* trt_runtime_kind_name(TrtRuntimeKind kind) {
  switch (kind) {
    case TrtRuntimeKind::kLean: return "lean";
    case TrtRuntimeKind::kDispatch: return "dispatch";
    case TrtRuntimeKind::kFull: break;
  }
  return "full";
}

TrtRuntimeKind trt_runtime_kind_of(const std::string& path) {
  const std::string file = path.substr(path.find_last_of('/') + 1);
  if (file.find("nvinfer_lean") != std::string::npos) return TrtRuntimeKind::kLean;
  if (file.find("nvinfer_dispatch") != std::string::npos) return TrtRuntimeKind::kDispatch;
  return TrtRuntimeKind::kFull;
}

std::vector<int32_t> TrtLibrary::accepted_majors() {
  // NVCLIP_TENSORRT_MAJOR (CMake): the headers' major, 0 in a build without them.
  if (NVCLIP_TENSORRT_MAJOR != 0) return {NVCLIP_TENSORRT_MAJOR};
  return {std::begin(kSupportedMajors), std::end(kSupportedMajors)};
}

std::vector<std::string> TrtLibrary::default_names() {
  std::vector<std::string> names;
  for (int32_t major : accepted_majors()) names.push_back("libnvinfer.so." + std::to_string(major));
  return names;
}

TrtLibrary::TrtLibrary(void* handle, std::string requested)
    : handle_(handle), requested_(std::move(requested)), path_(requested_) {
  // The file the dynamic loader opened (a name it searched for resolves to a path).
  link_map* map = nullptr;
  if (dlinfo(handle_, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr && *map->l_name) {
    path_ = map->l_name;
  }
  kind_ = trt_runtime_kind_of(path_);
  create_runtime_ = reinterpret_cast<CreateRuntimeFn>(dlsym(handle_, "createInferRuntime_INTERNAL"));
  auto get_version = reinterpret_cast<int32_t (*)()>(dlsym(handle_, "getInferLibVersion"));
  if (create_runtime_ == nullptr || get_version == nullptr) {
    throw EngineError("not a TensorRT runtime library (createInferRuntime_INTERNAL or getInferLibVersion missing)");
  }
  version_ = get_version();
  for (int32_t major : accepted_majors()) {
    if (version_ / kVersionPerMajor == major) return;
  }
  throw EngineError("is TensorRT " + version_text(version_) + " but nvclip_fast was built for TensorRT " +
                    majors_text() + " (the major versions must match)");
}

std::string TrtLibrary::version_string() const { return version_text(version_); }

const TrtLibrary& TrtLibrary::load(const TrtLibrarySearch& search) {
  std::lock_guard<std::mutex> lock(g_mutex);
  bool is_explicit = false;
  const std::vector<std::string> names = candidates(search, &is_explicit);
  if (g_library) {
    if (is_explicit && names.front() != g_library->requested_ && names.front() != g_library->path_) {
      throw EngineError("TensorRT runtime " + g_library->path_ + " is already loaded; cannot also load " +
                        names.front() + " (one TensorRT runtime library per process)");
    }
    return *g_library;
  }
  std::string tried;
  for (const auto& name : names) {
    dlerror();
    void* handle = dlopen(name.c_str(), RTLD_LAZY | RTLD_LOCAL);
    if (handle == nullptr) {
      tried += "\n  " + where(name) + ": " + dlopen_error(name);
      continue;
    }
    try {
      g_library.reset(new TrtLibrary(handle, name));
      return *g_library;
    } catch (const EngineError& e) {
      dlclose(handle);
      tried += "\n  " + where(name) + ": " + e.what();
    }
  }
  const std::string source = !search.library.empty() ? "the library given"
                             : is_explicit            ? std::string("$") + kLibraryEnv
                                                      : "the default search";
  throw EngineError("could not load the TensorRT " + majors_text() + " runtime library (" + source +
                    "); tried:" + tried +
                    "\n(install TensorRT, e.g. `pip install tensorrt-cu13`, or set " + kLibraryEnv +
                    " to the path of libnvinfer.so.N)");
}

void* TrtLibrary::create_runtime(void* logger, int32_t header_version) const {
  return create_runtime_(logger, header_version);
}

}  // namespace nvclip
