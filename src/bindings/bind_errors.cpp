#include "bindings.h"
#include "errors.h"

namespace nvclip {

void bind_errors(pybind11::module_& m) {
  // C++ EngineError (engine, CUDA or TensorRT failures) arrives in Python as nvclip_fast.EngineError.
  pybind11::register_exception<EngineError>(m, "EngineError", PyExc_RuntimeError);
}

}  // namespace nvclip
