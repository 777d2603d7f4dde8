// _C.resize_normalize (CPU twin), _C.ResizeNormalizeCuda (CUDA path), ResizeNormalizeStage and the
// parameter types. nvclip_fast/preprocess.py prepares the arguments; these re-check what native
// code relies on.
#include <pybind11/stl.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "bind_util.h"
#include "bindings.h"
#include "resize_normalize.h"
#include "resize_normalize_stage.h"
#include "resize_plan.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace nvclip {

namespace {

std::array<float, 3> get3(const float (&v)[3]) { return {v[0], v[1], v[2]}; }
void set3(float (&v)[3], const std::array<float, 3>& a) {
  for (int c = 0; c < 3; ++c) v[c] = a[c];
}

}  // namespace

void bind_resize_normalize(py::module_& m) {
  py::enum_<Interpolation>(m, "Interpolation")
      .value("bilinear", Interpolation::kBilinear)
      .value("bicubic", Interpolation::kBicubic);
  py::enum_<ResizeMode>(m, "ResizeMode")
      .value("shortest", ResizeMode::kShortest)
      .value("longest", ResizeMode::kLongest)
      .value("squash", ResizeMode::kSquash);
  py::enum_<PassOrder>(m, "PassOrder")
      .value("pillow13", PassOrder::kPillow13)
      .value("pillow12_2", PassOrder::kPillow122)
      .value("pillow12_1", PassOrder::kPillow121);
  py::enum_<OutputDType>(m, "OutputDType")
      .value("float32", OutputDType::kFloat32)
      .value("float16", OutputDType::kFloat16);

  py::class_<PreprocessParams>(m, "PreprocessParams")
      .def(py::init<>())
      .def_readwrite("size", &PreprocessParams::size)
      .def_property(
          "mean", [](const PreprocessParams& p) { return get3(p.mean); },
          [](PreprocessParams& p, const std::array<float, 3>& v) { set3(p.mean, v); })
      .def_property(
          "std", [](const PreprocessParams& p) { return get3(p.std); },
          [](PreprocessParams& p, const std::array<float, 3>& v) { set3(p.std, v); })
      .def_readwrite("interpolation", &PreprocessParams::interpolation)
      .def_readwrite("resize_mode", &PreprocessParams::resize_mode)
      .def_readwrite("fill", &PreprocessParams::fill)
      .def_readwrite("pass_order", &PreprocessParams::pass_order);

  m.def(
      "plan_resize",
      [](int32_t height, int32_t width, const PreprocessParams& params) {
        const ResizePlan plan = plan_resize(height, width, params);
        auto axis = [](const AxisPlan& a) { return py::make_tuple(a.resized, a.first, a.count, a.pad_before); };
        return py::make_tuple(axis(plan.y), axis(plan.x));
      },
      py::arg("height"), py::arg("width"), py::arg("params"),
      "open_clip's geometry for a height x width image: per axis (y, x) the resized size, the first "
      "resized pixel kept, how many are kept, and the padding before them. ValueError where open_clip fails.");

  m.def(
      "resize_normalize",
      [](const py::sequence& images, const PreprocessParams& params, OutputDType dtype, py::array out,
         int threads) {
        const NumpyImages arrays = numpy_images(images);
        const auto n = static_cast<int64_t>(arrays.views.size());
        void* dst = preprocess_output(out, n, params, dtype);
        const std::shared_ptr<ThreadPool> pool = ThreadPool::shared(threads);
        py::gil_scoped_release release;
        resize_normalize_cpu(arrays.views.data(), n, params, dtype, dst, *pool);
      },
      py::arg("images"), py::arg("params"), py::arg("dtype"), py::arg("out"), py::arg("threads"),
      "CPU twin: uint8 HWC arrays -> out (N, 3, S, S). threads <= 0: all available cores.");

  py::class_<ResizeNormalizeStage, PreprocessStage, py::smart_holder>(
      m, "ResizeNormalizeStage",
      "The batch queue's preprocessing: resize_normalize (open_clip's transform, Pillow-exact) into the engine "
      "input. device 'cpu' runs the CPU twin on `threads` threads (0: every core); 'cuda' the kernel.")
      .def(py::init([](const PreprocessParams& params, const std::string& device, int threads) {
             return std::make_shared<ResizeNormalizeStage>(params, device_kind_from_name(device), threads);
           }),
           py::arg("params"), py::arg("device") = "cpu", py::arg("threads") = 0)
      .def_property_readonly("params", &ResizeNormalizeStage::params)
      .def_property_readonly("threads", &ResizeNormalizeStage::threads);

#if NVCLIP_WITH_CUDA
  py::class_<ResizeNormalizeCuda>(m, "ResizeNormalizeCuda")
      .def(py::init<int64_t, int>(), py::arg("table_arena_bytes") = kDefaultTableArenaBytes,
           py::arg("min_blocks_per_sm") = kDefaultMinBlocksPerSm)
      .def_property_readonly("device", &ResizeNormalizeCuda::device)
      .def_property_readonly("min_blocks_per_sm", &ResizeNormalizeCuda::min_blocks_per_sm)
      .def(
          "enqueue",
          [](ResizeNormalizeCuda& self, const std::vector<std::array<int64_t, 5>>& images,
             const PreprocessParams& params, OutputDType dtype, uintptr_t out, uintptr_t stream) {
            // images: (data pointer, height, width, channels, row stride) of device memory.
            std::vector<ImageView> views;
            views.reserve(images.size());
            for (size_t i = 0; i < images.size(); ++i) {
              const auto& d = images[i];
              views.push_back(checked_image_view(reinterpret_cast<const void*>(static_cast<uintptr_t>(d[0])), d[1],
                                                 d[2], d[3], d[4], i));
            }
            py::gil_scoped_release release;
            self.enqueue(views.data(), static_cast<int64_t>(views.size()), params, dtype,
                         reinterpret_cast<void*>(out), reinterpret_cast<cudaStream_t>(stream));
          },
          py::arg("images"), py::arg("params"), py::arg("dtype"), py::arg("out"), py::arg("stream"),
          "Queue the batch on `stream`: images as (ptr, h, w, c, row_stride) tuples of device memory.");
#endif
}

}  // namespace nvclip
