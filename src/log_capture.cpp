#include "log_capture.h"

namespace nvclip {

namespace {

thread_local LogCapture::Scope* t_innermost = nullptr;  // the scopes open on this thread, innermost first

const char* text(const char* msg) { return msg != nullptr ? msg : "(null message)"; }

}  // namespace

LogCapture::Scope::Scope(LogCapture& log) : log_(&log), outer_(t_innermost) { t_innermost = this; }

LogCapture::Scope::~Scope() { t_innermost = outer_; }

LogCapture::Scope* LogCapture::scope_on_this_thread() {
  for (Scope* s = t_innermost; s != nullptr; s = s->outer_) {
    if (s->log_ == this) return s;
  }
  return nullptr;
}

void LogCapture::error(const char* msg) noexcept {
  try {
    if (Scope* scope = scope_on_this_thread()) {
      scope->errors_.emplace_back(text(msg));  // only this thread touches its scopes
    } else {
      keep_warning(std::string("error: ") + text(msg));
    }
  } catch (...) {
    // Recording must not unwind into the library that logs (its logger callbacks are noexcept).
  }
}

void LogCapture::warning(const char* msg) noexcept {
  try {
    keep_warning(text(msg));
  } catch (...) {
  }
}

void LogCapture::keep_warning(std::string msg) {
  std::lock_guard<std::mutex> lock(mutex_);
  warnings_.push_back(std::move(msg));
  if (warnings_.size() > kMaxWarnings) warnings_.pop_front();
}

std::string LogCapture::take_errors() {
  Scope* scope = scope_on_this_thread();
  if (scope == nullptr) return {};
  std::string joined;
  for (const auto& e : scope->errors_) joined += (joined.empty() ? "" : "; ") + e;
  scope->errors_.clear();
  return joined;
}

std::vector<std::string> LogCapture::warnings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {warnings_.begin(), warnings_.end()};
}

}  // namespace nvclip
