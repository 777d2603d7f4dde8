// Request: one BatchQueue::submit() call, n images -> n rows of the engine's output, shared by the
// caller, the queue and the completion callback. The queue writes the rows and resolves it exactly
// once; the caller waits for it and reads the rows.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine.h"

namespace nvclip {

class BatchQueue;

enum class RequestStatus : int32_t { kPending = 0, kOk = 1, kFailed = 2, kCancelled = 3 };
const char* request_status_name(RequestStatus status);  // "pending" | "ok" | "failed" | "cancelled"

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

  // Marks the calling thread as a completion thread: wait() there throws instead of hanging.
  static void mark_completion_thread();

 private:
  friend class BatchQueue;
  uint8_t* row(int64_t i) { return rows_.get() + static_cast<size_t>(i) * row_bytes_; }
  bool wait_done(const std::chrono::nanoseconds* timeout) const;  // timeout nullptr: no limit
  void require_done(const char* what) const;
  // Records a request-level failure; the first one wins (its message is the clearest cause).
  void fail(RequestStatus status, const std::string& message);
  // Counts `count` images as finished; true when that was the last (the request is ready).
  bool finish_items(int64_t count);
  bool has_callback() const;
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

}  // namespace nvclip
