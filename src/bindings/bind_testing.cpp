// nvclip_fast._C._testing: hooks for the test suite, not API. The CUDA path's logic run on the CPU
// (ResizeNormalizeEmulated) and the numbers the kernels are built from (normalize_table,
// float_to_half_bits), so that Python tests hold them against torch and Pillow.
#include <cstring>
#include <optional>

#include <pybind11/stl.h>

#include "bind_util.h"
#include "bindings.h"
#include "cuda_util.h"
#include "normalize.h"
#include "resize_normalize.h"
#include "resize_normalize_kernel.h"
#include "resize_plan.h"

namespace py = pybind11;

namespace nvclip {

void bind_testing(py::module_& m) {
  py::module_ t = m.def_submodule("_testing", "Test hooks of nvclip_fast's native core (not API).");

  t.def(
      "describe_cuda_unavailable",
      [](int device_count, const std::string& error_name, const std::string& error_message,
         bool insufficient_driver, bool no_device, int driver_version, int runtime_version,
         std::optional<std::string> visible_devices) {
        CudaProbe probe;
        probe.device_count = device_count;
        probe.error_name = error_name;
        probe.error_message = error_message;
        probe.insufficient_driver = insufficient_driver;
        probe.no_device = no_device;
        probe.driver_version = driver_version;
        probe.runtime_version = runtime_version;
        probe.visible_devices_set = visible_devices.has_value();
        probe.visible_devices = visible_devices.value_or("");
        return describe_cuda_unavailable(probe);
      },
      py::kw_only(), py::arg("device_count") = 0, py::arg("error_name") = "", py::arg("error_message") = "",
      py::arg("insufficient_driver") = false, py::arg("no_device") = false, py::arg("driver_version") = 0,
      py::arg("runtime_version") = 0, py::arg("visible_devices") = py::none(),
      "cuda_unavailable_reason's wording for a probe result (what the CUDA runtime reported).");

  py::class_<ResizeNormalizeEmulated>(t, "ResizeNormalizeEmulated",
                                      "The CUDA path (packing, table cache, kernel) run on the CPU.")
      .def(py::init<int64_t>(), py::arg("arena_bytes") = kDefaultTableArenaBytes)
      .def(
          "enqueue",
          [](ResizeNormalizeEmulated& self, const py::sequence& images, const PreprocessParams& params,
             OutputDType dtype, py::array out) {
            const NumpyImages arrays = numpy_images(images);
            const auto n = static_cast<int64_t>(arrays.views.size());
            void* dst = preprocess_output(out, n, params, dtype);
            py::gil_scoped_release release;
            self.enqueue(arrays.views.data(), n, params, dtype, dst);
          },
          py::arg("images"), py::arg("params"), py::arg("dtype"), py::arg("out"))
      .def_property_readonly("cached_tables", [](const ResizeNormalizeEmulated& self) {
        return self.packer().cached_tables();
      });

  t.def(
      "normalize_table",
      [](const PreprocessParams& params, OutputDType dtype) {
        const std::string bad = check_params(params);
        if (!bad.empty()) throw std::invalid_argument(bad);
        const NormalizeTable table = make_normalize_table(params, dtype);
        py::array_t<uint32_t> words({kOutputChannels, kLevels});
        std::memcpy(words.mutable_data(), &table.words[0][0], sizeof table.words);
        return words;
      },
      py::arg("params"), py::arg("dtype"), "The (3, 256) output words: float32 bits or float16 bits.");

  t.def(
      "float_to_half_bits",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> values) {
        py::array_t<uint16_t> bits(values.size());
        const float* src = values.data();
        uint16_t* dst = bits.mutable_data();
        for (py::ssize_t i = 0; i < values.size(); ++i) dst[i] = float_to_half_bits(src[i]);
        return bits;
      },
      py::arg("values"), "float32 -> float16 bits (round to nearest even), flattened.");
}

}  // namespace nvclip
