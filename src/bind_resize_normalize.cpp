// _C.resize_normalize (CPU twin), _C.ResizeNormalizeCuda (CUDA path), the parameter types, and
// the test hooks (_C.ResizeNormalizeEmulated, _C.normalize_table, _C.float_to_half_bits).
// nvclip_fast/preprocess.py prepares the arguments; these re-check what native code relies on.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "normalize.h"
#include "resize_normalize.h"
#include "resize_normalize_stage.h"
#include "resize_plan.h"
#include "resize_normalize_kernel.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace nvclip {

namespace {

std::string item(size_t i) { return "images[" + std::to_string(i) + "]: "; }

// A view of a uint8 HWC (or HW) numpy array; refuses layouts the native loops cannot read.
ImageView host_view(const py::array& a, size_t i) {
  if (a.dtype().kind() != 'u' || a.itemsize() != 1) {
    throw std::invalid_argument(item(i) + "expected uint8 pixels, got " + std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 2 && a.ndim() != 3) {
    throw std::invalid_argument(item(i) + "expected an (H, W) or (H, W, C) array, got " + std::to_string(a.ndim()) +
                                " dimensions");
  }
  ImageView v;
  v.data = static_cast<const uint8_t*>(a.data());
  v.height = static_cast<int32_t>(a.shape(0));
  v.width = static_cast<int32_t>(a.shape(1));
  v.channels = a.ndim() == 3 ? static_cast<int32_t>(a.shape(2)) : 1;
  v.row_stride = a.strides(0);
  if (a.shape(0) == 0 || a.shape(1) == 0) {  // numpy gives empty arrays zero strides: check first
    throw std::invalid_argument(item(i) + "image is empty (" + std::to_string(a.shape(0)) + "x" +
                                std::to_string(a.shape(1)) + ")");
  }
  if (a.shape(0) > kMaxImageSide || a.shape(1) > kMaxImageSide) {
    throw std::invalid_argument(item(i) + "image sides must be at most " + std::to_string(kMaxImageSide));
  }
  const bool packed_pixels = a.ndim() == 2 ? a.strides(1) == 1 : (a.strides(2) == 1 && a.strides(1) == v.channels);
  if (!packed_pixels) throw std::invalid_argument(item(i) + "pixels must be packed (channel stride 1, pixel stride C)");
  return v;  // channels, sizes and row_stride are checked with the batch (plan_batch)
}

std::vector<ImageView> host_views(const std::vector<py::array>& images) {
  std::vector<ImageView> views;
  views.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) views.push_back(host_view(images[i], i));
  return views;
}

void check_output(const py::array& out, int64_t n, const PreprocessParams& p, OutputDType dtype) {
  const bool f16 = dtype == OutputDType::kFloat16;
  const py::dtype want = f16 ? py::dtype("float16") : py::dtype::of<float>();
  if (!out.dtype().is(want) && !out.dtype().equal(want)) {
    throw std::invalid_argument("out: expected dtype " + std::string(py::str(want)) + ", got " +
                                std::string(py::str(out.dtype())));
  }
  const std::vector<py::ssize_t> shape{n, kOutputChannels, p.size, p.size};
  if (out.ndim() != 4 || std::vector<py::ssize_t>(out.shape(), out.shape() + 4) != shape) {
    throw std::invalid_argument("out: expected shape (" + std::to_string(n) + ", 3, " + std::to_string(p.size) + ", " +
                                std::to_string(p.size) + ")");
  }
  if (!(out.flags() & py::array::c_style)) throw std::invalid_argument("out: must be C-contiguous");
  if (!out.writeable()) throw std::invalid_argument("out: must be writeable");
}

ThreadPool& pool_for(int threads) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  const int size = threads > 0 ? threads : ThreadPool::available_cores();
  std::lock_guard<std::mutex> lock(mutex);
  auto& pool = pools[size];
  if (!pool) pool = std::make_unique<ThreadPool>(size);
  return *pool;
}

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
      [](const std::vector<py::array>& images, const PreprocessParams& params, OutputDType dtype, py::array out,
         int threads) {
        const std::vector<ImageView> views = host_views(images);
        const auto n = static_cast<int64_t>(views.size());
        check_output(out, n, params, dtype);
        ThreadPool& pool = pool_for(threads);
        void* dst = out.mutable_data();
        py::gil_scoped_release release;
        resize_normalize_cpu(views.data(), n, params, dtype, dst, pool);
      },
      py::arg("images"), py::arg("params"), py::arg("dtype"), py::arg("out"), py::arg("threads"),
      "CPU twin: uint8 HWC arrays -> out (N, 3, S, S). threads <= 0: all available cores.");

  py::class_<ResizeNormalizeEmulated>(m, "ResizeNormalizeEmulated",
                                      "The CUDA path (packing, table cache, kernel) run on the CPU; for tests.")
      .def(py::init<int64_t>(), py::arg("arena_bytes") = kDefaultTableArenaBytes)
      .def(
          "enqueue",
          [](ResizeNormalizeEmulated& self, const std::vector<py::array>& images, const PreprocessParams& params,
             OutputDType dtype, py::array out) {
            const std::vector<ImageView> views = host_views(images);
            const auto n = static_cast<int64_t>(views.size());
            check_output(out, n, params, dtype);
            void* dst = out.mutable_data();
            py::gil_scoped_release release;
            self.enqueue(views.data(), n, params, dtype, dst);
          },
          py::arg("images"), py::arg("params"), py::arg("dtype"), py::arg("out"))
      .def_property_readonly("cached_tables", [](const ResizeNormalizeEmulated& self) {
        return self.packer().cached_tables();
      });

  m.def(
      "normalize_table",
      [](const PreprocessParams& params, OutputDType dtype) {
        const std::string bad = check_params(params);
        if (!bad.empty()) throw std::invalid_argument(bad);
        const NormalizeTable t = make_normalize_table(params, dtype);
        py::array_t<uint32_t> words({kOutputChannels, kLevels});
        std::memcpy(words.mutable_data(), &t.words[0][0], sizeof t.words);
        return words;
      },
      py::arg("params"), py::arg("dtype"), "The (3, 256) output words: float32 bits or float16 bits.");

  m.def(
      "float_to_half_bits",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> values) {
        py::array_t<uint16_t> bits(values.size());
        const float* src = values.data();
        uint16_t* dst = bits.mutable_data();
        for (py::ssize_t i = 0; i < values.size(); ++i) dst[i] = float_to_half_bits(src[i]);
        return bits;
      },
      py::arg("values"), "float32 -> float16 bits (round to nearest even), flattened.");

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
              for (int k = 1; k <= 3; ++k) {
                if (d[k] < 1 || d[k] > kMaxImageSide) {
                  throw std::invalid_argument(item(i) + "height, width and channels must be in 1.." +
                                              std::to_string(kMaxImageSide));
                }
              }
              ImageView v;
              v.data = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(d[0]));
              v.height = static_cast<int32_t>(d[1]);
              v.width = static_cast<int32_t>(d[2]);
              v.channels = static_cast<int32_t>(d[3]);
              v.row_stride = d[4];
              views.push_back(v);
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
