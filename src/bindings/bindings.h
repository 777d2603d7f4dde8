// One bind_<concept>(module) per concept; module.cpp only calls them.
#pragma once

#include <pybind11/pybind11.h>

namespace nvclip {

void bind_errors(pybind11::module_& m);
void bind_build_info(pybind11::module_& m);
void bind_engine(pybind11::module_& m);       // TensorSpec, EngineInfo, Engine (+ trampoline), TrtEngine
void bind_batch_queue(pybind11::module_& m);  // PreprocessStage, Request, BatchQueue
void bind_resize_normalize(pybind11::module_& m);
void bind_testing(pybind11::module_& m);  // the private submodule _testing

}  // namespace nvclip
