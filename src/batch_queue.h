// BatchQueue: many callers, one engine kept busy, every row back to the right caller.
//
//   submit(images) ── memcpy each image into a bounded staging ring (pinned host memory for CUDA
//                     engines, aligned host memory for CPU engines; blocks while full = backpressure)
//   slot workers   ── N threads, one per stream slot. Each takes the next batch (<= max_batch images,
//                     or what arrived within max_delay of the oldest) and runs it on its SlotRunner:
//                     copy to the device -> PreprocessStage (writes the engine input) ->
//                     Engine::enqueue -> copy back -> rows scattered to the requests. The batch's
//                     staging is released as soon as it is uploaded (CUDA) or preprocessed (CPU).
//                     While slot i's engine runs, slot i+1 copies and preprocesses the next batch.
//   completion     ── one thread marks requests done and runs their callbacks, so a callback that
//                     waits (for the Python GIL, say) never stalls a slot that feeds the GPU.
//
// CPU engines use the same queue with host memory and no CUDA call at all (slot_runner.h).
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

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "host_memory.h"
#include "request.h"
#include "slot_runner.h"
#include "staging_ring.h"

namespace nvclip {

enum class CloseMode : int32_t { kDrain = 0, kCancel = 1 };

// Runs one group of completions (marking requests done, running callbacks). The Python binding
// wraps the group in one GIL acquisition; the default runs it directly.
using CompletionScope = std::function<void(const std::function<void()>& run_group)>;

constexpr int64_t kMaxBatchLimit = 4096;  // beyond any engine profile seen; bounds slot buffers
constexpr int32_t kMaxStreams = 16;
constexpr size_t kMinStagingBytes = 4 * kBufferAlignment;
// The default staging ring holds (streams + 1) full batches of typical photos (640x480 RGB): one
// batch per slot in flight and the next filling; never less than kMinDefaultStagingBytes.
constexpr size_t kTypicalImageBytes = size_t{640} * 480 * 3;
constexpr size_t kMinDefaultStagingBytes = size_t{256} << 20;
constexpr std::chrono::microseconds kDefaultMaxDelay{2000};
constexpr int32_t kDefaultStreams = 2;

struct BatchQueueOptions {
  int64_t max_batch = 0;  // images per batch; 0 = the engine's optimal batch (profile opt)
  std::chrono::microseconds max_delay = kDefaultMaxDelay;  // how long a batch waits to fill
  int32_t streams = kDefaultStreams;  // stream slots = batches in flight = worker threads
  // Host staging ring; 0 = the default (see kTypicalImageBytes). CUDA engines also get staging_bytes /
  // streams of device staging per slot, and a batch closes early rather than exceed that share:
  // size it >= (streams + 1) x max_batch x typical image bytes so batches fill. An image larger than
  // a slot's share runs alone with a temporary device buffer; one larger than the ring gets a
  // temporary host buffer (one such image at a time).
  size_t staging_bytes = 0;
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
  std::map<int64_t, uint64_t> batch_sizes;  // batch size -> batches of that size run (as `batches`)
  int64_t queued_images = 0;     // now: accepted images not yet in a running batch
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
  // close(mode) on every BatchQueue of the process (an interpreter's exit hook: its queues' threads
  // must stop while they can still reach the interpreter). Queues are not destroyed meanwhile.
  static void close_all(CloseMode mode);

  DeviceKind device() const { return engine_->info().device; }
  int64_t max_batch() const { return max_batch_; }
  int32_t streams() const { return options_.streams; }
  std::chrono::microseconds max_delay() const { return options_.max_delay; }
  size_t staging_bytes() const { return ring_.capacity(); }
  const TensorSpec& input() const { return engine_->info().inputs[0]; }
  const TensorSpec& output() const { return engine_->info().outputs[output_index_]; }
  const Engine& engine() const { return *engine_; }
  BatchQueueStats stats() const;

 private:
  struct Item;
  using Batch = std::vector<std::unique_ptr<Item>>;

  void worker_main(SlotRunner& slot);
  void completion_main();
  bool take_batch(Batch& batch, bool& cancelled);  // false: the worker should exit
  void run_batch(SlotRunner& slot, Batch& batch, std::vector<ImageView>& views,
                 std::vector<std::string>& item_errors);
  void release_staging(Batch& batch);  // idempotent
  void finish_batch(Batch& batch, RequestStatus status, const std::string& error,
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
  size_t output_index_ = 0;
  size_t output_row_bytes_ = 0;
  size_t batch_bytes_limit_ = 0;  // a batch closes before its staged images exceed a slot's staging

  // Everything below mutex_ is guarded by it.
  mutable std::mutex mutex_;
  std::condition_variable work_cv_;   // workers: items pending / filled, closing
  std::condition_variable space_cv_;  // submitters: ring space, closing
  StagingRing ring_;
  HostBuffer ring_memory_;
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

  std::vector<std::unique_ptr<SlotRunner>> slots_;
  std::vector<std::thread> workers_;
  std::thread completion_thread_;
};

}  // namespace nvclip
