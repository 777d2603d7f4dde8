#include "engine_runner.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "errors.h"

namespace nvclip {

EngineRunner::EngineRunner(std::shared_ptr<Engine> engine) : engine_(std::move(engine)) {
  if (!engine_) throw std::invalid_argument("EngineRunner needs an engine");
  const EngineInfo& io = engine_->info();
  for (const auto& t : io.inputs) (void)t.row_bytes();  // fixed rows, or std::invalid_argument
  for (const auto& t : io.outputs) (void)t.row_bytes();
  engine_->attach(1);
#if NVCLIP_WITH_CUDA
  if (io.device == DeviceKind::kCuda) {
    try {
      NVCLIP_CUDA_CHECK(cudaSetDevice(io.device_index));
      cudaStream_t stream = nullptr;
      NVCLIP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      stream_ = stream;
    } catch (...) {
      engine_->detach();
      throw;
    }
  }
#endif
}

EngineRunner::~EngineRunner() {
#if NVCLIP_WITH_CUDA
  if (stream_ != nullptr) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
    cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  }
#endif
  engine_->detach();
}

int64_t EngineRunner::rows_for(int64_t batch) const {
  const EngineInfo& io = engine_->info();
  if (batch < 1 || batch > io.batch.max) {
    throw std::invalid_argument("batch must be in [1, " + std::to_string(io.batch.max) + "], got " +
                                std::to_string(batch));
  }
  const int64_t fixed = io.inputs.empty() ? kDynamicDim : io.inputs.front().shape.front();
  return fixed != kDynamicDim ? fixed : std::max(batch, io.batch.min);
}

void EngineRunner::run(int64_t batch, const void* const* inputs, void* const* outputs) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t rows = rows_for(batch);
  if (engine_->info().device == DeviceKind::kCuda) {
    run_cuda(rows, batch, inputs, outputs);
  } else {
    run_cpu(rows, batch, inputs, outputs);
  }
}

void EngineRunner::run_cpu(int64_t rows, int64_t batch, const void* const* inputs, void* const* outputs) {
  const EngineInfo& io = engine_->info();
  std::vector<const void*> in(inputs, inputs + io.inputs.size());
  std::vector<void*> out(outputs, outputs + io.outputs.size());
  if (rows != batch) {  // pad into scratch: zero rows after the caller's
    padded_.resize(io.inputs.size() + io.outputs.size());
    for (size_t i = 0; i < io.inputs.size(); ++i) {
      const size_t row = io.inputs[i].row_bytes();
      padded_[i].assign(static_cast<size_t>(rows) * row, 0);
      std::memcpy(padded_[i].data(), inputs[i], static_cast<size_t>(batch) * row);
      in[i] = padded_[i].data();
    }
    for (size_t o = 0; o < io.outputs.size(); ++o) {
      auto& buffer = padded_[io.inputs.size() + o];
      buffer.assign(static_cast<size_t>(rows) * io.outputs[o].row_bytes(), 0);
      out[o] = buffer.data();
    }
  }
  EngineCall call;
  call.slot = 0;
  call.batch = rows;
  call.inputs = in.data();
  call.outputs = out.data();
  engine_->enqueue(call);
  if (rows != batch) {
    for (size_t o = 0; o < io.outputs.size(); ++o) {
      std::memcpy(outputs[o], out[o], static_cast<size_t>(batch) * io.outputs[o].row_bytes());
    }
  }
}

#if NVCLIP_WITH_CUDA
namespace {
void ensure(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer = DeviceBuffer(bytes);
}
}  // namespace

void EngineRunner::run_cuda(int64_t rows, int64_t batch, const void* const* inputs, void* const* outputs) {
  const EngineInfo& io = engine_->info();
  NVCLIP_CUDA_CHECK(cudaSetDevice(io.device_index));
  auto stream = static_cast<cudaStream_t>(stream_);
  device_in_.resize(io.inputs.size());
  device_out_.resize(io.outputs.size());
  std::vector<const void*> in(io.inputs.size());
  std::vector<void*> out(io.outputs.size());
  try {
    for (size_t i = 0; i < io.inputs.size(); ++i) {
      const size_t row = io.inputs[i].row_bytes();
      ensure(device_in_[i], static_cast<size_t>(rows) * row);
      if (rows != batch) {
        NVCLIP_CUDA_CHECK(cudaMemsetAsync(device_in_[i].data(), 0, static_cast<size_t>(rows) * row, stream));
      }
      NVCLIP_CUDA_CHECK(cudaMemcpyAsync(device_in_[i].data(), inputs[i], static_cast<size_t>(batch) * row,
                                        cudaMemcpyHostToDevice, stream));
      in[i] = device_in_[i].data();
    }
    for (size_t o = 0; o < io.outputs.size(); ++o) {
      ensure(device_out_[o], static_cast<size_t>(rows) * io.outputs[o].row_bytes());
      out[o] = device_out_[o].data();
    }
    EngineCall call;
    call.slot = 0;
    call.batch = rows;
    call.inputs = in.data();
    call.outputs = out.data();
    call.stream = stream_;
    engine_->enqueue(call);
    for (size_t o = 0; o < io.outputs.size(); ++o) {
      NVCLIP_CUDA_CHECK(cudaMemcpyAsync(outputs[o], out[o], static_cast<size_t>(batch) * io.outputs[o].row_bytes(),
                                        cudaMemcpyDeviceToHost, stream));
    }
    NVCLIP_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    cudaStreamSynchronize(stream);  // nothing enqueued may outlive the caller's host arrays
    cudaGetLastError();
    throw;
  }
}
#else
void EngineRunner::run_cuda(int64_t, int64_t, const void* const*, void* const*) {
  throw EngineError("this nvclip_fast was built without CUDA");
}
#endif

}  // namespace nvclip
