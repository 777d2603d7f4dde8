// BatchQueue: many callers, one engine kept busy, every row back to the right caller.
//
//   submit(images) ── memcpy each image into a bounded staging ring (pinned host memory for CUDA
//                     engines, aligned host memory for CPU engines; blocks while full = backpressure)
//   slot workers   ── N threads, one per stream slot. Each takes the next batch (<= max_batch images,
//                     or what arrived within max_delay of the oldest), and on its own stream runs
//                     H2D copy -> PreprocessStage (writes the engine input) -> Engine::enqueue -> D2H
//                     copy into pinned output, waits for the stream, scatters rows to the requests.
//                     While slot i's engine runs, slot i+1 copies and preprocesses the next batch.
//   completion     ── one thread marks requests done and runs their callbacks, so a callback that
//                     waits (for the Python GIL, say) never stalls a slot that feeds the GPU.
//
// CPU engines use the same queue with host memory and no CUDA call at all.
//
// Failure semantics
//   - A batch whose stage or engine throws (or whose CUDA calls fail) fails exactly the requests that
//     have an image in it (Request status kFailed, error = the message); later batches run normally.
//   - A stage may fail single images (PreprocessBatch::fail_item): the request still succeeds, that
//     image's row is NaN and item_errors()[i] says why; rows never shift.
//   - close(kDrain) finishes everything accepted, close(kCancel) fails what has not started with
//     status kCancelled; both wait for batches already running and never leave a request unresolved.
//   - Every request resolves exactly once; its callback runs exactly once, on the completion thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine.h"
#include "host_memory.h"
#include "image.h"
#include "preprocess_stage.h"
#include "staging_ring.h"

namespace nvclip {

class BatchQueue;

enum class RequestStatus : int32_t { kPending = 0, kOk = 1, kFailed = 2, kCancelled = 3 };
const char* request_status_name(RequestStatus status);  // "pending" | "ok" | "failed" | "cancelled"

// One submit() call: n images -> n rows of the engine's output. Shared by the caller, the queue and
// the completion callback.
class Request : public std::enable_shared_from_this<Request> {
 public:
  using Callback = std::function<void(const std::shared_ptr<Request>&)>;

  Request(uint64_t id, int64_t n, const TensorSpec& output, Callback callback);

  uint64_t id() const { return id_; }
  int64_t size() const { return n_; }
  const TensorSpec& output() const { return output_; }  // row shape = output().shape[1:]
  size_t row_bytes() const { return row_bytes_; }

  bool done() const;
  // Blocks until resolved. Throws EngineError when called from the queue's completion thread (a
  // callback waiting for another request would wait forever).
  void wait() const;
  bool wait_for(std::chrono::nanoseconds timeout) const;  // false on timeout

  RequestStatus status() const;      // kPending until done
  const std::string& error() const;  // why the request failed or was cancelled; "" when ok or pending
  // The results are written by the slot threads until the request is done: these throw EngineError
  // before then rather than hand out memory that is still being written.
  // n x row_bytes, row i = image i. Rows of failed images (and of a failed request) are NaN for
  // floating-point outputs, 0 otherwise.
  const uint8_t* rows() const;
  const std::vector<std::string>& item_errors() const;  // per image: "" = ok, else why it failed
  int64_t failed_items() const;

 private:
  friend class BatchQueue;
  uint8_t* row(int64_t i) { return rows_.get() + static_cast<size_t>(i) * row_bytes_; }
  void require_done(const char* what) const;
  // Records a request-level failure; the first one wins (its message is the clearest cause).
  void fail(RequestStatus status, const std::string& message);
  // Counts `count` images as finished; true when that was the last (the request is ready).
  bool finish_items(int64_t count);
  void resolve();  // on the completion thread: done + wake waiters + callback

  const uint64_t id_;
  const int64_t n_;
  const TensorSpec output_;
  const size_t row_bytes_;
  std::unique_ptr<uint8_t[]> rows_;
  std::vector<std::string> item_errors_;  // each entry written by the one thread that owns the image
  std::atomic<int64_t> remaining_;
  Callback callback_;

  mutable std::mutex mutex_;
  mutable std::condition_variable done_cv_;
  bool done_ = false;
  RequestStatus status_ = RequestStatus::kPending;
  std::string error_;
};

enum class CloseMode : int32_t { kDrain = 0, kCancel = 1 };

// Runs one group of completions (marking requests done, running callbacks). The Python binding
// wraps the group in one GIL acquisition; the default runs it directly.
using CompletionScope = std::function<void(const std::function<void()>& run_group)>;

constexpr int64_t kMaxBatchLimit = 4096;  // beyond any engine profile seen; bounds slot buffers
constexpr int32_t kMaxStreams = 16;
constexpr size_t kMinStagingBytes = 4 * kBufferAlignment;
constexpr size_t kDefaultStagingBytes = size_t{256} << 20;  // ~2 batches of 128 640x480 RGB images
constexpr std::chrono::microseconds kDefaultMaxDelay{2000};
constexpr int32_t kDefaultStreams = 2;

struct BatchQueueOptions {
  int64_t max_batch = 0;  // images per batch; 0 = the engine's optimal batch (profile opt)
  std::chrono::microseconds max_delay = kDefaultMaxDelay;  // how long a batch waits to fill
  int32_t streams = kDefaultStreams;  // stream slots = batches in flight = worker threads
  // Host staging ring. CUDA engines also get staging_bytes / streams of device staging per slot, and
  // a batch closes early rather than exceed that share: size it >= streams x max_batch x typical
  // image bytes (plus room for the next batches to queue) so batches fill. An image larger than a
  // slot's share runs alone with a temporary device buffer; one larger than the ring gets a
  // temporary host buffer (one such image at a time).
  size_t staging_bytes = kDefaultStagingBytes;
  std::string output;  // engine output to return; "" = the engine's only output
  CompletionScope completion_scope;
};

struct BatchQueueStats {
  uint64_t batches = 0;          // batches run (including failed ones)
  uint64_t failed_batches = 0;   // batches whose stage/engine/CUDA step threw
  uint64_t images = 0;           // images run through the engine
  uint64_t cancelled_images = 0; // images failed by close(kCancel) or a close during submit
  uint64_t requests = 0;         // requests resolved
  int64_t largest_batch = 0;
  uint64_t oversized_images = 0; // images larger than the ring, staged in their own buffer
  uint64_t callback_failures = 0; // completion callbacks that threw (the queue carries on)
};

class BatchQueue {
 public:
  // Validates that the stage produces the engine's only input ([B, 3, S, S], float32/float16, S ==
  // stage.size()), that devices match, and the options (std::invalid_argument / EngineError naming
  // the values); allocates every buffer up front; starts the threads.
  BatchQueue(std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage,
             BatchQueueOptions options);
  ~BatchQueue();  // close(kCancel)
  BatchQueue(const BatchQueue&) = delete;
  BatchQueue& operator=(const BatchQueue&) = delete;

  // Queues n images (uint8 HWC, channels 1 or 3, any row_stride >= width * channels) and returns
  // at once after copying them into staging (blocking while the ring is full). The caller's memory
  // is not used after submit returns. `callback` runs on the completion thread once the request
  // resolves. Throws std::invalid_argument naming the index and value of a malformed view (nothing
  // is queued then), EngineError once the queue is closed.
  std::shared_ptr<Request> submit(const ImageView* images, int64_t n, Request::Callback callback = {});

  // Stops accepting work, finishes (kDrain) or cancels (kCancel) what is queued, waits for running
  // batches and for every callback, joins the threads. Idempotent and thread-safe; a later kCancel
  // upgrades a drain in progress. Throws EngineError when called from a callback or an engine.
  void close(CloseMode mode = CloseMode::kDrain);
  bool closed() const;

  DeviceKind device() const { return engine_->info().device; }
  int64_t max_batch() const { return max_batch_; }
  int32_t streams() const { return static_cast<int32_t>(slots_.size()); }
  std::chrono::microseconds max_delay() const { return options_.max_delay; }
  size_t staging_bytes() const { return ring_.capacity(); }
  const TensorSpec& input() const { return engine_->info().inputs[0]; }
  const TensorSpec& output() const { return engine_->info().outputs[output_index_]; }
  const Engine& engine() const { return *engine_; }
  BatchQueueStats stats() const;

 private:
  struct Item;
  struct Slot;
  using Batch = std::vector<std::unique_ptr<Item>>;

  void worker_main(Slot& slot);
  void completion_main();
  bool take_batch(Batch& batch, bool& cancelled);  // false: the worker should exit
  void run_batch(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors);
  void run_batch_cpu(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors);
  void run_batch_cuda(Slot& slot, const Batch& batch, std::vector<std::string>& item_errors);
  void finish_batch(Slot& slot, Batch& batch, RequestStatus status, const std::string& error,
                    const std::vector<std::string>& item_errors);
  // Fails `count` images of `request` that never reached staging (close during submit, allocation).
  void fail_unstaged(const std::shared_ptr<Request>& request, int64_t count, RequestStatus status,
                     const std::string& why);
  void complete(std::vector<std::shared_ptr<Request>>& ready);
  void check_not_internal_thread(const char* what) const;

  std::shared_ptr<Engine> engine_;
  std::shared_ptr<PreprocessStage> stage_;
  BatchQueueOptions options_;
  int64_t max_batch_ = 0;
  int64_t min_rows_ = 1;     // rows every engine call runs at least (profile min, or a fixed batch)
  int64_t engine_rows_ = 0;  // rows of the slot buffers: max(max_batch, min_rows)
  size_t output_index_ = 0;
  size_t input_row_bytes_ = 0;
  size_t output_row_bytes_ = 0;
  OutputDType input_dtype_ = OutputDType::kFloat32;
  size_t slot_staging_bytes_ = 0;  // CUDA: device staging per slot; a batch closes before exceeding it
  HostMemoryKind host_kind_ = HostMemoryKind::kAligned;

  // Everything below mutex_ is guarded by it.
  mutable std::mutex mutex_;
  std::condition_variable work_cv_;   // workers: items pending / filled, closing
  std::condition_variable space_cv_;  // submitters: ring space, closing
  HostBuffer ring_memory_;
  StagingRing ring_;
  std::deque<std::unique_ptr<Item>> pending_;  // reservation order
  int64_t space_waiters_ = 0;      // submitters blocked on ring space: dispatch without delay
  bool oversized_in_use_ = false;  // one image larger than the ring at a time (bounded memory)
  int64_t active_submits_ = 0;
  bool closing_ = false;
  bool cancelling_ = false;
  uint64_t next_request_id_ = 0;
  BatchQueueStats stats_;

  std::mutex completion_mutex_;
  std::condition_variable completion_cv_;
  std::vector<std::shared_ptr<Request>> completed_;
  bool completion_stop_ = false;

  std::mutex close_mutex_;  // serializes close(): the second caller waits for the joins
  bool joined_ = false;

  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<std::thread> workers_;
  std::thread completion_thread_;
};

}  // namespace nvclip
