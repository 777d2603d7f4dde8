#include "request.h"

#include <algorithm>
#include <cstring>

#include "errors.h"

namespace nvclip {

namespace {

// Set on a queue's completion thread: Request::wait() there would wait for the thread itself.
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

void Request::wait() const { wait_done(nullptr); }

bool Request::wait_for(std::chrono::nanoseconds timeout) const { return wait_done(&timeout); }

bool Request::wait_done(const std::chrono::nanoseconds* timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  if (done_) return true;
  if (t_completion_thread) {
    throw EngineError("Request.wait() called from a completion callback: the callback runs on the "
                      "thread that resolves requests, so this wait would never end");
  }
  const auto is_done = [&] { return done_; };
  if (timeout == nullptr) {
    done_cv_.wait(lock, is_done);
    return true;
  }
  return done_cv_.wait_for(lock, *timeout, is_done);
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

bool Request::has_callback() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<bool>(callback_);
}

void Request::mark_completion_thread() { t_completion_thread = true; }

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

}  // namespace nvclip
