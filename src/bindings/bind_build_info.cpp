#include <pybind11/stl.h>

#include "bindings.h"
#include "build_info.h"
#include "cuda_util.h"
#include "trt_library.h"

namespace py = pybind11;

namespace nvclip {

void bind_build_info(py::module_& m) {
  m.def("build_info", [] {
    const BuildInfo info = build_info();
    py::dict d;
    d["cuda"] = info.cuda;
    d["cuda_version"] = info.cuda_version;
    d["cuda_archs"] = info.cuda_archs;
    d["tensorrt"] = info.tensorrt;
    d["tensorrt_version"] = info.tensorrt_version;
    d["compiler"] = info.compiler;
    d["cpu_simd"] = info.cpu_simd;
    return d;
  }, "What this build was compiled with.");

  m.def("cuda_device_count", &cuda_device_count,
        "Usable CUDA devices (0 without a driver or GPU, or in a CPU-only build).");
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason,
        "Why no CUDA device is usable, or '' when one is.");
  m.def("cuda_device", [](int device) {
    const CudaDeviceInfo info = cuda_device_info(device);
    py::dict d;
    d["name"] = info.name;
    d["compute_capability"] = std::to_string(info.major) + "." + std::to_string(info.minor);
    return d;
  }, py::arg("device") = 0,
     "{'name', 'compute_capability'} of a CUDA device; raises EngineError where it is not usable.");

  m.def("tensorrt_library", [](const std::string& library, const std::vector<std::string>& search_dirs) {
    const TrtLibrary* loaded = nullptr;
    {
      py::gil_scoped_release release;
      loaded = &TrtLibrary::load(TrtLibrarySearch{library, search_dirs});
    }
    return py::make_tuple(loaded->path(), loaded->version_string(), trt_runtime_kind_name(loaded->kind()));
  }, py::arg("library") = "", py::arg("search_dirs") = std::vector<std::string>{},
     "Load the TensorRT runtime library (dlopen, once per process); returns (path, version, kind). "
     "Raises EngineError listing every place tried.");
}

}  // namespace nvclip
