// Error types shared by the runtime; EngineError is registered as nvclip_fast.EngineError.
#pragma once

#include <stdexcept>
#include <string>

namespace nvclip {

// A failure of an engine, the CUDA runtime or TensorRT (not of the caller's input).
class EngineError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace nvclip
