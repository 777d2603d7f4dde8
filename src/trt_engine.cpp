#include "trt_engine.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "cuda_util.h"
#include "errors.h"
#include "trt_library.h"

static_assert(NV_TENSORRT_MAJOR == NVCLIP_TENSORRT_MAJOR, "CMake read another TensorRT major than the headers have");

namespace nvclip {

namespace {

// TensorRT's data types that have a TensorDType; the rest (FP8, INT4, FP4, E8M0) cannot be engine
// I/O for this runtime.
std::optional<TensorDType> from_trt(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return TensorDType::kFloat32;
    case nvinfer1::DataType::kHALF: return TensorDType::kFloat16;
    case nvinfer1::DataType::kBF16: return TensorDType::kBFloat16;
    case nvinfer1::DataType::kINT8: return TensorDType::kInt8;
    case nvinfer1::DataType::kUINT8: return TensorDType::kUInt8;
    case nvinfer1::DataType::kINT32: return TensorDType::kInt32;
    case nvinfer1::DataType::kINT64: return TensorDType::kInt64;
    case nvinfer1::DataType::kBOOL: return TensorDType::kBool;
    default: return std::nullopt;
  }
}

std::vector<int64_t> to_shape(const nvinfer1::Dims& dims) {
  if (dims.nbDims < 0) return {};
  return std::vector<int64_t>(dims.d, dims.d + dims.nbDims);
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape) {
  nvinfer1::Dims dims{};
  dims.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size() && i < static_cast<size_t>(nvinfer1::Dims::MAX_DIMS); ++i) dims.d[i] = shape[i];
  return dims;
}

std::string dims_string(const nvinfer1::Dims& dims) {
  std::ostringstream out;
  out << "[";
  for (int32_t i = 0; i < dims.nbDims; ++i) out << (i ? ", " : "") << dims.d[i];
  out << "]";
  return out.str();
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) {
    throw EngineError("cannot read TensorRT plan '" + path + "': " + std::strerror(errno));
  }
  const std::streamsize size = file.tellg();
  if (size <= 0) throw EngineError("TensorRT plan '" + path + "' is empty");
  std::vector<char> blob(static_cast<size_t>(size));
  file.seekg(0);
  if (!file.read(blob.data(), size)) throw EngineError("cannot read TensorRT plan '" + path + "': read failed");
  return blob;
}


}  // namespace

// ------------------------------------------------------------------------------------------------
// TrtLogger

void TrtLogger::log(Severity severity, const char* msg) noexcept {
  if (severity == Severity::kINTERNAL_ERROR || severity == Severity::kERROR) {
    capture_.error(msg);
  } else if (severity == Severity::kWARNING) {
    capture_.warning(msg);
  }
}

// ------------------------------------------------------------------------------------------------
// TrtEngine

void TrtEngine::fail(const std::string& what) {
  const std::string logged = logger_->capture().take_errors();
  throw EngineError("TensorRT plan '" + path_ + "': " + what +
                    (logged.empty() ? std::string() : " (TensorRT: " + logged + ")"));
}

TrtEngine::TrtEngine(const std::string& plan_path, const TrtEngineOptions& options)
    : path_(plan_path), logger_(std::make_unique<TrtLogger>()) {
  LogCapture::Scope scope(logger_->capture());
  const std::vector<char> blob = read_file(plan_path);
  if (options.device < 0 || cuda_device_count() <= options.device) {
    throw EngineError("cannot run TensorRT plan '" + plan_path + "' on cuda:" + std::to_string(options.device) +
                      ": " + (cuda_device_count() == 0 ? cuda_unavailable_reason()
                                                       : "only " + std::to_string(cuda_device_count()) +
                                                             " CUDA device(s)"));
  }
  library_ = &TrtLibrary::load(options.library);
  CudaDeviceScope device(options.device);

  auto* runtime = static_cast<nvinfer1::IRuntime*>(
      library_->create_runtime(static_cast<nvinfer1::ILogger*>(logger_.get()), NV_TENSORRT_VERSION));
  const std::string runtime_errors = logger_->capture().take_errors();
  if (runtime == nullptr || !runtime_errors.empty()) {
    // Deliberately not deleted: with a broken CUDA setup TensorRT returns a non-null pointer that is
    // not an object; leaking one handle beats crashing the process.
    throw EngineError("TensorRT (" + library_->path() + ") could not create a runtime for '" + path_ + "'" +
                      (runtime_errors.empty() ? std::string() : ": " + runtime_errors));
  }
  runtime_.reset(runtime);
  const TrtRuntimeKind kind = library_->kind();
  if (kind != TrtRuntimeKind::kFull) {
    // Version-compatible plans carry the lean runtime as host code, which TensorRT refuses unless
    // allowed; these libraries run no other plans.
    runtime_->setEngineHostCodeAllowed(true);
  }
  engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine_) {
    if (kind != TrtRuntimeKind::kFull) {
      fail(std::string("deserialization failed: the TensorRT ") + trt_runtime_kind_name(kind) + " runtime " +
           library_->path() + " runs only plans built version-compatible (nvclip-fast export "
           "--version-compatible, trtexec --versionCompatible)");
    }
    fail("deserialization failed (a plan only loads with the TensorRT version and GPU it was built for, "
         "unless built version- or hardware-compatible); TensorRT " + library_->version_string() + " at " +
         library_->path());
  }

  EngineInfo info;
  info.device = DeviceKind::kCuda;
  info.device_index = options.device;
  const char* dynamic_input = nullptr;
  const int32_t count = engine_->getNbIOTensors();
  for (int32_t i = 0; i < count; ++i) {
    const char* name = engine_->getIOTensorName(i);
    const nvinfer1::TensorIOMode mode = engine_->getTensorIOMode(name);
    const nvinfer1::Dims dims = engine_->getTensorShape(name);
    const std::string where = "tensor '" + std::string(name) + "' " + dims_string(dims);
    const std::optional<TensorDType> dtype = from_trt(engine_->getTensorDataType(name));
    if (!dtype) {
      fail(where + " has data type " + std::to_string(static_cast<int32_t>(engine_->getTensorDataType(name))) +
           ", which this runtime cannot pass (expected float32/float16/bfloat16/int8/uint8/int32/int64/bool)");
    }
    if (engine_->getTensorLocation(name) != nvinfer1::TensorLocation::kDEVICE) {
      fail(where + " lives in host memory (a shape tensor?); only device tensors are supported");
    }
    if (engine_->getTensorFormat(name) != nvinfer1::TensorFormat::kLINEAR) {
      fail(where + " has a vectorized memory format; build the plan with linear I/O formats");
    }
    if (dims.nbDims < 1) fail(where + " has no batch dimension");
    for (int32_t d = 1; d < dims.nbDims; ++d) {
      if (dims.d[d] < 0) fail(where + ": only the batch dimension (0) may be dynamic");
    }
    TensorSpec spec{name, *dtype, to_shape(dims)};
    if (mode == nvinfer1::TensorIOMode::kINPUT) {
      info.inputs.push_back(spec);
      if (dims.d[0] < 0) dynamic_input = name;
      input_dims_ = dims;
    } else if (mode == nvinfer1::TensorIOMode::kOUTPUT) {
      info.outputs.push_back(spec);
    }
  }
  if (info.inputs.size() != 1) {
    fail("has " + std::to_string(info.inputs.size()) + " inputs; this runtime feeds exactly one (the images)");
  }
  if (dynamic_input != nullptr) {
    // Profile 0: every execution context starts on it, and the exporter builds one profile.
    const auto select = [&](nvinfer1::OptProfileSelector s) {
      return engine_->getProfileShape(dynamic_input, 0, s).d[0];
    };
    info.batch = {select(nvinfer1::OptProfileSelector::kMIN), select(nvinfer1::OptProfileSelector::kOPT),
                  select(nvinfer1::OptProfileSelector::kMAX)};
  } else {
    const int64_t fixed = input_dims_.d[0];
    info.batch = {fixed, fixed, fixed};
  }
  try {
    set_info(std::move(info));
  } catch (const std::exception& e) {
    fail(std::string("unsupported I/O: ") + e.what());
  }
}

TrtEngine::~TrtEngine() {
  if (!contexts_.empty() || engine_) {
    // TensorRT frees device memory on the engine's device.
    try {
      CudaDeviceScope device(info().device_index);
      contexts_.clear();
      engine_.reset();
    } catch (...) {
      contexts_.clear();
      engine_.reset();
    }
  }
}

int64_t TrtEngine::context_memory_bytes() const {
#if NV_TENSORRT_MAJOR > 10 || NV_TENSORRT_MINOR >= 1
  return engine_->getDeviceMemorySizeV2();
#else
  return static_cast<int64_t>(engine_->getDeviceMemorySize());  // 10.0 has only the size_t form
#endif
}

void TrtEngine::prepare_slots(int32_t slots) {
  LogCapture::Scope scope(logger_->capture());
  CudaDeviceScope device(info().device_index);
  while (static_cast<int32_t>(contexts_.size()) < slots) {
    // kSTATIC (the default): the context allocates the activation memory of the profile's largest
    // batch now, so that no enqueue allocates.
    std::unique_ptr<nvinfer1::IExecutionContext> context(engine_->createExecutionContext());
    if (!context) {
      constexpr double kMiB = 1024.0 * 1024.0;
      size_t free_bytes = 0;
      size_t total_bytes = 0;
      const bool known = cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess;
      cudaGetLastError();
      std::ostringstream why;
      why.precision(1);
      why << std::fixed << "createExecutionContext failed for stream slot " << contexts_.size() << " of " << slots
          << ": each context allocates " << context_memory_bytes() / kMiB
          << " MiB of device memory (the activations of the plan's largest batch, " << info().batch.max << "), "
          << slots << " slots need " << slots * (context_memory_bytes() / kMiB) << " MiB";
      if (known) {
        why << "; cuda:" << info().device_index << " has " << free_bytes / kMiB << " MiB free of "
            << total_bytes / kMiB;
      }
      why << " (use fewer streams, or a plan built with a smaller --max-batch)";
      fail(why.str());
    }
    contexts_.push_back(std::move(context));
  }
  if (!contexts_.empty()) set_batch(*contexts_.front(), info().batch.max);  // a plan that cannot follow fails now
}

void TrtEngine::set_batch(nvinfer1::IExecutionContext& context, int64_t batch) {
  const EngineInfo& io = info();
  nvinfer1::Dims dims = input_dims_;
  dims.d[0] = batch;
  if (!context.setInputShape(io.inputs[0].name.c_str(), dims)) {
    fail("setInputShape('" + io.inputs[0].name + "', " + dims_string(dims) + ") failed");
  }
  for (const TensorSpec& out : io.outputs) {
    // The queue reads `batch` rows of every output: TensorRT must write exactly those.
    const nvinfer1::Dims got = context.getTensorShape(out.name.c_str());
    std::vector<int64_t> want = out.shape;
    want[0] = batch;
    if (to_shape(got) != want) {
      fail("output '" + out.name + "' has shape " + dims_string(got) + " for a batch of " + std::to_string(batch) +
           " rows of '" + io.inputs[0].name + "'; expected " + dims_string(to_dims(want)) +
           " (every output's first dimension must be the input's batch)");
    }
  }
}

void TrtEngine::enqueue(const EngineCall& call) {
  if (call.slot < 0 || static_cast<size_t>(call.slot) >= contexts_.size()) {
    throw EngineError("TrtEngine::enqueue: slot " + std::to_string(call.slot) + " has no execution context (" +
                      std::to_string(contexts_.size()) + " prepared)");
  }
  LogCapture::Scope scope(logger_->capture());
  nvinfer1::IExecutionContext& context = *contexts_[static_cast<size_t>(call.slot)];
  const EngineInfo& io = info();
  set_batch(context, call.batch);
  if (!context.setInputTensorAddress(io.inputs[0].name.c_str(), call.inputs[0])) {
    fail("setInputTensorAddress('" + io.inputs[0].name + "') failed");
  }
  for (size_t i = 0; i < io.outputs.size(); ++i) {
    if (!context.setTensorAddress(io.outputs[i].name.c_str(), call.outputs[i])) {
      fail("setTensorAddress('" + io.outputs[i].name + "') failed");
    }
  }
  if (!context.enqueueV3(static_cast<cudaStream_t>(call.stream))) {
    fail("enqueueV3 failed (batch " + std::to_string(call.batch) + ", slot " + std::to_string(call.slot) + ")");
  }
}

}  // namespace nvclip
