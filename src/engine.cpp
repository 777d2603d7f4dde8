#include "engine.h"

#include <set>
#include <sstream>
#include <stdexcept>

#include "errors.h"

namespace nvclip {

namespace {

struct DTypeEntry {
  TensorDType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {TensorDType::kFloat32, "float32", 4}, {TensorDType::kFloat16, "float16", 2},
    {TensorDType::kBFloat16, "bfloat16", 2}, {TensorDType::kInt8, "int8", 1},
    {TensorDType::kUInt8, "uint8", 1},     {TensorDType::kInt32, "int32", 4},
    {TensorDType::kInt64, "int64", 8},     {TensorDType::kBool, "bool", 1},
};

const DTypeEntry& entry(TensorDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  throw std::invalid_argument("unknown TensorDType " + std::to_string(static_cast<int32_t>(dtype)));
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

}  // namespace

const char* device_kind_name(DeviceKind kind) { return kind == DeviceKind::kCuda ? "cuda" : "cpu"; }

DeviceKind device_kind_from_name(const std::string& name) {
  if (name == "cpu") return DeviceKind::kCpu;
  if (name == "cuda") return DeviceKind::kCuda;
  throw std::invalid_argument("device must be 'cpu' or 'cuda', got '" + name + "'");
}

size_t dtype_size(TensorDType dtype) { return entry(dtype).size; }

const char* dtype_name(TensorDType dtype) { return entry(dtype).name; }

TensorDType dtype_from_name(const std::string& name) {
  std::string names;
  for (const auto& e : kDTypes) {
    if (name == e.name) return e.dtype;
    names += names.empty() ? e.name : std::string(", ") + e.name;
  }
  throw std::invalid_argument("unknown tensor dtype '" + name + "' (expected one of " + names + ")");
}

size_t TensorSpec::row_bytes() const {
  if (shape.empty()) {
    throw std::invalid_argument("tensor " + to_string() + " has no batch dimension (rank 0)");
  }
  size_t elements = 1;
  for (size_t i = 1; i < shape.size(); ++i) {
    if (shape[i] <= 0) {
      throw std::invalid_argument("tensor " + to_string() + ": dimension " + std::to_string(i) +
                                  " must be a fixed positive size (only the batch dimension may be dynamic)");
    }
    elements *= static_cast<size_t>(shape[i]);
  }
  return elements * dtype_size(dtype);
}

std::string TensorSpec::to_string() const {
  return name + ": " + dtype_name(dtype) + shape_string(shape);
}

void EngineInfo::validate() const {
  if (inputs.empty()) throw std::invalid_argument("engine describes no input tensor");
  if (outputs.empty()) throw std::invalid_argument("engine describes no output tensor");
  std::set<std::string> names;
  for (const auto* list : {&inputs, &outputs}) {
    for (const auto& spec : *list) {
      if (spec.name.empty()) throw std::invalid_argument("engine tensor with an empty name");
      if (!names.insert(spec.name).second) {
        throw std::invalid_argument("engine tensor name '" + spec.name + "' appears twice");
      }
      (void)spec.row_bytes();  // rank >= 1 and fixed non-batch dimensions
      const int64_t batch_dim = spec.shape[0];
      if (batch_dim != kDynamicDim && batch_dim <= 0) {
        throw std::invalid_argument("tensor " + spec.to_string() + ": the batch dimension must be " +
                                    std::to_string(kDynamicDim) + " (dynamic) or a positive size");
      }
      if (batch_dim > 0 && (batch_dim < batch.min || batch_dim > batch.max)) {
        throw std::invalid_argument("tensor " + spec.to_string() + " has a fixed batch of " +
                                    std::to_string(batch_dim) + " outside the batch profile [" +
                                    std::to_string(batch.min) + ", " + std::to_string(batch.max) + "]");
      }
    }
  }
  if (!(1 <= batch.min && batch.min <= batch.opt && batch.opt <= batch.max)) {
    throw std::invalid_argument("batch profile (min " + std::to_string(batch.min) + ", opt " +
                                std::to_string(batch.opt) + ", max " + std::to_string(batch.max) +
                                ") must satisfy 1 <= min <= opt <= max");
  }
  if (device_index < 0) {
    throw std::invalid_argument("device index must be >= 0, got " + std::to_string(device_index));
  }
}

const TensorSpec& EngineInfo::output(const std::string& name) const {
  std::string names;
  for (const auto& spec : outputs) {
    if (spec.name == name) return spec;
    names += (names.empty() ? "'" : ", '") + spec.name + "'";
  }
  throw std::invalid_argument("engine has no output named '" + name + "' (outputs: " + names + ")");
}

BatchProfile EngineInfo::call_batches() const {
  const int64_t fixed = inputs.empty() ? kDynamicDim : inputs.front().shape.front();
  return fixed > 0 ? BatchProfile{fixed, fixed, fixed} : batch;
}

std::string EngineInfo::device_name() const {
  return device == DeviceKind::kCuda ? "cuda:" + std::to_string(device_index) : device_kind_name(device);
}

Engine::Engine(EngineInfo info) { set_info(std::move(info)); }

void Engine::set_info(EngineInfo info) {
  info.validate();
  info_ = std::move(info);
}

void Engine::attach(int32_t slots) {
  if (attached_.exchange(true)) {
    throw EngineError("this engine already serves a BatchQueue; close that queue first (an engine "
                      "runs one queue's stream slots)");
  }
  try {
    prepare_slots(slots);
  } catch (...) {
    attached_ = false;
    throw;
  }
}

void Engine::detach() { attached_ = false; }

}  // namespace nvclip
