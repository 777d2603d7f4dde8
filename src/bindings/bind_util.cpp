#include "bind_util.h"

#include <cstdint>
#include <limits>
#include <stdexcept>

#include "normalize.h"
#include "preprocess_stage.h"

namespace py = pybind11;

namespace nvclip {

namespace {

std::string where(size_t i) { return "images[" + std::to_string(i) + "]: "; }

}  // namespace

ImageView checked_image_view(const void* data, int64_t height, int64_t width, int64_t channels, int64_t row_stride,
                             size_t i) {
  const auto fits = [](int64_t v) { return v >= 0 && v <= std::numeric_limits<int32_t>::max(); };
  if (!fits(height) || !fits(width) || !fits(channels)) {
    throw std::invalid_argument(where(i) + "sides and channels must be in [0, 2^31), got " + std::to_string(height) +
                                "x" + std::to_string(width) + "x" + std::to_string(channels));
  }
  const ImageView view{static_cast<const uint8_t*>(data), static_cast<int32_t>(height), static_cast<int32_t>(width),
                       static_cast<int32_t>(channels), row_stride};
  if (const std::string why = image_view_error(view); !why.empty()) throw std::invalid_argument(where(i) + why);
  return view;
}

NumpyImages numpy_images(const py::sequence& images) {
  NumpyImages out;
  const auto n = static_cast<size_t>(py::len(images));
  out.arrays.reserve(n);
  out.views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const py::object item = images[i];
    if (!py::isinstance<py::array>(item)) {
      throw py::type_error(where(i) + "expected a numpy uint8 array (HWC RGB or HW gray), got " +
                           std::string(py::str(py::type::handle_of(item).attr("__name__"))));
    }
    auto a = py::reinterpret_borrow<py::array>(item);
    if (a.dtype().kind() != 'u' || a.itemsize() != 1) {
      throw std::invalid_argument(where(i) + "expected uint8 pixels, got " + std::string(py::str(a.dtype())));
    }
    if (a.ndim() != 2 && a.ndim() != 3) {
      throw std::invalid_argument(where(i) + "expected an (H, W) or (H, W, C) array, got " +
                                  std::to_string(a.ndim()) + " dimensions");
    }
    const int64_t channels = a.ndim() == 3 ? a.shape(2) : 1;
    const ImageView view = checked_image_view(a.data(), a.shape(0), a.shape(1), channels, a.strides(0), i);
    const bool packed = a.strides(1) == channels && (a.ndim() == 2 || a.strides(2) == 1);
    if (!packed) throw std::invalid_argument(where(i) + "pixels must be packed (channel stride 1, pixel stride C)");
    out.views.push_back(view);
    out.arrays.push_back(std::move(a));
  }
  return out;
}

void* preprocess_output(py::array& out, int64_t n, const PreprocessParams& params, OutputDType dtype) {
  const py::dtype want = dtype == OutputDType::kFloat16 ? py::dtype("float16") : py::dtype::of<float>();
  if (!out.dtype().equal(want)) {
    throw std::invalid_argument("out: expected dtype " + std::string(py::str(want)) + ", got " +
                                std::string(py::str(out.dtype())));
  }
  const std::vector<py::ssize_t> shape{n, kOutputChannels, params.size, params.size};
  if (out.ndim() != 4 || std::vector<py::ssize_t>(out.shape(), out.shape() + 4) != shape) {
    throw std::invalid_argument("out: expected shape (" + std::to_string(n) + ", 3, " + std::to_string(params.size) +
                                ", " + std::to_string(params.size) + ")");
  }
  if (!(out.flags() & py::array::c_style)) throw std::invalid_argument("out: must be C-contiguous");
  if (!out.writeable()) throw std::invalid_argument("out: must be writeable");
  return out.mutable_data();
}

}  // namespace nvclip
