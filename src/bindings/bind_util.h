// Helpers shared by the binding files (never included by the runtime itself).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "engine.h"
#include "errors.h"
#include "image.h"

namespace nvclip {

// The numpy dtype of a tensor dtype. numpy has no bfloat16: such tensors cannot be shown to Python
// as numpy arrays (EngineError).
inline pybind11::dtype numpy_dtype(TensorDType dtype) {
  if (dtype == TensorDType::kBFloat16) {
    throw EngineError("bfloat16 tensors cannot be passed to Python as numpy arrays (numpy has no bfloat16)");
  }
  return pybind11::dtype(dtype_name(dtype));
}

// A numpy array over memory the caller keeps alive as long as `owner` lives: no copy.
inline pybind11::array numpy_view(TensorDType dtype, const std::vector<int64_t>& shape, const void* data,
                                  pybind11::handle owner, bool writeable) {
  std::vector<pybind11::ssize_t> dims(shape.begin(), shape.end());
  pybind11::array array(numpy_dtype(dtype), dims, {}, data, owner);  // C-contiguous strides
  if (!writeable) array.attr("setflags")(pybind11::arg("write") = false);
  return array;
}

// An image given as its pixel pointer, sizes and row stride (in bytes), with packed pixels, checked
// (image_view_error): std::invalid_argument "images[i]: ..." when it cannot be read.
ImageView checked_image_view(const void* data, int64_t height, int64_t width, int64_t channels, int64_t row_stride,
                             size_t i);

// The one way Python images become ImageViews: numpy uint8 arrays, HW (gray) or HWC (C = 1 or 3),
// pixels packed within a row (channel stride 1, pixel stride C), any row stride >= a row. Other
// layouts are refused, not copied (nvclip_fast's Python layer packs what it decodes). TypeError for
// a non-array, ValueError (std::invalid_argument) naming the index for anything else. `arrays`
// keeps the arrays alive, so the views stay valid without the GIL while the caller holds it.
struct NumpyImages {
  std::vector<pybind11::array> arrays;
  std::vector<ImageView> views;
};
NumpyImages numpy_images(const pybind11::sequence& images);

// The data of `out` after checking that it can take resize_normalize's n x 3 x size x size output
// in `dtype` (std::invalid_argument "out: ..." otherwise).
void* preprocess_output(pybind11::array& out, int64_t n, const PreprocessParams& params, OutputDType dtype);

}  // namespace nvclip
