#include "batch_queue.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <stdexcept>
#include <tuple>

#include "errors.h"

namespace nvclip {

namespace {

using Clock = std::chrono::steady_clock;

// The queue whose worker or completion thread this is (nullptr elsewhere): close() from such a
// thread would wait for the thread itself.
thread_local const BatchQueue* t_internal_queue = nullptr;

// Every BatchQueue of the process, for close_all().
struct LiveQueues {
  std::mutex mutex;
  std::set<BatchQueue*> queues;
};

LiveQueues& live_queues() {
  static LiveQueues live;
  return live;
}

std::string tensor_names(const std::vector<TensorSpec>& specs) {
  std::string names;
  for (const auto& s : specs) names += (names.empty() ? "" : ", ") + s.name;
  return names;
}

// The stage writes the engine's one input, [B, 3, S, S] in float32 or float16, on the engine's
// device. Returns the dtype it writes.
OutputDType check_stage(const EngineInfo& info, const PreprocessStage& stage) {
  if (info.inputs.size() != 1) {
    throw std::invalid_argument("BatchQueue feeds exactly one input tensor (the images); the engine has " +
                                std::to_string(info.inputs.size()) + ": " + tensor_names(info.inputs));
  }
  const TensorSpec& in = info.inputs[0];
  const int32_t size = stage.size();
  if (in.shape.size() != 4 || in.shape[1] != 3 || in.shape[2] != size || in.shape[3] != size) {
    throw std::invalid_argument("engine input " + in.to_string() + " does not match the preprocess stage " +
                                stage.name() + ", which writes [batch, 3, " + std::to_string(size) + ", " +
                                std::to_string(size) + "]");
  }
  if (in.dtype != TensorDType::kFloat32 && in.dtype != TensorDType::kFloat16) {
    throw std::invalid_argument("engine input " + in.to_string() + ": the preprocess stage writes float32 or "
                                "float16, not " + dtype_name(in.dtype));
  }
  const OutputDType dtype = in.dtype == TensorDType::kFloat16 ? OutputDType::kFloat16 : OutputDType::kFloat32;
  if (!stage.supports(dtype)) {
    throw std::invalid_argument("preprocess stage " + stage.name() + " cannot write " + dtype_name(in.dtype) +
                                " (engine input " + in.to_string() + ")");
  }
  if (stage.device() != info.device) {
    throw std::invalid_argument(std::string("preprocess stage ") + stage.name() + " runs on " +
                                device_kind_name(stage.device()) + " but the engine runs on " +
                                device_kind_name(info.device));
  }
  return dtype;
}

void check_options(const BatchQueueOptions& options) {
  if (options.streams < 1 || options.streams > kMaxStreams) {
    throw std::invalid_argument("streams must be in [1, " + std::to_string(kMaxStreams) + "], got " +
                                std::to_string(options.streams));
  }
  if (options.max_delay.count() < 0) {
    throw std::invalid_argument("max_delay must be >= 0, got " + std::to_string(options.max_delay.count()) + " us");
  }
  if (options.staging_bytes != 0 && options.staging_bytes < kMinStagingBytes) {
    throw std::invalid_argument("staging_bytes must be 0 (the default) or >= " + std::to_string(kMinStagingBytes) +
                                ", got " + std::to_string(options.staging_bytes));
  }
}

size_t output_index(const EngineInfo& info, const std::string& name) {
  if (!name.empty()) return static_cast<size_t>(&info.output(name) - info.outputs.data());
  if (info.outputs.size() != 1) {
    throw std::invalid_argument("the engine has " + std::to_string(info.outputs.size()) + " outputs (" +
                                tensor_names(info.outputs) + "): name the one to return (output=...)");
  }
  return 0;
}

// A tensor without its batch dimension, for comparing replicas: "float32[3, 224, 224]".
std::string row_of(const TensorSpec& spec) {
  std::string dims;
  for (size_t d = 1; d < spec.shape.size(); ++d) dims += (d > 1 ? ", " : "") + std::to_string(spec.shape[d]);
  return std::string(dtype_name(spec.dtype)) + "[" + dims + "]";
}

size_t ring_bytes(const BatchQueueOptions& options, int64_t max_batch, size_t slots) {
  if (options.staging_bytes != 0) return options.staging_bytes;
  return std::max(kMinDefaultStagingBytes, (slots + 1) * static_cast<size_t>(max_batch) * kTypicalImageBytes);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Items, construction

struct BatchQueue::Item {
  std::shared_ptr<Request> request;
  int64_t index = 0;                  // row in the request
  ImageView view;                     // pixels in host staging, compact rows
  std::optional<StagingBlock> block;  // the ring block, until released
  HostBuffer own;                     // an image larger than the ring: its own staging, until released
  size_t staged_bytes = 0;            // bytes the image occupies in staging (aligned)
  bool filled = false;                // pixels copied in; guarded by mutex_
  Clock::time_point ready;            // when it was filled: the batch delay counts from the oldest
};

namespace {

std::string replica_label(size_t replica, const EngineInfo& info) {
  return "replica " + std::to_string(replica) + " (" + info.device_name() + ")";
}

}  // namespace

std::vector<BatchQueue::ReplicaState> BatchQueue::checked_replicas(std::vector<Replica> replicas,
                                                                   const BatchQueueOptions& options) {
  check_options(options);
  if (replicas.empty()) throw std::invalid_argument("BatchQueue needs at least one replica (an engine and its stage)");
  const bool several = replicas.size() > 1;
  std::vector<ReplicaState> states;
  for (size_t r = 0; r < replicas.size(); ++r) {
    // One replica's errors read as they always did; with several, they name the replica.
    const std::string which = several ? "replica " + std::to_string(r) + ": " : "";
    Replica& replica = replicas[r];
    if (!replica.engine) throw std::invalid_argument("BatchQueue: " + which + "engine is null");
    if (!replica.stage) throw std::invalid_argument("BatchQueue: " + which + "preprocess stage is null");
    const EngineInfo& info = replica.engine->info();
    ReplicaState state;
    try {
      state.stage_dtype = check_stage(info, *replica.stage);
      state.output_index = output_index(info, options.output);
      (void)info.outputs[state.output_index].row_bytes();  // fixed rows, or std::invalid_argument
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(which + e.what());
    }
    // Any batch may run on any replica: they must take the same images and give the same rows.
    if (r > 0) {
      const EngineInfo& first = states.front().replica.engine->info();
      const std::string these = replica_label(r, info) + " and " + replica_label(0, first);
      if (info.device != first.device) {
        throw std::invalid_argument(these + " run on different kinds of device: a queue's replicas share one "
                                    "staging ring, so they all run on the CPU or all on CUDA");
      }
      if (row_of(info.inputs[0]) != row_of(first.inputs[0])) {
        throw std::invalid_argument(these + " take different inputs (" + info.inputs[0].to_string() + " vs " +
                                    first.inputs[0].to_string() + "): replicas must run the same model");
      }
      const TensorSpec& out = info.outputs[state.output_index];
      const TensorSpec& first_out = first.outputs[states.front().output_index];
      if (row_of(out) != row_of(first_out)) {
        throw std::invalid_argument(these + " return different rows (" + out.to_string() + " vs " +
                                    first_out.to_string() + "): replicas must run the same model");
      }
      for (size_t q = 0; q < r; ++q) {
        if (states[q].replica.engine == replica.engine) {
          throw std::invalid_argument(replica_label(r, info) + " has the same engine as replica " + std::to_string(q) +
                                      ": each replica needs an engine of its own (an engine runs one set of slots)");
        }
      }
    }
    state.replica = std::move(replica);
    states.push_back(std::move(state));
  }
  return states;
}

int64_t BatchQueue::checked_max_batch(const std::vector<ReplicaState>& replicas, const BatchQueueOptions& options) {
  int64_t opt = kMaxBatchLimit, max = std::numeric_limits<int64_t>::max();
  for (const auto& r : replicas) {
    const BatchProfile batches = r.replica.engine->info().call_batches();
    opt = std::min(opt, batches.opt);
    max = std::min(max, batches.max);
  }
  const int64_t max_batch = options.max_batch == 0 ? opt : options.max_batch;
  if (max_batch < 1 || max_batch > max || max_batch > kMaxBatchLimit) {
    const std::string whose = replicas.size() > 1 ? "the smallest of the replicas' batch profiles allows"
                                                  : "the engine's batch profile allows";
    throw std::invalid_argument("max_batch must be in [1, " + std::to_string(std::min(max, kMaxBatchLimit)) + "] (" +
                                whose + " up to " + std::to_string(max) + "), got " +
                                std::to_string(options.max_batch));
  }
  return max_batch;
}

std::string BatchQueue::replica_name(size_t replica) const {
  return replica_label(replica, engine(replica).info());
}

BatchQueue::BatchQueue(std::vector<Replica> replicas, BatchQueueOptions options)
    : options_(std::move(options)),
      replicas_(checked_replicas(std::move(replicas), options_)),
      max_batch_(checked_max_batch(replicas_, options_)),
      output_row_bytes_(output().row_bytes()),
      ring_(ring_bytes(options_, max_batch_, replicas_.size() * static_cast<size_t>(options_.streams))) {
  // Device staging per slot: its share of the ring, so that the devices together hold as much as the
  // host ring (and the default ring gives every slot a full batch of typical images).
  const size_t slots = replicas_.size() * static_cast<size_t>(options_.streams);
  const size_t slot_staging = align_up(ring_.capacity() / slots, kBufferAlignment);
  for (size_t r = 0; r < replicas_.size(); ++r) {
    const ReplicaState& replica = replicas_[r];
    SlotConfig slot;
    slot.min_rows = replica.replica.engine->info().call_batches().min;
    slot.rows = std::max(max_batch_, slot.min_rows);
    slot.output = static_cast<int64_t>(replica.output_index);
    slot.stage = replica.replica.stage;
    slot.stage_dtype = replica.stage_dtype;
    slot.staging_bytes = slot_staging;
    for (slot.index = 0; slot.index < options_.streams; ++slot.index) {
      slots_.push_back({make_slot_runner(replica.replica.engine, slot), r});
    }
    stats_.replicas.push_back({replica.replica.engine->info().device_name()});
  }
  batch_bytes_limit_ = std::numeric_limits<size_t>::max();
  for (const auto& s : slots_) batch_bytes_limit_ = std::min(batch_bytes_limit_, s.runner->staging_capacity());
  ring_memory_ = HostBuffer(ring_.capacity(), slots_.front().runner->host_memory());

  size_t attached = 0;
  try {
    for (; attached < replicas_.size(); ++attached) replicas_[attached].replica.engine->attach(options_.streams);
  } catch (...) {
    for (size_t r = 0; r < attached; ++r) replicas_[r].replica.engine->detach();
    throw;
  }
  try {
    completion_thread_ = std::thread([this] { completion_main(); });
    for (auto& s : slots_) workers_.emplace_back([this, slot = &s] { worker_main(*slot); });
  } catch (...) {
    close(CloseMode::kCancel);  // joins whatever started
    throw;
  }
  std::lock_guard<std::mutex> lock(live_queues().mutex);
  live_queues().queues.insert(this);
}

BatchQueue::~BatchQueue() {
  {
    std::lock_guard<std::mutex> lock(live_queues().mutex);  // waits for a close_all() in progress
    live_queues().queues.erase(this);
  }
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
  for (int64_t i = 0; i < n; ++i) {
    if (const std::string why = image_view_error(images[i]); !why.empty()) {
      throw std::invalid_argument("image " + std::to_string(i) + ": " + why);
    }
  }

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
          item->block = block;
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
          item->own = HostBuffer(bytes, ring_memory_.kind());
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

size_t BatchQueue::preferred_replica() const {
  size_t best = replicas_.size();
  for (size_t r = 0; r < replicas_.size(); ++r) {
    const ReplicaState& c = replicas_[r];
    if (c.in_flight == options_.streams) continue;  // every slot busy
    if (best == replicas_.size() || std::tie(c.in_flight, c.taken) < std::tie(replicas_[best].in_flight,
                                                                               replicas_[best].taken)) {
      best = r;
    }
  }
  return best;
}

bool BatchQueue::take_batch(size_t replica, Batch& batch, bool& cancelled) {
  std::unique_lock<std::mutex> lock(mutex_);
  ReplicaState& mine = replicas_[replica];
  for (;;) {
    if (pending_.empty() || !pending_.front()->filled) {
      if (pending_.empty() && closing_ && active_submits_ == 0) return false;
      work_cv_.wait(lock);
      continue;
    }
    // The filled prefix, up to max_batch images and a slot's staging (CUDA: device staging).
    int64_t count = 0;
    size_t bytes = 0;
    bool full = false;
    for (const auto& item : pending_) {
      if (!item->filled) break;
      if (count == max_batch_ || (count > 0 && bytes + item->staged_bytes > batch_bytes_limit_)) {
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
    if (replicas_.size() > 1 && preferred_replica() != replica) {
      // A free slot of the preferred replica takes it: its worker waits here, or is on its way back
      // from its last batch (and looks before it waits).
      work_cv_.notify_all();
      work_cv_.wait(lock);
      continue;
    }
    ++mine.in_flight;
    ++mine.taken;
    cancelled = cancelling_;
    batch.clear();
    for (int64_t k = 0; k < count; ++k) {
      batch.push_back(std::move(pending_.front()));
      pending_.pop_front();
    }
    if (replicas_.size() > 1) {
      work_cv_.notify_all();  // the workers that left this batch to this replica, and the rest of pending_
    } else if (!pending_.empty()) {
      work_cv_.notify_one();  // another idle slot may take the rest
    }
    return true;
  }
}

void BatchQueue::worker_main(Slot& slot) {
  t_internal_queue = this;
  Batch batch;
  std::vector<ImageView> views;
  std::vector<std::string> item_errors;
  views.reserve(static_cast<size_t>(max_batch_));
  bool cancelled = false;
  while (take_batch(slot.replica, batch, cancelled)) {
    item_errors.assign(batch.size(), std::string());
    RequestStatus status = RequestStatus::kOk;
    std::string error;
    if (cancelled) {
      status = RequestStatus::kCancelled;
      error = "cancelled: BatchQueue.close(cancel) ran before this image was processed";
    } else {
      // With several replicas the error says which one failed (a device of its own, usually).
      const auto failed = [&](const std::string& why) {
        status = RequestStatus::kFailed;
        error = "batch of " + std::to_string(batch.size()) + " images failed" +
                (replicas_.size() > 1 ? " on " + replica_name(slot.replica) : "") + ": " + why;
      };
      try {
        run_batch(slot, batch, views, item_errors);
      } catch (const std::exception& e) {
        failed(e.what());
      } catch (...) {
        failed("unknown exception");
      }
    }
    finish_batch(batch, slot.replica, status, error, item_errors);
  }
}

void BatchQueue::run_batch(Slot& slot, Batch& batch, std::vector<ImageView>& views,
                           std::vector<std::string>& item_errors) {
  views.clear();
  for (const auto& item : batch) views.push_back(item->view);
  SlotBatch job;
  job.rows = static_cast<int64_t>(batch.size());
  job.images = views.data();
  job.item_errors = item_errors.data();
  job.released = [&] { release_staging(batch); };
  job.scatter = [&](const uint8_t* const* outputs) {
    const uint8_t* out = outputs[replicas_[slot.replica].output_index];
    for (size_t i = 0; i < batch.size(); ++i) {
      if (!item_errors[i].empty()) continue;
      Item& item = *batch[i];
      std::memcpy(item.request->row(item.index), out + i * output_row_bytes_, output_row_bytes_);
    }
  };
  slot.runner->run(job);
}

void BatchQueue::release_staging(Batch& batch) {
  bool had_oversized = false;
  for (auto& item : batch) {
    if (item->own.data() != nullptr) {
      item->own = HostBuffer();  // free before admitting the next oversized image
      had_oversized = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& item : batch) {
      if (item->block) ring_.release(*item->block);
      item->block.reset();
    }
    if (had_oversized) oversized_in_use_ = false;
  }
  space_cv_.notify_all();
}

void BatchQueue::finish_batch(Batch& batch, size_t replica, RequestStatus status, const std::string& error,
                              const std::vector<std::string>& item_errors) {
  release_staging(batch);  // when the slot has not already
  {
    std::lock_guard<std::mutex> lock(mutex_);
    --replicas_[replica].in_flight;
    const auto n = static_cast<int64_t>(batch.size());
    if (status == RequestStatus::kCancelled) {
      stats_.cancelled_images += static_cast<uint64_t>(n);
    } else {
      ++stats_.batches;
      ++stats_.batch_sizes[n];
      stats_.images += static_cast<uint64_t>(n);
      stats_.failed_batches += status == RequestStatus::kFailed ? 1 : 0;
      stats_.largest_batch = std::max(stats_.largest_batch, n);
      ReplicaStats& r = stats_.replicas[replica];
      ++r.batches;
      r.images += static_cast<uint64_t>(n);
      r.failed_batches += status == RequestStatus::kFailed ? 1 : 0;
    }
  }
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
  Request::mark_completion_thread();
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
    const bool any_callback = std::any_of(group.begin(), group.end(), [](const auto& r) { return r->has_callback(); });
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
  for (auto& r : replicas_) r.replica.engine->detach();
  joined_ = true;
}

bool BatchQueue::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closing_;
}

void BatchQueue::close_all(CloseMode mode) {
  // Held throughout, so no queue is destroyed while it is being closed here.
  std::lock_guard<std::mutex> lock(live_queues().mutex);
  for (BatchQueue* queue : live_queues().queues) queue->close(mode);
}

BatchQueueStats BatchQueue::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BatchQueueStats stats = stats_;
  stats.queued_images = static_cast<int64_t>(pending_.size());
  return stats;
}

}  // namespace nvclip
