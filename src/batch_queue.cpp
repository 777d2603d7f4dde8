#include "batch_queue.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>

#include "cuda_util.h"
#include "errors.h"

namespace nvclip {

namespace {

using Clock = std::chrono::steady_clock;

// The queue whose worker or completion thread this is (nullptr elsewhere): close() and
// Request::wait() from such a thread would wait for the thread itself.
thread_local const BatchQueue* t_internal_queue = nullptr;
thread_local bool t_completion_thread = false;

// Quiet-NaN bit patterns: rows nobody wrote (failed images) read as NaN, never as plausible numbers.
constexpr uint32_t kFloat32NaN = 0x7FC00000u;
constexpr uint16_t kFloat16NaN = 0x7E00u;
constexpr uint16_t kBFloat16NaN = 0x7FC0u;

void fill_nan(uint8_t* data, size_t bytes, TensorDType dtype) {
  switch (dtype) {
    case TensorDType::kFloat32:
      for (size_t i = 0; i + sizeof(kFloat32NaN) <= bytes; i += sizeof(kFloat32NaN)) {
        std::memcpy(data + i, &kFloat32NaN, sizeof(kFloat32NaN));
      }
      break;
    case TensorDType::kFloat16:
    case TensorDType::kBFloat16: {
      const uint16_t nan = dtype == TensorDType::kFloat16 ? kFloat16NaN : kBFloat16NaN;
      for (size_t i = 0; i + sizeof(nan) <= bytes; i += sizeof(nan)) std::memcpy(data + i, &nan, sizeof(nan));
      break;
    }
    default:
      std::memset(data, 0, bytes);
  }
}

void validate_image(const ImageView& v, int64_t i) {
  const std::string where = "image " + std::to_string(i) + ": ";
  if (v.data == nullptr) throw std::invalid_argument(where + "null data pointer");
  if (v.height <= 0 || v.width <= 0) {
    throw std::invalid_argument(where + "height and width must be > 0, got " + std::to_string(v.height) +
                                "x" + std::to_string(v.width));
  }
  if (v.channels != 1 && v.channels != 3) {
    throw std::invalid_argument(where + "expected 1 (gray) or 3 (RGB) channels, got " +
                                std::to_string(v.channels));
  }
  const int64_t row = static_cast<int64_t>(v.width) * v.channels;
  if (v.row_stride < row) {
    throw std::invalid_argument(where + "row_stride " + std::to_string(v.row_stride) +
                                " is smaller than width * channels = " + std::to_string(row));
  }
}

// Runs one step of a batch; prefixes its error with the step, so a failed request says what failed.
template <typename Fn>
void step(const std::string& what, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    throw EngineError(what + " failed: " + e.what());
  }
}

}  // namespace

const char* request_status_name(RequestStatus status) {
  switch (status) {
    case RequestStatus::kPending: return "pending";
    case RequestStatus::kOk: return "ok";
    case RequestStatus::kFailed: return "failed";
    case RequestStatus::kCancelled: return "cancelled";
  }
  return "unknown";
}

// ------------------------------------------------------------------------------------------------
// Request

Request::Request(uint64_t id, int64_t n, const TensorSpec& output, Callback callback)
    : id_(id),
      n_(n),
      output_(output),
      row_bytes_(output.row_bytes()),
      rows_(n > 0 ? new uint8_t[static_cast<size_t>(n) * row_bytes_] : nullptr),
      item_errors_(static_cast<size_t>(n)),
      remaining_(n),
      callback_(std::move(callback)) {
  if (n > 0) fill_nan(rows_.get(), static_cast<size_t>(n) * row_bytes_, output.dtype);
}

bool Request::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

void Request::wait() const {
  std::unique_lock<std::mutex> lock(mutex_);
  if (done_) return;
  if (t_completion_thread) {
    throw EngineError("Request.wait() called from a completion callback: the callback runs on the "
                      "thread that resolves requests, so this wait would never end");
  }
  done_cv_.wait(lock, [&] { return done_; });
}

bool Request::wait_for(std::chrono::nanoseconds timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  if (done_) return true;
  if (t_completion_thread) {
    throw EngineError("Request.wait() called from a completion callback (it would wait for itself)");
  }
  return done_cv_.wait_for(lock, timeout, [&] { return done_; });
}

RequestStatus Request::status() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_ ? status_ : RequestStatus::kPending;
}

const std::string& Request::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  static const std::string kNone;
  return done_ ? error_ : kNone;
}

void Request::require_done(const char* what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!done_) throw EngineError(std::string(what) + " of request " + std::to_string(id_) + " read before it was done");
}

const uint8_t* Request::rows() const {
  require_done("rows");
  return rows_.get();
}

const std::vector<std::string>& Request::item_errors() const {
  require_done("item_errors");
  return item_errors_;
}

int64_t Request::failed_items() const {
  require_done("failed_items");
  return std::count_if(item_errors_.begin(), item_errors_.end(), [](const std::string& e) { return !e.empty(); });
}

void Request::fail(RequestStatus status, const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (status_ == RequestStatus::kPending) {
    status_ = status;
    error_ = message;
  }
}

bool Request::finish_items(int64_t count) {
  // acq_rel: rows and item errors written before this decrement are visible to whoever sees zero.
  return remaining_.fetch_sub(count, std::memory_order_acq_rel) == count;
}

void Request::resolve() {
  Callback callback;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (status_ == RequestStatus::kPending) status_ = RequestStatus::kOk;
    done_ = true;
    callback = std::move(callback_);
    callback_ = nullptr;
  }
  done_cv_.notify_all();
  if (callback) callback(shared_from_this());
}

// ------------------------------------------------------------------------------------------------
// Items and slots

struct BatchQueue::Item {
  std::shared_ptr<Request> request;
  int64_t index = 0;    // row in the request
  ImageView view;       // pixels in host staging, compact rows
  StagingBlock block;   // the ring block (when !oversized)
  HostBuffer own;       // an image larger than the ring: its own staging buffer
  bool oversized = false;
  size_t staged_bytes = 0;  // bytes the image occupies in staging (aligned)
  bool filled = false;      // pixels copied in; guarded by mutex_
  Clock::time_point ready;  // when it was filled: the batch delay counts from the oldest
};

struct BatchQueue::Slot {
  int32_t index = 0;
  HostBuffer views;  // max_batch ImageViews handed to the stage (pinned for CUDA: copied H2D)
  // CPU engines: input and outputs in host memory.
  HostBuffer input;
  std::vector<HostBuffer> outputs;
#if NVCLIP_WITH_CUDA
  cudaStream_t stream = nullptr;
  DeviceBuffer staging;       // the batch's images
  DeviceBuffer device_views;  // the views, for kernels
  DeviceBuffer device_input;
  std::vector<DeviceBuffer> device_outputs;
  HostBuffer host_output;  // pinned: D2H target of the returned output
  ~Slot() {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
#endif
  std::vector<const void*> input_ptrs;
  std::vector<void*> output_ptrs;
};

// ------------------------------------------------------------------------------------------------
// BatchQueue: construction

BatchQueue::BatchQueue(std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage,
                       BatchQueueOptions options)
    : engine_(std::move(engine)),
      stage_(std::move(stage)),
      options_(std::move(options)),
      ring_(std::max(options_.staging_bytes, kMinStagingBytes)) {
  if (!engine_) throw std::invalid_argument("BatchQueue: engine is null");
  if (!stage_) throw std::invalid_argument("BatchQueue: preprocess stage is null");
  const EngineInfo& info = engine_->info();

  // The stage writes the engine's one input: [B, 3, S, S] in float32 or float16.
  if (info.inputs.size() != 1) {
    std::string names;
    for (const auto& s : info.inputs) names += (names.empty() ? "" : ", ") + s.name;
    throw std::invalid_argument("BatchQueue feeds exactly one input tensor (the images); the engine has " +
                                std::to_string(info.inputs.size()) + ": " + names);
  }
  const TensorSpec& in = info.inputs[0];
  const int32_t size = stage_->size();
  if (in.shape.size() != 4 || in.shape[1] != 3 || in.shape[2] != size || in.shape[3] != size) {
    throw std::invalid_argument("engine input " + in.to_string() + " does not match the preprocess stage " +
                                stage_->name() + ", which writes [batch, 3, " + std::to_string(size) + ", " +
                                std::to_string(size) + "]");
  }
  if (in.dtype == TensorDType::kFloat32) {
    input_dtype_ = OutputDType::kFloat32;
  } else if (in.dtype == TensorDType::kFloat16) {
    input_dtype_ = OutputDType::kFloat16;
  } else {
    throw std::invalid_argument("engine input " + in.to_string() + ": the preprocess stage writes float32 or "
                                "float16, not " + dtype_name(in.dtype));
  }
  if (!stage_->supports(input_dtype_)) {
    throw std::invalid_argument("preprocess stage " + stage_->name() + " cannot write " +
                                dtype_name(in.dtype) + " (engine input " + in.to_string() + ")");
  }
  if (stage_->device() != info.device) {
    throw std::invalid_argument(std::string("preprocess stage ") + stage_->name() + " runs on " +
                                device_kind_name(stage_->device()) + " but the engine runs on " +
                                device_kind_name(info.device));
  }
  if (options_.output.empty()) {
    if (info.outputs.size() != 1) {
      std::string names;
      for (const auto& s : info.outputs) names += (names.empty() ? "" : ", ") + s.name;
      throw std::invalid_argument("the engine has " + std::to_string(info.outputs.size()) +
                                  " outputs (" + names + "): name the one to return (output=...)");
    }
    output_index_ = 0;
  } else {
    const TensorSpec& chosen = info.output(options_.output);
    output_index_ = static_cast<size_t>(&chosen - info.outputs.data());
  }

  // Options.
  if (options_.streams < 1 || options_.streams > kMaxStreams) {
    throw std::invalid_argument("streams must be in [1, " + std::to_string(kMaxStreams) + "], got " +
                                std::to_string(options_.streams));
  }
  if (options_.max_delay.count() < 0) {
    throw std::invalid_argument("max_delay must be >= 0, got " + std::to_string(options_.max_delay.count()) + " us");
  }
  if (options_.staging_bytes < kMinStagingBytes) {
    throw std::invalid_argument("staging_bytes must be >= " + std::to_string(kMinStagingBytes) + ", got " +
                                std::to_string(options_.staging_bytes));
  }
  // A fixed batch dimension means every call runs exactly that many rows.
  const int64_t fixed_batch = in.shape[0] > 0 ? in.shape[0] : 0;
  const int64_t profile_max = fixed_batch ? fixed_batch : info.batch.max;
  min_rows_ = fixed_batch ? fixed_batch : info.batch.min;
  max_batch_ = options_.max_batch == 0 ? (fixed_batch ? fixed_batch : info.batch.opt) : options_.max_batch;
  max_batch_ = options_.max_batch == 0 ? std::min(max_batch_, kMaxBatchLimit) : max_batch_;
  if (max_batch_ < 1 || max_batch_ > profile_max || max_batch_ > kMaxBatchLimit) {
    throw std::invalid_argument("max_batch must be in [1, " + std::to_string(std::min(profile_max, kMaxBatchLimit)) +
                                "] (the engine's batch profile allows up to " + std::to_string(profile_max) +
                                "), got " + std::to_string(options_.max_batch));
  }
  engine_rows_ = std::max(max_batch_, min_rows_);
  input_row_bytes_ = in.row_bytes();
  output_row_bytes_ = output().row_bytes();
  const auto slots = static_cast<size_t>(options_.streams);

  // Buffers, all allocated up front.
  const bool cuda = info.device == DeviceKind::kCuda;
#if NVCLIP_WITH_CUDA
  std::optional<CudaDeviceScope> device;  // set-up on the engine's device; the caller's restored after
  if (cuda) {
    if (cuda_device_count() <= info.device_index) {
      throw EngineError("the engine runs on cuda:" + std::to_string(info.device_index) +
                        " but no such CUDA device is usable: " + cuda_unavailable_reason());
    }
    device.emplace(info.device_index);
    host_kind_ = HostMemoryKind::kPinned;
  }
#else
  if (cuda) {
    throw EngineError("the engine runs on CUDA but this nvclip_fast was built without CUDA");
  }
#endif
  // Device staging per slot: the ring's share, so the device holds as much as the host ring.
  slot_staging_bytes_ = align_up(ring_.capacity() / slots, kBufferAlignment);
  ring_memory_ = HostBuffer(ring_.capacity(), host_kind_);
  for (size_t s = 0; s < slots; ++s) {
    auto slot = std::make_unique<Slot>();
    slot->index = static_cast<int32_t>(s);
    slot->views = HostBuffer(static_cast<size_t>(max_batch_) * sizeof(ImageView), host_kind_);
    const auto rows = static_cast<size_t>(engine_rows_);
    if (!cuda) {
      slot->input = HostBuffer(rows * input_row_bytes_, HostMemoryKind::kAligned);
      std::memset(slot->input.data(), 0, slot->input.size());  // padding rows read as zeros
      slot->input_ptrs.push_back(slot->input.data());
      for (const auto& spec : info.outputs) {
        slot->outputs.emplace_back(rows * spec.row_bytes(), HostMemoryKind::kAligned);
        slot->output_ptrs.push_back(slot->outputs.back().data());
      }
    }
#if NVCLIP_WITH_CUDA
    if (cuda) {
      NVCLIP_CUDA_CHECK(cudaStreamCreateWithFlags(&slot->stream, cudaStreamNonBlocking));
      slot->staging = DeviceBuffer(slot_staging_bytes_);
      slot->device_views = DeviceBuffer(static_cast<size_t>(max_batch_) * sizeof(ImageView));
      slot->device_input = DeviceBuffer(rows * input_row_bytes_);
      NVCLIP_CUDA_CHECK(cudaMemset(slot->device_input.data(), 0, slot->device_input.size()));
      slot->input_ptrs.push_back(slot->device_input.data());
      for (const auto& spec : info.outputs) {
        slot->device_outputs.emplace_back(rows * spec.row_bytes());
        slot->output_ptrs.push_back(slot->device_outputs.back().data());
      }
      slot->host_output = HostBuffer(static_cast<size_t>(max_batch_) * output_row_bytes_, HostMemoryKind::kPinned);
    }
#endif
    slots_.push_back(std::move(slot));
  }

  engine_->attach(options_.streams);
  try {
    completion_thread_ = std::thread([this] { completion_main(); });
    for (auto& slot : slots_) workers_.emplace_back([this, s = slot.get()] { worker_main(*s); });
  } catch (...) {
    close(CloseMode::kCancel);  // joins whatever started
    throw;
  }
}

BatchQueue::~BatchQueue() {
  try {
    close(CloseMode::kCancel);
  } catch (...) {
    // close() only throws when called from the queue's own threads; a destructor running there
    // has no one to report to, and the threads were already joined by an earlier close().
  }
}

// ------------------------------------------------------------------------------------------------
// Submission

std::shared_ptr<Request> BatchQueue::submit(const ImageView* images, int64_t n, Request::Callback callback) {
  if (n < 0) throw std::invalid_argument("submit: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && images == nullptr) throw std::invalid_argument("submit: images is null");
  for (int64_t i = 0; i < n; ++i) validate_image(images[i], i);

  std::shared_ptr<Request> request;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) throw EngineError("BatchQueue is closed: submit() after close()");
    request = std::make_shared<Request>(next_request_id_++, n, output(), std::move(callback));
    ++active_submits_;
  }
  if (n == 0) {
    std::vector<std::shared_ptr<Request>> ready{request};
    complete(ready);
  }

  int64_t i = 0;
  try {
    for (; i < n; ++i) {
      const ImageView& src = images[i];
      const size_t row = static_cast<size_t>(src.width) * static_cast<size_t>(src.channels);
      const size_t bytes = row * static_cast<size_t>(src.height);
      auto item = std::make_unique<Item>();
      item->request = request;
      item->index = i;
      Item* queued = nullptr;  // a ring item is queued (unfilled) before its copy, to keep ring order
      {
        std::unique_lock<std::mutex> lock(mutex_);
        const bool fits = ring_.fits(bytes);
        std::optional<StagingBlock> block;
        // Backpressure: wait for ring space (or, for an image larger than the whole ring, for the
        // one oversized buffer allowed at a time). Waiting submitters make workers dispatch at once.
        while (!cancelling_ && (fits ? !(block = ring_.allocate(bytes)) : oversized_in_use_)) {
          ++space_waiters_;
          work_cv_.notify_all();
          space_cv_.wait(lock);
          --space_waiters_;
        }
        if (cancelling_) {
          if (block) ring_.release(*block);
          break;
        }
        if (fits) {
          item->block = *block;
          item->staged_bytes = block->size;
          item->view.data = ring_memory_.data() + block->offset;
          queued = item.get();
          pending_.push_back(std::move(item));
        } else {
          oversized_in_use_ = true;
        }
      }
      if (queued == nullptr) {
        // Larger than the whole ring: stage it in its own buffer (allocated now, freed when its batch
        // is done), so any image works while memory stays bounded by the ring + one image.
        try {
          item->own = HostBuffer(bytes, host_kind_);
        } catch (const std::exception& e) {
          {
            std::lock_guard<std::mutex> lock(mutex_);
            oversized_in_use_ = false;
          }
          space_cv_.notify_all();
          request->item_errors_[static_cast<size_t>(i)] =
              "could not allocate " + std::to_string(bytes) + " bytes of staging for this image (larger than the " +
              std::to_string(ring_.capacity()) + "-byte staging ring): " + e.what();
          if (request->finish_items(1)) {
            std::vector<std::shared_ptr<Request>> ready{request};
            complete(ready);
          }
          continue;
        }
        item->oversized = true;
        item->staged_bytes = align_up(bytes, kBufferAlignment);
        item->view.data = item->own.data();
      }
      Item& target = queued != nullptr ? *queued : *item;
      auto* dst = const_cast<uint8_t*>(target.view.data);
      if (static_cast<size_t>(src.row_stride) == row) {
        std::memcpy(dst, src.data, bytes);
      } else {
        for (int32_t y = 0; y < src.height; ++y) {
          std::memcpy(dst + y * row, src.data + static_cast<int64_t>(y) * src.row_stride, row);
        }
      }
      target.view.height = src.height;
      target.view.width = src.width;
      target.view.channels = src.channels;
      target.view.row_stride = static_cast<int64_t>(row);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        target.filled = true;
        target.ready = Clock::now();
        if (queued == nullptr) {
          pending_.push_back(std::move(item));
          ++stats_.oversized_images;
        }
      }
      work_cv_.notify_one();
    }
  } catch (const std::exception& e) {
    // Only allocation failures can land here; the request must still resolve exactly once.
    fail_unstaged(request, n - i, RequestStatus::kFailed, std::string("submit failed: ") + e.what());
    i = n;
  }
  if (i < n) {
    fail_unstaged(request, n - i, RequestStatus::kCancelled,
                  "cancelled: BatchQueue.close(cancel) ran while this request was being submitted");
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    --active_submits_;
  }
  work_cv_.notify_all();  // a closing queue's workers wait for the last submit to finish
  return request;
}

void BatchQueue::fail_unstaged(const std::shared_ptr<Request>& request, int64_t count, RequestStatus status,
                               const std::string& why) {
  if (count <= 0) return;
  request->fail(status, why);
  if (status == RequestStatus::kCancelled) {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.cancelled_images += static_cast<uint64_t>(count);
  }
  if (request->finish_items(count)) {
    std::vector<std::shared_ptr<Request>> ready{request};
    complete(ready);
  }
}

// ------------------------------------------------------------------------------------------------
// Batch formation and execution (slot workers)

bool BatchQueue::take_batch(Batch& batch, bool& cancelled) {
  const bool cuda = device() == DeviceKind::kCuda;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (pending_.empty() || !pending_.front()->filled) {
      if (pending_.empty() && closing_ && active_submits_ == 0) return false;
      work_cv_.wait(lock);
      continue;
    }
    // The filled prefix, up to max_batch images and (CUDA) the slot's device staging.
    int64_t count = 0;
    size_t bytes = 0;
    bool full = false;
    for (const auto& item : pending_) {
      if (!item->filled) break;
      if (count == max_batch_ || (cuda && count > 0 && bytes + item->staged_bytes > slot_staging_bytes_)) {
        full = true;
        break;
      }
      bytes += item->staged_bytes;
      ++count;
    }
    full = full || count == max_batch_;
    const Clock::time_point deadline = pending_.front()->ready + options_.max_delay;
    const bool ready = full || closing_ || space_waiters_ > 0 || Clock::now() >= deadline;
    if (!ready) {
      work_cv_.wait_until(lock, deadline);
      continue;
    }
    cancelled = cancelling_;
    batch.clear();
    for (int64_t k = 0; k < count; ++k) {
      batch.push_back(std::move(pending_.front()));
      pending_.pop_front();
    }
    if (!pending_.empty()) work_cv_.notify_one();  // another idle slot may take the rest
    return true;
  }
}

void BatchQueue::worker_main(Slot& slot) {
  t_internal_queue = this;
  std::string setup_error;
#if NVCLIP_WITH_CUDA
  if (device() == DeviceKind::kCuda) {
    try {
      NVCLIP_CUDA_CHECK(cudaSetDevice(engine_->info().device_index));
    } catch (const std::exception& e) {
      setup_error = e.what();  // every batch of this slot fails with it; the queue still resolves all
    }
  }
#endif
  Batch batch;
  std::vector<std::string> item_errors;
  bool cancelled = false;
  while (take_batch(batch, cancelled)) {
    item_errors.assign(batch.size(), std::string());
    RequestStatus status = RequestStatus::kOk;
    std::string error;
    if (cancelled) {
      status = RequestStatus::kCancelled;
      error = "cancelled: BatchQueue.close(cancel) ran before this image was processed";
    } else if (!setup_error.empty()) {
      status = RequestStatus::kFailed;
      error = setup_error;
    } else {
      try {
        run_batch(slot, batch, item_errors);
      } catch (const std::exception& e) {
        status = RequestStatus::kFailed;
        error = "batch of " + std::to_string(batch.size()) + " images failed: " + e.what();
      } catch (...) {
        status = RequestStatus::kFailed;
        error = "batch of " + std::to_string(batch.size()) + " images failed: unknown exception";
      }
    }
    finish_batch(slot, batch, status, error, item_errors);
  }
}

void BatchQueue::run_batch(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors) {
#if NVCLIP_WITH_CUDA
  if (device() == DeviceKind::kCuda) {
    run_batch_cuda(slot, batch, item_errors);
    return;
  }
#endif
  run_batch_cpu(slot, batch, item_errors);
}

void BatchQueue::run_batch_cpu(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors) {
  const auto n = static_cast<int64_t>(batch.size());
  auto* views = reinterpret_cast<ImageView*>(slot.views.data());
  for (int64_t i = 0; i < n; ++i) views[i] = batch[static_cast<size_t>(i)]->view;
  PreprocessBatch pre;
  pre.images = views;
  pre.n = n;
  pre.out = slot.input.data();
  pre.dtype = input_dtype_;
  pre.item_errors = item_errors.data();
  step("preprocess stage " + stage_->name(), [&] { stage_->run(pre); });
  EngineCall call;
  call.slot = slot.index;
  call.batch = std::max(n, min_rows_);  // padded up to the engine's minimum (rows past n are unused)
  call.inputs = slot.input_ptrs.data();
  call.outputs = slot.output_ptrs.data();
  step("engine", [&] { engine_->enqueue(call); });
  const uint8_t* out = slot.outputs[output_index_].data();
  for (int64_t i = 0; i < n; ++i) {
    if (!item_errors[static_cast<size_t>(i)].empty()) continue;
    const Item& item = *batch[static_cast<size_t>(i)];
    std::memcpy(item.request->row(item.index), out + static_cast<size_t>(i) * output_row_bytes_, output_row_bytes_);
  }
}

#if NVCLIP_WITH_CUDA
void BatchQueue::run_batch_cuda(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors) {
  const auto n = static_cast<int64_t>(batch.size());
  std::vector<StagedBlockRef> refs(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) refs[i] = {batch[i]->view.data, batch[i]->staged_bytes};
  const CopyPlan plan = plan_staging_copies(refs.data(), refs.size());
  // A batch exceeds the slot's staging only when it is one image bigger than the slot's share of
  // the ring: give it a buffer of its own (cudaFree synchronizes the device; such images are rare).
  DeviceBuffer overflow;
  uint8_t* staging = slot.staging.data();
  if (plan.total_bytes > slot.staging.size()) {
    overflow = DeviceBuffer(plan.total_bytes);
    staging = overflow.data();
  }
  auto* views = reinterpret_cast<ImageView*>(slot.views.data());
  try {
    for (const CopySpan& span : plan.spans) {
      NVCLIP_CUDA_CHECK(cudaMemcpyAsync(staging + span.device_offset, span.host, span.bytes,
                                        cudaMemcpyHostToDevice, slot.stream));
    }
    for (int64_t i = 0; i < n; ++i) {
      views[i] = batch[static_cast<size_t>(i)]->view;
      views[i].data = staging + plan.item_offsets[static_cast<size_t>(i)];
    }
    NVCLIP_CUDA_CHECK(cudaMemcpyAsync(slot.device_views.data(), views, static_cast<size_t>(n) * sizeof(ImageView),
                                      cudaMemcpyHostToDevice, slot.stream));
    PreprocessBatch pre;
    pre.images = views;
    pre.device_images = reinterpret_cast<const ImageView*>(slot.device_views.data());
    pre.n = n;
    pre.out = slot.device_input.data();
    pre.dtype = input_dtype_;
    pre.stream = slot.stream;
    pre.item_errors = item_errors.data();
    step("preprocess stage " + stage_->name(), [&] { stage_->run(pre); });
    EngineCall call;
    call.slot = slot.index;
    call.batch = std::max(n, min_rows_);
    call.inputs = slot.input_ptrs.data();
    call.outputs = slot.output_ptrs.data();
    call.stream = slot.stream;
    step("engine", [&] { engine_->enqueue(call); });
    NVCLIP_CUDA_CHECK(cudaMemcpyAsync(slot.host_output.data(), slot.device_outputs[output_index_].data(),
                                      static_cast<size_t>(n) * output_row_bytes_, cudaMemcpyDeviceToHost,
                                      slot.stream));
    NVCLIP_CUDA_CHECK(cudaStreamSynchronize(slot.stream));
  } catch (...) {
    // Copies already enqueued may still read the staging ring and write slot buffers: wait for them
    // before the ring blocks are released. Their own error, if any, is the one being reported.
    cudaStreamSynchronize(slot.stream);
    cudaGetLastError();
    throw;
  }
  const uint8_t* out = slot.host_output.data();
  for (int64_t i = 0; i < n; ++i) {
    if (!item_errors[static_cast<size_t>(i)].empty()) continue;
    const Item& item = *batch[static_cast<size_t>(i)];
    std::memcpy(item.request->row(item.index), out + static_cast<size_t>(i) * output_row_bytes_, output_row_bytes_);
  }
}
#else
void BatchQueue::run_batch_cuda(Slot&, const Batch&, std::vector<std::string>&) {
  throw EngineError("this nvclip_fast was built without CUDA");
}
#endif

void BatchQueue::finish_batch(Slot& slot, Batch& batch, RequestStatus status, const std::string& error,
                              const std::vector<std::string>& item_errors) {
  (void)slot;
  bool had_oversized = false;
  for (auto& item : batch) {
    if (item->oversized) {
      item->own = HostBuffer();  // free before admitting the next oversized image
      had_oversized = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& item : batch) {
      if (!item->oversized) ring_.release(item->block);
    }
    if (had_oversized) oversized_in_use_ = false;
    const auto n = static_cast<int64_t>(batch.size());
    if (status == RequestStatus::kCancelled) {
      stats_.cancelled_images += static_cast<uint64_t>(n);
    } else {
      ++stats_.batches;
      stats_.images += static_cast<uint64_t>(n);
      stats_.failed_batches += status == RequestStatus::kFailed ? 1 : 0;
      stats_.largest_batch = std::max(stats_.largest_batch, n);
    }
  }
  space_cv_.notify_all();
  std::vector<std::shared_ptr<Request>> ready;
  for (size_t i = 0; i < batch.size(); ++i) {
    Item& item = *batch[i];
    if (status != RequestStatus::kOk) {
      item.request->fail(status, error);
    } else if (!item_errors[i].empty()) {
      item.request->item_errors_[static_cast<size_t>(item.index)] = item_errors[i];
    }
    if (item.request->finish_items(1)) ready.push_back(item.request);
  }
  batch.clear();
  complete(ready);
}

// ------------------------------------------------------------------------------------------------
// Completion

void BatchQueue::complete(std::vector<std::shared_ptr<Request>>& ready) {
  if (ready.empty()) return;
  {
    std::lock_guard<std::mutex> lock(completion_mutex_);
    for (auto& r : ready) completed_.push_back(std::move(r));
  }
  ready.clear();
  completion_cv_.notify_one();
}

void BatchQueue::completion_main() {
  t_internal_queue = this;
  t_completion_thread = true;
  for (;;) {
    std::vector<std::shared_ptr<Request>> group;
    {
      std::unique_lock<std::mutex> lock(completion_mutex_);
      completion_cv_.wait(lock, [&] { return !completed_.empty() || completion_stop_; });
      if (completed_.empty()) return;  // stop requested and everything delivered
      group.swap(completed_);
    }
    {
      // Counted before the requests are marked done, so a caller that sees its request done also
      // sees it counted.
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.requests += static_cast<uint64_t>(group.size());
    }
    uint64_t failures = 0;
    bool any_callback = false;
    for (const auto& r : group) {
      std::lock_guard<std::mutex> lock(r->mutex_);
      any_callback = any_callback || static_cast<bool>(r->callback_);
    }
    const auto run_group = [&] {
      for (auto& r : group) {
        try {
          r->resolve();
        } catch (...) {
          ++failures;  // a throwing callback must not take the queue down; counted in stats
        }
      }
      group.clear();  // drop the last references inside the scope (the callbacks' too)
    };
    if (options_.completion_scope && any_callback) {
      options_.completion_scope(run_group);
    } else {
      run_group();
    }
    if (failures > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.callback_failures += failures;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Close

void BatchQueue::check_not_internal_thread(const char* what) const {
  if (t_internal_queue == this) {
    throw EngineError(std::string(what) + " called from the BatchQueue's own thread (an engine, stage or "
                      "completion callback); it would wait for itself");
  }
}

void BatchQueue::close(CloseMode mode) {
  check_not_internal_thread("BatchQueue.close()");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closing_ = true;
    if (mode == CloseMode::kCancel) cancelling_ = true;
  }
  work_cv_.notify_all();
  space_cv_.notify_all();
  std::lock_guard<std::mutex> close_lock(close_mutex_);
  if (joined_) return;
  for (auto& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
  {
    std::lock_guard<std::mutex> lock(completion_mutex_);
    completion_stop_ = true;
  }
  completion_cv_.notify_all();
  if (completion_thread_.joinable()) completion_thread_.join();
  engine_->detach();
  joined_ = true;
}

bool BatchQueue::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closing_;
}

BatchQueueStats BatchQueue::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace nvclip
