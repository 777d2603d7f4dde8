// Engine: what the BatchQueue runs once per batch. An engine describes its I/O tensors (EngineInfo)
// and enqueues one batch on a stream. Implementations: TrtEngine (C++, TensorRT), and engines written
// in Python (ONNX Runtime, PyTorch) through the pybind11 trampoline in bind_engine.cpp.
//
// This header has no CUDA dependency: streams travel as void* (a cudaStream_t for CUDA engines) so
// that CPU-only builds compile the same interface.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nvclip {

enum class DeviceKind : int32_t { kCpu = 0, kCuda = 1 };

const char* device_kind_name(DeviceKind kind);  // "cpu" | "cuda"
// Inverse of device_kind_name; throws std::invalid_argument naming the value.
DeviceKind device_kind_from_name(const std::string& name);

// Element types an engine tensor may have. Names follow numpy ("float32", ...).
enum class TensorDType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kUInt8 = 4,
  kInt32 = 5,
  kInt64 = 6,
  kBool = 7,
};

size_t dtype_size(TensorDType dtype);
const char* dtype_name(TensorDType dtype);
// Inverse of dtype_name; throws std::invalid_argument naming the value and the accepted names.
TensorDType dtype_from_name(const std::string& name);

// The batch dimension of a dynamic-batch tensor.
constexpr int64_t kDynamicDim = -1;

struct TensorSpec {
  std::string name;
  TensorDType dtype = TensorDType::kFloat32;
  std::vector<int64_t> shape;  // shape[0] is the batch: kDynamicDim, or a fixed batch size

  // Bytes of one batch row: prod(shape[1:]) * dtype_size. Throws std::invalid_argument when a
  // non-batch dimension is not a fixed positive size (the queue needs fixed rows).
  size_t row_bytes() const;
  std::string to_string() const;  // "pixels: float32[-1, 3, 224, 224]"
};

// The batch sizes an engine accepts (TensorRT's optimization profile for the batch dimension).
struct BatchProfile {
  int64_t min = 1;
  int64_t opt = 1;
  int64_t max = 1;
};

struct EngineInfo {
  DeviceKind device = DeviceKind::kCpu;
  int32_t device_index = 0;  // CUDA device ordinal; 0 for CPU engines
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  BatchProfile batch;

  // Throws std::invalid_argument when the description is inconsistent (no outputs, empty or
  // duplicate names, rank 0, a non-batch dimension that is not fixed, a profile with
  // !(1 <= min <= opt <= max), a fixed batch dimension outside the profile).
  void validate() const;
  const TensorSpec& output(const std::string& name) const;  // throws std::invalid_argument
  // The batch sizes a call may run: the profile, or {F, F, F} when the first input has a fixed batch F.
  BatchProfile call_batches() const;
  std::string device_name() const;  // "cpu" | "cuda:N"
};

// One batch for Engine::enqueue. Pointers follow EngineInfo's order of inputs and outputs and point
// to device memory for CUDA engines, host memory for CPU engines; each holds at least `batch` rows
// (row = TensorSpec::row_bytes()), rows contiguous.
struct EngineCall {
  int32_t slot = 0;    // which of the queue's stream slots issues the call (0 .. slots-1)
  int64_t batch = 0;   // rows to compute; within the engine's BatchProfile
  const void* const* inputs = nullptr;
  void* const* outputs = nullptr;
  void* stream = nullptr;  // cudaStream_t of the slot for CUDA engines; nullptr for CPU engines
};

class Engine {
 public:
  explicit Engine(EngineInfo info);
  virtual ~Engine() = default;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineInfo& info() const { return info_; }

  // Runs (CPU) or enqueues (CUDA) one batch. A CUDA engine must leave all of its work ordered on
  // call.stream when it returns (enqueued on it, or finished): the queue copies the outputs back on
  // that stream. Calls for different slots may run concurrently on different threads; calls for
  // one slot never overlap. Throws (EngineError or any std::exception) to fail the batch.
  virtual void enqueue(const EngineCall& call) = 0;

  // Called by BatchQueue: reserves the engine for one queue with `slots` stream slots (TensorRT
  // creates one execution context per slot). Throws EngineError if another queue holds it, since
  // two queues would issue concurrent calls on the same slot.
  void attach(int32_t slots);
  void detach();

 protected:
  Engine() = default;  // for engines that learn their I/O while constructing (TrtEngine)
  void set_info(EngineInfo info);
  // Per-engine preparation for `slots` concurrent slots (e.g. execution contexts); default none.
  virtual void prepare_slots(int32_t slots) { (void)slots; }

 private:
  EngineInfo info_;
  std::atomic<bool> attached_{false};
};

}  // namespace nvclip
