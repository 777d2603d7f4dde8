// Helpers shared by the binding files (never included by the runtime itself).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "engine.h"
#include "errors.h"

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

}  // namespace nvclip
