// SlotRunner's CUDA flavour: device buffers, one stream, pinned copy-back. Built only with CUDA.
// Everything of a batch is enqueued on the slot's stream; the host waits twice: for the upload (then
// the staged images are released, while the stage and the engine still run) and for the copy back.
#include <cstring>
#include <vector>

#include "cuda_util.h"
#include "errors.h"
#include "slot_runner.h"
#include "staging_ring.h"

namespace nvclip {

namespace {

class CudaSlotRunner final : public SlotRunner {
 public:
  CudaSlotRunner(std::shared_ptr<Engine> engine, SlotConfig config)
      : SlotRunner(std::move(engine), std::move(config)), device_(info().device_index) {
    if (cuda_device_count() <= device_) {
      throw EngineError("the engine runs on cuda:" + std::to_string(device_) +
                        " but no such CUDA device is usable: " + cuda_unavailable_reason());
    }
    CudaDeviceScope scope(device_);  // the slot's memory and stream belong to the engine's device
    try {
      NVCLIP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      NVCLIP_CUDA_CHECK(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming));
      if (config_.staging_bytes > 0) staging_ = DeviceBuffer(config_.staging_bytes);
      views_.reserve(static_cast<size_t>(config_.rows));
      reserve(config_.rows);
      if (config_.stage) stage_state_ = config_.stage->make_slot_state();
    } catch (...) {
      destroy();
      throw;
    }
  }

  ~CudaSlotRunner() override { destroy(); }

  HostMemoryKind host_memory() const override { return HostMemoryKind::kPinned; }
  size_t staging_capacity() const override { return staging_.size(); }

  void run(const SlotBatch& batch) override {
    CudaDeviceScope scope(device_);  // the caller's current device is restored on return
    const int64_t rows = engine_rows(batch.rows);
    reserve(rows);
    DeviceBuffer overflow;  // a batch larger than the slot's staging (one oversized image)
    try {
      for (size_t i = 0; i < inputs_.size(); ++i) {
        const size_t row = info().inputs[i].row_bytes();
        uint8_t* input = inputs_[i].data();
        const auto n = static_cast<size_t>(batch.rows);
        if (batch.tensors != nullptr) {
          NVCLIP_CUDA_CHECK(cudaMemcpyAsync(input, batch.tensors[i], n * row, cudaMemcpyHostToDevice, stream_));
        }
        NVCLIP_CUDA_CHECK(cudaMemsetAsync(input + n * row, 0, static_cast<size_t>(rows) * row - n * row, stream_));
      }
      if (batch.images != nullptr) upload_images(batch, overflow);
      NVCLIP_CUDA_CHECK(cudaEventRecord(uploaded_, stream_));
      if (batch.images != nullptr) preprocess(batch, views_.data(), inputs_[0].data(), stream_, stage_state_.get());
      enqueue(rows, input_ptrs_.data(), output_ptrs_.data(), stream_);
      for (size_t o = 0; o < outputs_.size(); ++o) {
        if (!copies_back(o)) continue;
        NVCLIP_CUDA_CHECK(cudaMemcpyAsync(host_outputs_[o].data(), outputs_[o].data(),
                                          static_cast<size_t>(batch.rows) * info().outputs[o].row_bytes(),
                                          cudaMemcpyDeviceToHost, stream_));
      }
      NVCLIP_CUDA_CHECK(cudaEventSynchronize(uploaded_));
      if (batch.released) batch.released();
      NVCLIP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    } catch (...) {
      // Copies already enqueued may still read the caller's memory and write the slot's buffers:
      // wait for them. Their own error, if any, is the one being reported.
      cudaStreamSynchronize(stream_);
      cudaGetLastError();
      throw;
    }
    std::vector<const uint8_t*> host(host_outputs_.size());
    for (size_t o = 0; o < host.size(); ++o) host[o] = copies_back(o) ? host_outputs_[o].data() : nullptr;
    batch.scatter(host.data());
  }

 private:
  // The batch's staged images to device staging, in few copies (consecutive ring blocks form one);
  // views_ gets the images with their device pixel pointers.
  void upload_images(const SlotBatch& batch, DeviceBuffer& overflow) {
    const auto n = static_cast<size_t>(batch.rows);
    std::vector<StagedBlockRef> refs(n);
    for (size_t i = 0; i < n; ++i) {
      const ImageView& v = batch.images[i];
      refs[i] = {v.data, align_up(static_cast<size_t>(v.row_stride) * static_cast<size_t>(v.height), kBufferAlignment)};
    }
    const CopyPlan plan = plan_staging_copies(refs.data(), n);
    uint8_t* staging = staging_.data();
    if (plan.total_bytes > staging_.size()) {  // cudaFree synchronizes the device; such images are rare
      overflow = DeviceBuffer(plan.total_bytes);
      staging = overflow.data();
    }
    for (const CopySpan& span : plan.spans) {
      NVCLIP_CUDA_CHECK(
          cudaMemcpyAsync(staging + span.device_offset, span.host, span.bytes, cudaMemcpyHostToDevice, stream_));
    }
    views_.assign(batch.images, batch.images + n);
    for (size_t i = 0; i < n; ++i) views_[i].data = staging + plan.item_offsets[i];
  }

  void reserve(int64_t rows) {
    if (rows <= capacity_) return;
    const auto bytes = [rows](const TensorSpec& spec) { return static_cast<size_t>(rows) * spec.row_bytes(); };
    inputs_.clear();
    outputs_.clear();
    host_outputs_.clear();
    input_ptrs_.clear();
    output_ptrs_.clear();
    for (const auto& spec : info().inputs) {  // zeroed: rows of failed images stay finite
      input_ptrs_.push_back(inputs_.emplace_back(bytes(spec)).data());
      NVCLIP_CUDA_CHECK(cudaMemset(inputs_.back().data(), 0, inputs_.back().size()));
    }
    for (size_t o = 0; o < info().outputs.size(); ++o) {
      const TensorSpec& spec = info().outputs[o];
      output_ptrs_.push_back(outputs_.emplace_back(bytes(spec)).data());
      host_outputs_.push_back(copies_back(o) ? HostBuffer(bytes(spec), HostMemoryKind::kPinned) : HostBuffer());
    }
    capacity_ = rows;
  }

  void destroy() noexcept {
    // A destructor cannot report: after a failed wait there is nothing better to do than go on.
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    stage_state_.reset();  // waits for the stage's own work on the stream
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (uploaded_ != nullptr) cudaEventDestroy(uploaded_);
    stream_ = nullptr;
    uploaded_ = nullptr;
  }

  const int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t uploaded_ = nullptr;  // recorded after the batch's inputs were copied to the device
  DeviceBuffer staging_;            // the batch's images
  std::vector<ImageView> views_;    // the batch's images in device staging
  std::vector<DeviceBuffer> inputs_;
  std::vector<DeviceBuffer> outputs_;
  std::vector<HostBuffer> host_outputs_;  // pinned: where the copied-back outputs land
  std::vector<const void*> input_ptrs_;
  std::vector<void*> output_ptrs_;
  int64_t capacity_ = 0;
  std::unique_ptr<PreprocessSlotState> stage_state_;
};

}  // namespace

std::unique_ptr<SlotRunner> make_cuda_slot_runner(std::shared_ptr<Engine> engine, SlotConfig config) {
  return std::make_unique<CudaSlotRunner>(std::move(engine), std::move(config));
}

}  // namespace nvclip
