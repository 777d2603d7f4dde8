// BatchQueue: many callers, one or more engine replicas kept busy, every row back to the right caller.
//
//   submit(images) ── memcpy each image into a bounded staging ring (pinned host memory for CUDA
//                     engines, aligned host memory for CPU engines; blocks while full = backpressure)
//   slot workers   ── one thread per stream slot: `streams` slots per replica (an engine and the
//                     preprocess stage that feeds it, on one device). The next batch (<= max_batch
//                     images, or what arrived within max_delay of the oldest) goes to a free slot of
//                     the least loaded replica (fewest batches in flight, then fewest taken), so an
//                     idle device gets a batch before a busy device's second slot. The slot runs it on
//                     its SlotRunner: copy to the device -> PreprocessStage (writes the engine input) ->
//                     Engine::enqueue -> copy back -> rows scattered to the requests. The batch's
//                     staging is released as soon as it is uploaded (CUDA) or preprocessed (CPU).
//                     While slot i's engine runs, slot i+1 copies and preprocesses the next batch.
//   completion     ── one thread marks requests done and runs their callbacks, so a callback that
//                     waits (for the Python GIL, say) never stalls a slot that feeds the GPU.
//
// Replicas (one per GPU of a machine, or several CPU engines sharing the cores) share the staging
// ring, the batching and the completion thread; they must run the same model: one kind of device,
// the same input tensor (so the same stage size and dtype) and the same output row. A request's
// images may run on several replicas; each row lands at its own index.
//
// CPU engines use the same queue with host memory and no CUDA call at all (slot_runner.h).
//
// Failure semantics
//   - A batch whose stage or engine throws (or whose CUDA calls fail) fails exactly the requests that
//     have an image in it (Request status kFailed, error = the message, naming the replica when there
//     are several); later batches run normally, on that replica and on the others.
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
// The default staging ring holds (slots + 1) full batches of typical photos (640x480 RGB): one
// batch per slot (of every replica) in flight and the next filling; never less than
// kMinDefaultStagingBytes.
constexpr size_t kTypicalImageBytes = size_t{640} * 480 * 3;
constexpr size_t kMinDefaultStagingBytes = size_t{256} << 20;
constexpr std::chrono::microseconds kDefaultMaxDelay{2000};
constexpr int32_t kDefaultStreams = 2;

// One engine and the stage that writes its input: the model on one device.
struct Replica {
  std::shared_ptr<Engine> engine;
  std::shared_ptr<PreprocessStage> stage;
};

struct BatchQueueOptions {
  // images per batch; 0 = the engine's optimal batch (profile opt; the smallest over the replicas)
  int64_t max_batch = 0;
  std::chrono::microseconds max_delay = kDefaultMaxDelay;  // how long a batch waits to fill
  int32_t streams = kDefaultStreams;  // stream slots per replica = batches in flight on it = its worker threads
  // Host staging ring, shared by the replicas; 0 = the default (see kTypicalImageBytes; slots = streams
  // x replicas). CUDA engines also get staging_bytes / slots of device staging per slot, and a batch
  // closes early rather than exceed that share: size it >= (slots + 1) x max_batch x typical image
  // bytes so batches fill. An image larger than a slot's share runs alone with a
  // temporary device buffer; one larger than the ring gets a temporary host buffer (one such image at
  // a time).
  size_t staging_bytes = 0;
  std::string output;  // engine output to return; "" = the engine's only output
  CompletionScope completion_scope;
};

// One replica's share of BatchQueueStats' batches.
struct ReplicaStats {
  std::string device;            // EngineInfo::device_name(): "cpu" | "cuda:N"
  uint64_t batches = 0;          // batches this replica ran (including failed ones)
  uint64_t failed_batches = 0;
  uint64_t images = 0;
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
  std::vector<ReplicaStats> replicas;  // per replica, in the queue's order
};

class BatchQueue {
 public:
  // Validates that each stage produces its engine's only input ([B, 3, S, S], float32/float16, S ==
  // stage.size()) on the engine's device, that the replicas agree (one kind of device, the same input
  // tensor and output row, distinct engines), and the options (std::invalid_argument / EngineError
  // naming the values and the replica); allocates every buffer up front; starts the threads.
  BatchQueue(std::vector<Replica> replicas, BatchQueueOptions options);
  // One replica.
  BatchQueue(std::shared_ptr<Engine> engine, std::shared_ptr<PreprocessStage> stage, BatchQueueOptions options)
      : BatchQueue(std::vector<Replica>{{std::move(engine), std::move(stage)}}, std::move(options)) {}
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

  DeviceKind device() const { return engine(0).info().device; }  // every replica's
  size_t replicas() const { return replicas_.size(); }
  const Engine& engine(size_t replica) const { return *replicas_.at(replica).replica.engine; }
  int64_t max_batch() const { return max_batch_; }
  int32_t streams() const { return options_.streams; }  // per replica
  std::chrono::microseconds max_delay() const { return options_.max_delay; }
  size_t staging_bytes() const { return ring_.capacity(); }
  const TensorSpec& input() const { return engine(0).info().inputs[0]; }  // as every replica's
  const TensorSpec& output() const { return engine(0).info().outputs[replicas_[0].output_index]; }
  BatchQueueStats stats() const;

 private:
  struct Item;
  using Batch = std::vector<std::unique_ptr<Item>>;
  struct ReplicaState {
    Replica replica;
    size_t output_index = 0;  // the returned output among the engine's outputs
    OutputDType stage_dtype = OutputDType::kFloat32;
    // Guarded by mutex_: where the next batch goes (preferred_replica).
    int32_t in_flight = 0;  // its batches taken and not yet finished (its busy slots)
    uint64_t taken = 0;     // batches it has taken
  };
  struct Slot {
    std::unique_ptr<SlotRunner> runner;
    size_t replica = 0;
  };

  // The replicas, checked (see the constructor), with what the queue needs of each.
  static std::vector<ReplicaState> checked_replicas(std::vector<Replica> replicas, const BatchQueueOptions& options);
  // options.max_batch, or the smallest optimal batch of the replicas; within every replica's profile.
  static int64_t checked_max_batch(const std::vector<ReplicaState>& replicas, const BatchQueueOptions& options);
  std::string replica_name(size_t replica) const;  // "replica 1 (cuda:1)"

  void worker_main(Slot& slot);
  void completion_main();
  bool take_batch(size_t replica, Batch& batch, bool& cancelled);  // false: the worker should exit
  // The replica that gets the next batch: of those with a free slot, the one with the fewest batches
  // in flight, then the fewest taken, then the lowest index. Needs mutex_.
  size_t preferred_replica() const;
  void run_batch(Slot& slot, Batch& batch, std::vector<ImageView>& views, std::vector<std::string>& item_errors);
  void release_staging(Batch& batch);  // idempotent
  void finish_batch(Batch& batch, size_t replica, RequestStatus status, const std::string& error,
                    const std::vector<std::string>& item_errors);
  // Fails `count` images of `request` that never reached staging (close during submit, allocation).
  void fail_unstaged(const std::shared_ptr<Request>& request, int64_t count, RequestStatus status,
                     const std::string& why);
  void complete(std::vector<std::shared_ptr<Request>>& ready);
  void check_not_internal_thread(const char* what) const;

  BatchQueueOptions options_;
  std::vector<ReplicaState> replicas_;
  int64_t max_batch_ = 0;
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

  std::vector<Slot> slots_;  // replica 0's slots, then replica 1's, ...
  std::vector<std::thread> workers_;
  std::thread completion_thread_;
};

}  // namespace nvclip
